"""Tables and text of a fusion study: a wide per-arm table, a one-sentence headline, Markdown and CSV files.

Inputs are the frames of :mod:`medjdt.reporting.statistics`: ``summary`` from
:func:`~medjdt.reporting.statistics.arm_summary` (``arm, metric, mean, ci_low, ci_high, ...``) and ``paired`` from
:func:`~medjdt.reporting.statistics.paired_comparison` (``arm, baseline, metric, mean_difference, ci_low,
ci_high, wilcoxon_p, ...``). The headline is derived from those numbers and never claims a difference whose 95%
CI includes 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.reporting.statistics import ALPHA, higher_is_better, verdict

METRIC_NAMES = {"dice": "Dice", "soft_dice": "soft Dice", "ece": "ECE", "brier": "Brier score", "nll": "NLL"}


def metric_label(metric: str) -> str:
    """Readable name of a metric column: ``dice`` -> ``Dice``, ``dice/kidney`` -> ``Dice (kidney)``."""
    name, _, part = metric.partition("/")
    label = METRIC_NAMES.get(name, name)
    return f"{label} ({part})" if part else label


def _decimals(values: np.ndarray) -> int:
    """Decimals that show about two significant digits of the largest value, at least 3 (at most 6)."""
    finite = np.abs(values[np.isfinite(values)])
    largest = finite.max() if finite.size else 0.0
    if largest == 0:
        return 3
    return int(min(6, max(3, 1 - math.floor(math.log10(largest)))))


def _interval(mean: float, low: float, high: float, decimals: int, signed: bool = False) -> str:
    if not np.isfinite(mean):
        return "n/a"
    centre = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    if not (np.isfinite(low) and np.isfinite(high)):
        return centre
    return f"{centre} [{low:.{decimals}f}, {high:.{decimals}f}]"


def _p_value(p: float, spaced: bool = False) -> str:
    eq, lt = (" = ", " < ") if spaced else ("=", "<")
    if not np.isfinite(p):
        return f"p{eq}n/a"
    return f"p{lt}0.001" if p < 0.001 else f"p{eq}{p:.2g}"


def _check(frame: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    for column in columns:
        if column not in frame.columns:
            raise ValueError(f"{name} has no column {column!r} (columns: {', '.join(map(str, frame.columns))})")


_SUMMARY_COLUMNS = ("arm", "metric", "mean", "ci_low", "ci_high")
_PAIRED_COLUMNS = ("arm", "baseline", "metric", "mean_difference", "ci_low", "ci_high", "wilcoxon_p")


class _Lookup:
    """Formatted estimates from ``summary`` and ``paired`` by (arm, metric)."""

    def __init__(self, summary: pd.DataFrame, paired: pd.DataFrame, baseline: str) -> None:
        _check(summary, "summary", _SUMMARY_COLUMNS)
        _check(paired, "paired", _PAIRED_COLUMNS)
        self.summary = summary.set_index(["arm", "metric"])
        self.paired = paired.loc[paired["baseline"] == baseline].set_index(["arm", "metric"])
        self.baseline = baseline

    def decimals(self, metric: str) -> int:
        return _decimals(self.summary.loc[self.summary.index.get_level_values("metric") == metric, "mean"].to_numpy())

    def difference_decimals(self, metric: str) -> int:
        rows = self.paired.loc[self.paired.index.get_level_values("metric") == metric]
        return _decimals(rows[["mean_difference", "ci_low", "ci_high"]].to_numpy(dtype=float).ravel())

    def estimate(self, arm: str, metric: str) -> str:
        if (arm, metric) not in self.summary.index:
            return "n/a"
        row = self.summary.loc[(arm, metric)]
        return _interval(row["mean"], row["ci_low"], row["ci_high"], self.decimals(metric))

    def difference(self, arm: str, metric: str, spaced: bool = False) -> str:
        if (arm, metric) not in self.paired.index:
            return "n/a"
        row = self.paired.loc[(arm, metric)]
        decimals = max(self.decimals(metric), self.difference_decimals(metric))
        text = _interval(row["mean_difference"], row["ci_low"], row["ci_high"], decimals, signed=True)
        return f"{text}, {_p_value(row['wilcoxon_p'], spaced)}"


def summary_table(summary: pd.DataFrame, paired: pd.DataFrame, metrics: Sequence[str], baseline: str) -> pd.DataFrame:
    """Wide text table: one row per arm (order of ``summary``), per metric its estimate and its difference.

    Returns:
        Columns ``arm`` then, per metric, ``<metric>`` (``"0.912 [0.890, 0.931]"``: mean over cases with its 95%
        bootstrap CI) and ``Δ<metric> vs <baseline>`` (``"+0.004 [-0.010, 0.018], p=0.64"``: paired difference,
        its CI and the Wilcoxon p-value; ``"(baseline)"`` on the baseline's row, ``"n/a"`` where missing).
    """
    lookup = _Lookup(summary, paired, baseline)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for metric in metrics:
        if metric not in set(summary["metric"]):
            raise ValueError(f"metric {metric!r} is not in the summary")
    rows = []
    for arm in pd.unique(summary["arm"]):
        row = {"arm": arm}
        for metric in metrics:
            row[metric] = lookup.estimate(arm, metric)
            row[f"Δ{metric} vs {baseline}"] = "(baseline)" if arm == baseline else lookup.difference(arm, metric)
        rows.append(row)
    return pd.DataFrame(rows)


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _metric_clause(lookup: _Lookup, paired: pd.DataFrame, metric: str, directions: Mapping[str, bool] | None) -> str:
    baseline = lookup.baseline
    rows = paired.loc[(paired["metric"] == metric) & (paired["baseline"] == baseline)]
    if rows.empty:
        raise ValueError(f"paired comparison has no row for metric {metric!r} against baseline {baseline!r}")
    higher = higher_is_better(metric, directions)
    label = metric_label(metric)
    sides = [verdict(low, high, higher, p) for low, high, p in zip(rows["ci_low"], rows["ci_high"], rows["wilcoxon_p"])]
    rows = rows.assign(_side=sides).sort_values("mean_difference", ascending=not higher, kind="stable")
    if (rows["_side"] == "neither").all():
        return (f"no arm differs from {baseline} on {label} (no paired difference has a 95% CI excluding 0 with "
                f"Wilcoxon p < {ALPHA})")
    parts = []
    for side, word in (("arm", "higher" if higher else "lower"), ("baseline", "lower" if higher else "higher")):
        arms = list(rows.loc[rows["_side"] == side, "arm"])
        if not arms:
            continue
        if len(arms) == 1:
            arm = arms[0]
            parts.append(
                f"{arm} has a {word} {label} than {baseline}, {lookup.estimate(arm, metric)} vs "
                f"{lookup.estimate(baseline, metric)} (paired difference {lookup.difference(arm, metric, True)})"
            )
        else:
            each = [
                f"{arm} ({lookup.estimate(arm, metric)}, difference {lookup.difference(arm, metric, True)})"
                for arm in arms
            ]
            parts.append(f"{_join(each)} have a {word} {label} than {baseline} ({lookup.estimate(baseline, metric)})")
    others = list(rows.loc[rows["_side"] == "neither", "arm"])
    if others:
        verb = "does" if len(others) == 1 else "do"
        parts.append(
            f"{_join(others)} {verb} not differ from {baseline} on {label} (95% CI includes 0 or p >= {ALPHA})"
        )
    return "; ".join(parts)


def headline(
    summary: pd.DataFrame,
    paired: pd.DataFrame,
    baseline: str,
    primary: Sequence[str] = ("dice", "ece"),
    directions: Mapping[str, bool] | None = None,
) -> str:
    """One plain-English sentence on which arm is more accurate and better calibrated than ``baseline``.

    For each metric of ``primary``, names the arms whose paired-difference CI excludes 0 in the better (or worse)
    direction, with their estimates and Wilcoxon p-values; when every CI includes 0 it says that no arm differs.
    The side is recomputed from the CI bounds and the metric's direction (``directions`` or the default rule).

    Raises:
        ValueError: ``primary`` is empty or a metric has no paired row against ``baseline``.
    """
    primary = [primary] if isinstance(primary, str) else list(primary)
    if not primary:
        raise ValueError("primary is empty: name at least one metric")
    lookup = _Lookup(summary, paired, baseline)
    clauses = [_metric_clause(lookup, paired, metric, directions) for metric in primary]
    sentence = "; ".join(clauses)
    return sentence[0].upper() + sentence[1:] + "." if sentence.startswith("no arm") else sentence + "."


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def pipe_table(frame: pd.DataFrame) -> str:
    """``frame`` (index left out) as a Markdown pipe table; ``|`` in cells is escaped."""
    header = "| " + " | ".join(_cell(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_study_markdown(
    path: str | os.PathLike,
    title: str,
    sentence: str,
    table: pd.DataFrame | Mapping[str, pd.DataFrame],
    notes: Sequence[str],
) -> Path:
    """Write a Markdown report: ``# title``, the headline sentence as its own paragraph, the table(s), notes as
    bullets.

    ``table`` is one table, or a mapping of sub-headings (``## ...``) to tables. Tables are rendered by
    ``DataFrame.to_markdown`` when ``tabulate`` is installed, else by :func:`pipe_table`. The file is written
    atomically; returns its path.
    """

    def render(frame: pd.DataFrame) -> str:
        try:
            return frame.to_markdown(index=False)
        except ImportError:
            return pipe_table(frame)

    blocks = [f"# {title}", sentence.strip()]
    if isinstance(table, pd.DataFrame):
        blocks.append(render(table))
    else:
        for heading, frame in table.items():
            blocks += [f"## {heading}", render(frame)]
    if notes:
        blocks.append("\n".join(f"- {note}" for note in notes))
    return atomic_write_text(path, "\n\n".join(blocks) + "\n")


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` (without its index) as CSV atomically; returns the path."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False), suffix=".csv")

"""Tables across runs: per-case results of every run, a per-fusion summary, pooled reliability bins, bootstrap CIs.

Summary statistics are taken over the per-case rows of every run of a fusion method (cases x seeds), as they are
in ``val_per_case.csv``. A per-case value is NaN where the metric is undefined for that case (e.g. a class empty
in both prediction and reference); as in :mod:`medjdt.metrics`, NaN values are left out of means and standard
deviations, and the ``<metric>_n`` columns count the values that were used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medjdt.reporting.runs import TABLE_METRICS, Run
from medjdt.reporting.statistics import pool_reliability

# Kept in sync with medjdt.labels.FUSION_METHODS, which is not imported here: it pulls in MONAI, and the command
# line imports this package at start-up. tests/test_reporting_report.py checks that the two agree.
FUSION_ORDER = ("mean", "weighted", "majority", "random", "staple")
SOFT_FUSIONS = ("mean", "weighted", "staple")
METRIC_LABELS = {
    "dice": "Dice",
    "soft_dice": "soft Dice",
    "thresholded_dice": "thresholded Dice",
    "ece": "ECE",
    "brier": "Brier",
    "nll": "NLL",
}


def target_kind(fusion: str) -> str:
    """``"soft"`` for fusion methods whose targets are probabilities (mean, weighted, STAPLE), else ``"hard"``."""
    return "soft" if fusion in SOFT_FUSIONS else "hard"


def fusion_order(fusions: Sequence[str]) -> list[str]:
    """The distinct fusion methods in ``fusions``, in the order of :data:`FUSION_ORDER` (others last, sorted)."""
    present = set(fusions)
    return [f for f in FUSION_ORDER if f in present] + sorted(present - set(FUSION_ORDER))


def per_case_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The per-case rows of every run, with ``run``, ``fusion`` and ``seed`` columns in front."""
    frames = []
    for run in runs:
        frame = run.per_case.copy()
        frame.insert(0, "seed", run.seed)
        frame.insert(0, "fusion", run.fusion)
        frame.insert(0, "run", run.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summary_table(per_case: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS) -> pd.DataFrame:
    """Mean and standard deviation (``ddof=1``) over cases and seeds of every metric, per fusion method.

    Args:
        per_case: rows as from :func:`per_case_table` (columns ``fusion``, ``seed``, ``case_id`` and ``metrics``).
        metrics: metric columns to summarise.

    Returns:
        One row per fusion method (in :func:`fusion_order`) with the columns ``fusion``, ``target`` (soft/hard),
        ``seeds`` (space-separated), ``n_cases`` (distinct cases), ``n_rows`` (cases x seeds), and per metric
        ``<metric>_mean``, ``<metric>_std`` and ``<metric>_n`` (non-NaN values).
    """
    rows = []
    for fusion in fusion_order(per_case["fusion"]):
        group = per_case[per_case["fusion"] == fusion]
        row: dict[str, object] = {
            "fusion": fusion,
            "target": target_kind(fusion),
            "seeds": " ".join(str(s) for s in sorted(group["seed"].unique())),
            "n_cases": group["case_id"].nunique(),
            "n_rows": len(group),
        }
        for metric in metrics:
            values = group[metric]
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1)
            row[f"{metric}_n"] = int(values.notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(summary: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS, digits: int = 4) -> str:
    """A Markdown table of :func:`summary_table`: one row per fusion method, cells ``mean ± std``."""
    header = ["fusion", "target", "seeds", "cases", *(METRIC_LABELS.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * len(metrics)) + "|"]
    for _, row in summary.iterrows():
        cells = [str(row["fusion"]), str(row["target"]), str(row["seeds"]), str(row["n_cases"])]
        cells += [f"{row[f'{m}_mean']:.{digits}f} ± {row[f'{m}_std']:.{digits}f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pooled_reliability(bins: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Merge reliability bins of several runs (e.g. the seeds of one fusion method) into the bins of all voxels.

    Counts add up; confidence and accuracy become count-weighted means (NaN in bins empty in every run), so the
    result equals the bins computed over the union of the runs' voxels.

    Raises:
        ValueError: no bins, or bins with different edges.
    """
    if not bins:
        raise ValueError("no reliability bins to pool")
    edges = bins[0][["bin_lower", "bin_upper"]].to_numpy()
    for frame in bins[1:]:
        other = frame[["bin_lower", "bin_upper"]].to_numpy()
        if other.shape != edges.shape or not np.allclose(other, edges):
            raise ValueError(f"cannot pool reliability bins with different edges ({len(other)} vs {len(edges)} bins)")
    # the same edges (up to float noise) for every run, so that the bins group together
    runs = [f.assign(arm="pooled", seed=i, bin_lower=edges[:, 0], bin_upper=edges[:, 1]) for i, f in enumerate(bins)]
    pooled = pool_reliability(pd.concat(runs, ignore_index=True))
    return pooled[["bin_lower", "bin_upper", "count", "confidence", "accuracy"]]

"""The figures draw the numbers of the tables they come from: every plotted point, bar, error bar and printed
score is read back from the matplotlib artists and compared with an independent computation on the table."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer

from medjdt.reporting.plots import comparison_figure, reliability_figure
from medjdt.reporting.statistics import paired_comparison, pool_reliability
from medjdt.reporting.study_figures import dice_vs_ece_figure, forest_figure, reliability_by_arm_figure

ARMS = ("majority", "mean", "staple")


def _scores(n_cases: int = 8, seeds: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = [
        (arm, seed, f"case{c}", rng.uniform(0.6, 0.95), rng.uniform(0.001, 0.02))
        for arm in ARMS
        for seed in range(seeds)
        for c in range(n_cases)
    ]
    scores = pd.DataFrame(rows, columns=["arm", "seed", "case_id", "dice", "ece"])
    scores.loc[(scores["arm"] == "staple") & (scores["case_id"] == "case0"), "dice"] = np.nan  # an undefined score
    return scores


def _bins() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for arm in ARMS[:2]:
        for seed in range(2):
            for lower in np.arange(0.0, 1.0, 0.2):
                count = 0 if lower == 0.2 else int(rng.integers(5, 500))  # one bin empty in every seed
                confidence = lower + rng.uniform(0.0, 0.2)
                rows.append(
                    (arm, seed, lower, lower + 0.2, count, confidence, np.clip(confidence + rng.normal(0, 0.1), 0, 1))
                )
    return pd.DataFrame(rows, columns=["arm", "seed", "bin_lower", "bin_upper", "count", "confidence", "accuracy"])


def _ece(bins: pd.DataFrame) -> float:
    """sum_b n_b / N |accuracy_b - confidence_b| over the non-empty bins (numpy, independent of the package)."""
    filled = bins.loc[bins["count"] > 0]
    n = filled["count"].to_numpy(float)
    gap = np.abs(filled["accuracy"].to_numpy(float) - filled["confidence"].to_numpy(float))
    return float((n * gap).sum() / n.sum())


def _printed(text: str, name: str) -> float:
    return float(re.search(rf"{name} ([0-9.]+)", text).group(1))


def test_reliability_by_arm_draws_each_arms_pooled_bins_and_its_ece():
    bins = _bins()
    figure = reliability_by_arm_figure(pool_reliability(bins))
    ax = figure.axes[0]
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()[1:]}
    assert set(lines) == {"majority", "mean"}
    for arm, line in lines.items():
        own = bins.loc[bins["arm"] == arm]
        # pooling over seeds: count-weighted means per bin, computed here with plain pandas
        own = own.assign(c=own["count"] * own["confidence"], a=own["count"] * own["accuracy"])
        pooled = own.groupby("bin_lower")[["count", "c", "a"]].sum()
        pooled = pooled.loc[pooled["count"] > 0]
        np.testing.assert_allclose(line.get_xdata(), pooled["c"] / pooled["count"], rtol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), pooled["a"] / pooled["count"], rtol=1e-12)
        expected = _ece(pooled.assign(confidence=pooled["c"] / pooled["count"], accuracy=pooled["a"] / pooled["count"]))
        assert _printed(line.get_label(), "pooled ECE") == pytest.approx(expected, abs=5e-5)
        assert len(line.get_xdata()) == 4  # the bin empty in every seed is not drawn


def test_dice_vs_ece_plots_the_seed_mean_of_each_case():
    scores = _scores()
    ax = dice_vs_ece_figure(scores).axes[0]
    assert [c.get_label().split(" (")[0] for c in ax.collections] == list(ARMS)
    for arm, points in zip(ARMS, ax.collections):
        own = scores.loc[scores["arm"] == arm].groupby("case_id")[["dice", "ece"]].mean().dropna()
        drawn = pd.DataFrame(points.get_offsets(), columns=["dice", "ece"])
        pd.testing.assert_frame_equal(
            drawn.sort_values("dice").reset_index(drop=True), own.sort_values("dice").reset_index(drop=True)
        )
        assert points.get_label().endswith(f"(n={len(own)})")
    assert len(ax.collections[2].get_offsets()) == 7  # staple's case0 has no Dice


def test_forest_plot_draws_each_arms_difference_ci_and_p_value():
    scores = _scores(n_cases=12)
    paired = paired_comparison(scores, ["dice", "ece"], "majority", n_resamples=500)
    figure = forest_figure(paired)
    for ax, metric in zip(figure.axes, ["dice", "ece"]):
        rows = paired.loc[paired["metric"] == metric].set_index("arm")
        labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
        positions = dict(zip(labels, figure.axes[0].get_yticks()))
        marker = ax.get_lines()[0]
        for x, y in zip(marker.get_xdata(), marker.get_ydata()):
            arm = next(a for a, p in positions.items() if p == y)
            assert x == pytest.approx(rows.loc[arm, "mean_difference"], rel=1e-12)
        # the horizontal error bars span the confidence interval
        segments = ax.collections[0].get_segments()
        spans = sorted((float(s[0][0]), float(s[1][0])) for s in segments)
        expected = sorted(zip(rows["ci_low"], rows["ci_high"]))
        np.testing.assert_allclose(spans, expected, rtol=1e-12)
        texts = sorted(t.get_text() for t in ax.texts)
        assert texts == sorted(f"p={p:.2g}" if p >= 0.001 else "p<0.001" for p in rows["wilcoxon_p"])


def test_report_reliability_figure_draws_the_bins_and_their_ece():
    bins = _bins()
    bins = bins.loc[(bins["arm"] == "mean") & (bins["seed"] == 0)].drop(columns=["arm", "seed"])
    figure = reliability_figure(bins, title="mean-seed0")
    ax, count_ax = figure.axes
    heights = [bar.get_height() for bar in ax.containers[0]]
    np.testing.assert_allclose(heights, np.where(bins["count"] > 0, bins["accuracy"], 0.0))
    assert [bar.get_height() for bar in count_ax.containers[0]] == list(bins["count"])
    assert _printed(ax.get_title(), "ECE") == pytest.approx(_ece(bins), abs=5e-5)


def test_comparison_figure_draws_mean_std_and_seed_means():
    scores = _scores().rename(columns={"arm": "fusion"})
    figure = comparison_figure(scores, metrics=["dice", "ece"])
    for ax, metric in zip(figure.axes, ["dice", "ece"]):
        fusions = [t.get_text() for t in ax.get_xticklabels()]
        assert sorted(fusions) == sorted(ARMS)
        bars = next(c for c in ax.containers if isinstance(c, BarContainer))
        spans = bars.errorbar.lines[2][0].get_segments()
        for fusion, bar, span in zip(fusions, bars, spans):
            values = scores.loc[scores["fusion"] == fusion, metric].dropna()
            assert bar.get_height() == pytest.approx(values.mean(), rel=1e-12)
            assert (span[0][1], span[1][1]) == pytest.approx(
                (values.mean() - values.std(), values.mean() + values.std())
            )
        seed_means = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)])
        expected = [scores.loc[scores["fusion"] == f].groupby("seed")[metric].mean().to_numpy() for f in fusions]
        np.testing.assert_allclose(np.sort(seed_means), np.sort(np.concatenate(expected)))

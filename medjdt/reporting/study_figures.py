"""Figures of a fusion study: pooled reliability per arm, Dice against ECE per case, forest plot of paired differences.

Each ``*_figure`` function builds a :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot state, no display)
and each ``plot_*`` function draws it and writes a PNG atomically, returning the path. Inputs come from
:mod:`medjdt.reporting.statistics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medjdt.reporting.plots import save_figure
from medjdt.reporting.statistics import case_means, expected_calibration_error_from_bins, higher_is_better


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colours(arms: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {arm: palette(i % palette.N) for i, arm in enumerate(arms)}


def reliability_by_arm_figure(pooled_bins: pd.DataFrame) -> Figure:
    """Reliability diagram with one line per arm (accuracy against confidence of the non-empty bins).

    Args:
        pooled_bins: output of :func:`~medjdt.reporting.statistics.pool_reliability` (``arm, count, confidence,
            accuracy``); the legend gives each arm's ECE pooled over the voxels of every case (``ece_pooled``).
    """
    for column in ("arm", "count", "confidence", "accuracy"):
        if column not in pooled_bins.columns:
            raise ValueError(f"pooled bins have no column {column!r}")
    arms = list(pd.unique(pooled_bins["arm"]))
    if not arms:
        raise ValueError("pooled bins are empty: nothing to plot")
    colours = _colours(arms)
    figure = _new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for arm in arms:
        bins = pooled_bins.loc[pooled_bins["arm"] == arm]
        filled = bins.loc[bins["count"] > 0]
        ece = expected_calibration_error_from_bins(bins.drop(columns="arm"))
        ax.plot(
            filled["confidence"],
            filled["accuracy"],
            marker="o",
            markersize=3,
            color=colours[arm],
            label=f"{arm} (pooled ECE {ece:.4f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted confidence (pooled over seeds, per bin)")
    ax.set_ylabel("accuracy (mean reference probability)")
    ax.set_title("Reliability by arm")
    ax.legend(loc="upper left", fontsize="small")
    return figure


def plot_reliability_by_arm(pooled_bins: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write :func:`reliability_by_arm_figure` as a PNG to ``path``; returns the path."""
    return save_figure(reliability_by_arm_figure(pooled_bins), path)


def dice_vs_ece_figure(scores: pd.DataFrame, dice: str = "dice", ece: str = "ece") -> Figure:
    """Scatter of per-case seed-averaged ``dice`` (x) against ``ece`` (y), one colour per arm.

    Only cases where both metrics are defined are drawn.
    """
    joined = pd.concat([case_means(scores, dice).rename("x"), case_means(scores, ece).rename("y")], axis=1).dropna()
    arms = list(pd.unique(scores["arm"]))
    colours = _colours(arms)
    figure = _new_figure(6.0, 4.5)
    ax = figure.add_subplot()
    for arm in arms:
        if arm not in joined.index.get_level_values("arm"):
            continue
        points = joined.xs(arm, level="arm")
        ax.scatter(points["x"], points["y"], s=18, alpha=0.8, color=colours[arm], label=f"{arm} (n={len(points)})")
    ax.set_xlabel(f"{dice} (per case, mean over seeds)")
    ax.set_ylabel(f"{ece} (per case, mean over seeds)")
    ax.set_title(f"{dice} against {ece}, averaged over seeds per case")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize="small")
    return figure


def plot_dice_vs_ece(scores: pd.DataFrame, path: str | os.PathLike, dice: str = "dice", ece: str = "ece") -> Path:
    """Write :func:`dice_vs_ece_figure` as a PNG to ``path``; returns the path."""
    return save_figure(dice_vs_ece_figure(scores, dice=dice, ece=ece), path)


def _p_text(p: float) -> str:
    if not np.isfinite(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def forest_figure(
    paired: pd.DataFrame, metrics: Sequence[str] | None = None, directions: Mapping[str, bool] | None = None
) -> Figure:
    """Forest plot of paired differences: one panel per metric, one row per arm, CI error bars, a line at 0.

    Args:
        paired: output of :func:`~medjdt.reporting.statistics.paired_comparison`.
        metrics: panels to draw, in order; default every metric of ``paired`` in order of appearance.
        directions: metric -> higher-is-better for the axis label (default rule of
            :func:`~medjdt.reporting.statistics.higher_is_better` otherwise).

    The Wilcoxon p-value of each arm is written at the right of its row.
    """
    for column in ("arm", "baseline", "metric", "mean_difference", "ci_low", "ci_high", "wilcoxon_p"):
        if column not in paired.columns:
            raise ValueError(f"paired comparison has no column {column!r}")
    metrics = list(pd.unique(paired["metric"])) if metrics is None else list(metrics)
    if not metrics:
        raise ValueError("no metric to plot: the paired comparison is empty")
    for metric in metrics:
        if metric not in set(paired["metric"]):
            raise ValueError(f"metric {metric!r} is not in the paired comparison")
    arms = list(pd.unique(paired["arm"]))
    baseline = ", ".join(map(str, pd.unique(paired["baseline"])))
    position = {arm: len(arms) - 1 - i for i, arm in enumerate(arms)}  # first arm at the top
    figure = _new_figure(3.6 * len(metrics) + 0.8, 0.45 * len(arms) + 1.6)
    axes = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rows = paired.loc[paired["metric"] == metric]
        y = rows["arm"].map(position).to_numpy(dtype=float)
        mean = rows["mean_difference"].to_numpy(dtype=float)
        low = np.nan_to_num(mean - rows["ci_low"].to_numpy(dtype=float), nan=0.0)
        high = np.nan_to_num(rows["ci_high"].to_numpy(dtype=float) - mean, nan=0.0)
        ax.errorbar(mean, y, xerr=[low, high], fmt="o", color="black", ecolor="tab:blue", capsize=3)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        transform = ax.get_yaxis_transform()  # x in axes fraction, y in data
        for row_y, p in zip(y, rows["wilcoxon_p"].to_numpy(dtype=float)):
            ax.text(1.02, row_y, _p_text(p), transform=transform, va="center", fontsize="small")
        direction = "higher" if higher_is_better(metric, directions) else "lower"
        ax.set_title(f"Δ{metric} vs {baseline}")
        ax.set_xlabel(f"paired difference, arm − baseline\n({direction} is better; 95% CI)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(position.values()), list(position.keys()))
    axes[0].set_ylim(-0.7, len(arms) - 0.3)
    return figure


def plot_forest(
    paired: pd.DataFrame,
    path: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    directions: Mapping[str, bool] | None = None,
) -> Path:
    """Write :func:`forest_figure` as a PNG to ``path``; returns the path."""
    return save_figure(forest_figure(paired, metrics=metrics, directions=directions), path)

"""Figures: reliability diagrams and the fusion-method comparison.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no display needed) and saved
atomically by :func:`save_figure`; the drawing functions also accept axes from ``pyplot.subplots`` (notebooks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from medjdt.data.atomic import atomic_write
from medjdt.reporting.runs import TABLE_METRICS
from medjdt.reporting.statistics import expected_calibration_error_from_bins
from medjdt.reporting.tables import METRIC_LABELS, fusion_order, target_kind

_KIND_COLOURS = {"soft": "tab:blue", "hard": "tab:orange"}


def plot_reliability(bins: pd.DataFrame, ax: Axes, count_ax: Axes | None = None, title: str | None = None) -> None:
    """Draw a reliability diagram: accuracy against confidence per bin, and the bin counts.

    Args:
        bins: one row per bin with ``bin_lower, bin_upper, count, confidence, accuracy`` (``val_reliability.csv``;
            accuracy is the mean reference probability of the predicted class).
        ax: axes for the diagram: bars of each bin's accuracy, the gap to its mean confidence in red, and the
            diagonal of perfect calibration; the title (when given) is followed by the ECE of the bins.
        count_ax: axes for the voxel count per bin (log scale); ``None`` to leave the counts out.
        title: figure title.
    """
    width = (bins["bin_upper"] - bins["bin_lower"]).to_numpy()
    left = bins["bin_lower"].to_numpy()
    filled = bins["count"].to_numpy() > 0
    accuracy = np.where(filled, bins["accuracy"].to_numpy(dtype=float), 0.0)
    confidence = np.where(filled, bins["confidence"].to_numpy(dtype=float), 0.0)
    ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    ax.bar(
        left[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean reference probability)")
    ax.legend(loc="upper left", fontsize="small")
    ece = expected_calibration_error_from_bins(bins)
    ax.set_title(f"{title}  (ECE {ece:.4f})" if title else f"ECE {ece:.4f}")
    if count_ax is None:
        ax.set_xlabel("confidence")
        return
    count_ax.bar(left, bins["count"].to_numpy(), width=width, align="edge", color="grey", edgecolor="black")
    count_ax.set_yscale("log")
    count_ax.set_xlim(0, 1)
    count_ax.set_xlabel("confidence")
    count_ax.set_ylabel("voxels")


def reliability_figure(bins: pd.DataFrame, title: str | None = None) -> Figure:
    """A figure with :func:`plot_reliability` on top and the bin counts below."""
    fig = Figure(figsize=(5, 6), layout="constrained")
    ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    plot_reliability(bins, ax, count_ax, title)
    return fig


def comparison_figure(per_case: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS) -> Figure:
    """One panel per metric: per fusion method the mean over cases and seeds with a +-1 std bar (as in the summary
    table), and the mean of each seed as black dots. Soft-target methods are blue, hard ones orange.

    Args:
        per_case: rows as from :func:`medjdt.reporting.tables.per_case_table`.
        metrics: metric columns, one panel each.
    """
    fusions = fusion_order(per_case["fusion"])
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    x = np.arange(len(fusions))
    colours = [_KIND_COLOURS[target_kind(f)] for f in fusions]
    for ax, metric in zip(axes, metrics):
        groups = [per_case.loc[per_case["fusion"] == f] for f in fusions]
        means = [g[metric].mean() for g in groups]
        stds = [g[metric].std(ddof=1) for g in groups]
        ax.bar(x, means, yerr=stds, color=colours, capsize=4, alpha=0.8)
        for i, group in enumerate(groups):
            seed_means = group.groupby("seed")[metric].mean()
            ax.scatter(np.full(len(seed_means), x[i]), seed_means, color="black", s=12, zorder=3)
        ax.set_xticks(x, fusions)
        ax.set_title(METRIC_LABELS.get(metric, metric))
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle("mean ± std over cases and seeds (dots: per-seed means; blue: soft targets, orange: hard)")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically; returns the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), suffix=".png")

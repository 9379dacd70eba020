"""Figures of ``medjdt raters``: the pairwise Dice matrix per class, the per-rater bars and the per-case agreement.

Each function takes the tables ``medjdt raters`` writes (as read back from its CSV files) and returns a
:class:`matplotlib.figure.Figure` (no pyplot state); :func:`medjdt.reporting.plots.save_figure` saves it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RATER_BARS = (
    ("mean_dice", "mean Dice with the others", "tab:blue"),
    ("staple_sensitivity", "STAPLE sensitivity", "tab:orange"),
    ("staple_specificity", "STAPLE specificity", "tab:green"),
)
"""The bars of :func:`raters_figure`: (column of the rater table, legend label, colour)."""
AGREEMENT_BINS = np.linspace(0.0, 1.0, 21)
"""The bin edges of :func:`case_agreement_figure` (Dice 0 to 1 in steps of 0.05)."""


def _classes(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["class"]))


def pairwise_matrix(pairs: pd.DataFrame, name: str, raters: Sequence[str]) -> np.ndarray:
    """The ``(R, R)`` matrix of class ``name`` from a long table ``class, rater_a, rater_b, value`` (rows
    ``rater_a``, columns ``rater_b``, in ``raters`` order); NaN on the diagonal and where a pair has no value."""
    matrix = np.full((len(raters), len(raters)), np.nan)
    index = {rater: i for i, rater in enumerate(raters)}
    for _, row in pairs[pairs["class"] == name].iterrows():
        matrix[index[row["rater_a"]], index[row["rater_b"]]] = row["value"]
    return matrix


def pairwise_dice_figure(pairs: pd.DataFrame, raters: Sequence[str] | None = None) -> Figure:
    """One heat map per class of the pairwise Dice (``pairwise_dice.csv``), values written in the cells.

    Args:
        pairs: ``class, rater_a, rater_b, value`` rows.
        raters: the order of the rows and columns (default: the order of first appearance in ``rater_a``).
    """
    raters = list(dict.fromkeys(pairs["rater_a"])) if raters is None else list(raters)
    classes = _classes(pairs)
    size = 1.0 + 0.6 * len(raters)
    fig = Figure(figsize=(size * len(classes) + 1.0, size + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(classes), squeeze=False)).ravel()
    image = None
    for ax, name in zip(axes, classes):
        matrix = pairwise_matrix(pairs, name, raters)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if value > 0.6 else "white")
        ax.set_xticks(range(len(raters)), raters, rotation=45, ha="right")
        ax.set_yticks(range(len(raters)), raters)
        ax.set_title(f"{name}: pairwise Dice")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="Dice (mean over cases)")
    return fig


def raters_figure(table: pd.DataFrame) -> Figure:
    """One panel per class: per rater, bars of its mean Dice with the others and its STAPLE sensitivity and
    specificity (``raters.csv``); an outlier's name is red and starred.

    Args:
        table: rows ``class, rater, mean_dice, staple_sensitivity, staple_specificity, outlier``.
    """
    classes = _classes(table)
    raters = list(dict.fromkeys(table["rater"]))
    fig = Figure(figsize=(max(4.0, 1.2 * len(raters) + 1.5) * len(classes), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(classes), squeeze=False, sharey=True)).ravel()
    width = 0.8 / len(RATER_BARS)
    x = np.arange(len(raters))
    for ax, name in zip(axes, classes):
        rows = table[table["class"] == name].set_index("rater").reindex(raters)
        for k, (column, label, colour) in enumerate(RATER_BARS):
            ax.bar(x + (k - (len(RATER_BARS) - 1) / 2) * width, rows[column].to_numpy(dtype=float), width,
                   label=label, color=colour, gid=column)
        flags = rows["outlier"].fillna(False).astype(bool).to_numpy()
        ax.set_xticks(x, [f"{r} *" if flag else r for r, flag in zip(raters, flags)])
        for tick, flag in zip(ax.get_xticklabels(), flags):
            tick.set_color("tab:red" if flag else "black")
        ax.set_ylim(0.0, 1.05)
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(RATER_BARS), fontsize="small")
    fig.suptitle("per rater (* red: outlier)")
    return fig


def case_agreement_figure(cases: pd.DataFrame, bins: np.ndarray = AGREEMENT_BINS) -> Figure:
    """Histogram of the per-case agreement (``cases.csv``'s ``agreement``: the mean pairwise Dice), with its
    median; cases without any marked class are left out."""
    values = cases["agreement"].dropna().to_numpy(dtype=float)
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="black")
    if len(values):
        ax.axvline(float(np.median(values)), color="tab:red", linestyle="--", label=f"median {np.median(values):.3f}")
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xlim(float(bins[0]), float(bins[-1]))
    ax.set_xlabel("agreement (mean pairwise Dice over the marked classes)")
    ax.set_ylabel("cases")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"per-case rater agreement ({len(values)} cases)")
    return fig

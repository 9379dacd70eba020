"""The ``medjdt raters`` report: the lead sentence, ``raters.md``, and every file of the report written at once.

The numbers come from :mod:`medjdt.reporting.raters`; the figures from :mod:`medjdt.reporting.rater_figures`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.reporting import rater_figures
from medjdt.reporting.plots import save_figure
from medjdt.reporting.raters import (
    OUTLIER_FACTOR,
    OUTLIER_MIN_GAP,
    RaterAgreement,
    pairwise_table,
    rater_agreement,
    rater_table,
)

__all__ = ["RaterReport", "lead_sentence", "report_markdown", "write_rater_report"]


def _number(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"


def lead_sentence(table: pd.DataFrame, n_raters: int) -> str:
    """The report's first sentence: the outlier raters, by name, with their numbers, or that there is none."""
    if n_raters < 3:
        return f"No rater can be singled out: an outlier needs at least 3 raters, and this dataset has {n_raters}."
    flagged = table[table["outlier"]]
    gaps = (table["mean_dice"] - table["others_dice"]).dropna()
    if flagged.empty and gaps.empty:
        return "No rater is an outlier."
    if flagged.empty:
        closest = table.loc[gaps.idxmin()]
        return (
            f"No rater is an outlier; the closest is rater {closest['rater']} on {closest['class']}, with a mean Dice "
            f"of {_number(closest['mean_dice'])} with the other raters against {_number(closest['others_dice'])} "
            "among them."
        )
    names = list(dict.fromkeys(flagged["rater"]))
    parts = []
    for _, row in flagged.iterrows():
        who = "" if len(names) == 1 else f" ({row['rater']})"
        parts.append(f"on {row['class']}{who} its mean Dice with the other raters is {_number(row['mean_dice'])}, "
                     f"against {_number(row['others_dice'])} among them")
    details = "; ".join(parts)
    if len(names) == 1:
        return f"Rater {names[0]} is an outlier: {details}."
    return f"Raters {', '.join(names[:-1])} and {names[-1]} are outliers: {details}."


def _matrix_markdown(pairs: pd.DataFrame, raters: list[str], name: str, digits: int) -> str:
    of_class = pairs[pairs["class"] == name].set_index(["rater_a", "rater_b"])["value"]
    lines = ["| | " + " | ".join(raters) + " |", "|---|" + "---:|" * len(raters)]
    for a in raters:
        cells = ["—" if a == b else ("n/a" if pd.isna(of_class[(a, b)]) else f"{of_class[(a, b)]:.{digits}f}")
                 for b in raters]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(
    agreement: RaterAgreement, table: pd.DataFrame, dice_pairs: pd.DataFrame, hd95_pairs: pd.DataFrame,
    *, manifest: str | os.PathLike, factor: float = OUTLIER_FACTOR, min_gap: float = OUTLIER_MIN_GAP, top: int = 10,
) -> str:
    """``raters.md``: the lead sentence, the outlier rule, the per-rater table, the pairwise matrices per class and
    the cases with the most disagreement."""
    cases = agreement.cases
    single = agreement.single_rater_cases
    lines = [
        "# Rater agreement", "", lead_sentence(table, len(agreement.raters)), "",
        f"Manifest `{manifest}`: {len(cases)} case(s) with two or more raters"
        + (f" ({len(single)} single-rater case(s) left out)" if single else "")
        + f"; raters {', '.join(agreement.raters)}; foreground classes {', '.join(agreement.classes)}.", "",
        f"**Outlier rule** (per class, at least 3 raters): a rater is an outlier when its disagreement with the "
        f"others (1 - its mean pairwise Dice) is at least {factor:g} times the disagreement among the other raters "
        f"(1 - the mean Dice of the pairs without it) and its mean Dice is at least {min_gap:g} below theirs.", "",
        "Pairwise Dice: per case, over the cases where at least one of the two raters marks the class (0 where only "
        "one does); HD95 (mm): 95th percentile of the symmetric surface distances, where both mark it; both are "
        "means over cases. STAPLE sensitivity and specificity: each rater against the STAPLE estimate of the class "
        "(one class against the rest), mean over cases.", "",
        "## Raters", "",
        "| class | rater | mean Dice with the others | Dice among the others | HD95 with the others (mm) "
        "| STAPLE sensitivity | STAPLE specificity | outlier |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for _, row in table.iterrows():
        values = [row[c] for c in ("mean_dice", "others_dice", "mean_hd95", "staple_sensitivity",
                                   "staple_specificity")]
        cells = [row["class"], row["rater"], *(_number(v) for v in values), "**yes**" if row["outlier"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    for title, pairs, digits in (("Pairwise Dice", dice_pairs, 3), ("Pairwise HD95 (mm)", hd95_pairs, 2)):
        for name in agreement.classes:
            lines += ["", f"## {title}: {name}", "", _matrix_markdown(pairs, agreement.raters, name, digits)]
    lines += [
        "", f"## The {min(top, len(cases))} case(s) with the most disagreement", "",
        "Agreement: mean over the classes some rater marks of the mean pairwise Dice; disagreeing foreground: the "
        "fraction of the voxels some rater marks as foreground on which the raters do not all give the same label.",
        "", "| rank | case | agreement | disagreeing foreground |", "|---:|---|---:|---:|",
    ]
    for _, row in cases.head(top).iterrows():
        lines.append(f"| {row['rank']} | {row['case_id']} | {_number(row['agreement'])} | "
                     f"{_number(row['disagreeing_fraction'])} |")
    lines += ["", "Figures: `pairwise_dice.png` (Dice matrix per class), `raters.png` (mean Dice and STAPLE "
              "sensitivity/specificity per rater), `case_agreement.png` (histogram of the per-case agreement).", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class RaterReport:
    """What :func:`write_rater_report` wrote: the lead sentence, every file, and the figures it saved."""

    sentence: str
    files: dict[str, Path]
    figures: dict[str, object] = field(repr=False)


def write_rater_report(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    factor: float = OUTLIER_FACTOR,
    min_gap: float = OUTLIER_MIN_GAP,
) -> RaterReport:
    """Score the raters of ``manifest`` (:func:`rater_agreement`) and write the report into ``out_dir``.

    Files (each written atomically, after every case was scored): ``pairwise_dice.csv`` and ``pairwise_hd95.csv``
    (:func:`pairwise_table`), ``raters.csv`` (:func:`rater_table`), ``cases.csv`` (``RaterAgreement.cases``),
    ``raters.md`` (:func:`report_markdown`), ``pairwise_dice.png``, ``raters.png`` and ``case_agreement.png``
    (:mod:`medjdt.reporting.rater_figures`).

    Raises:
        ValueError: as :func:`rater_agreement`, or a bad ``factor``/``min_gap``; nothing is written then.
    """
    agreement = rater_agreement(manifest, workers=workers)
    table = rater_table(agreement, factor=factor, min_gap=min_gap)
    dice_pairs, hd95_pairs = pairwise_table(agreement, "dice"), pairwise_table(agreement, "hd95")
    markdown = report_markdown(agreement, table, dice_pairs, hd95_pairs, manifest=manifest, factor=factor,
                               min_gap=min_gap)
    figures = {
        "pairwise_dice.png": rater_figures.pairwise_dice_figure(dice_pairs, agreement.raters),
        "raters.png": rater_figures.raters_figure(table),
        "case_agreement.png": rater_figures.case_agreement_figure(agreement.cases),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, frame in (("pairwise_dice.csv", dice_pairs), ("pairwise_hd95.csv", hd95_pairs),
                        ("raters.csv", table), ("cases.csv", agreement.cases)):
        files[name] = atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False), suffix=".csv")
    for name, figure in figures.items():
        files[name] = save_figure(figure, out / name)
    files["raters.md"] = atomic_write_text(out / "raters.md", markdown)
    return RaterReport(sentence=lead_sentence(table, len(agreement.raters)), files=files, figures=figures)

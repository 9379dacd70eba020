"""The report of a study: per arm the mean over test cases and seeds with 95% bootstrap CIs, the paired
comparison of every arm with the baseline arm, figures, and a Markdown page that leads with the answer.

Files (in the study's ``report_dir``, default ``<out>/report``):

* ``summary.md``: the answer in one sentence, the table (estimates with CIs; paired differences with CIs and
  Wilcoxon p-values), the inter-rater ceiling, and what every figure means (grid, references, aggregation);
* ``summary.csv`` (:func:`~medjdt.reporting.statistics.arm_summary`, every metric) and ``paired.csv``
  (:func:`~medjdt.reporting.statistics.paired_comparison`);
* ``per_case.csv``: every (arm, seed, test case) with its headline scores (:mod:`.case_scores`);
* ``temperatures.csv``: the fitted temperature of every temperature-scaled run;
* ``reliability.png`` (one curve per arm, pooled over test cases and seeds), ``dice_vs_ece.png`` (per case, seed
  means) and ``forest.png`` (paired differences with CIs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medjdt.reporting.statistics import arm_summary, bootstrap_ci, paired_comparison, pool_reliability
from medjdt.reporting.study import plan_study
from medjdt.reporting.study_figures import plot_dice_vs_ece, plot_forest, plot_reliability_by_arm
from medjdt.reporting.study_spec import StudySpec
from medjdt.reporting.study_tables import headline, summary_table, write_csv, write_study_markdown

__all__ = ["StudyReportFiles", "collect_study", "write_study_report"]

# Shown in the Markdown tables when present (every scored metric is in the CSVs): accuracy, then calibration.
TABLES = {
    "Accuracy": ("dice", "rater_dice", "kits_dice", "kits_sd"),
    "Calibration and soft agreement": ("soft_dice", "ece", "brier", "nll"),
}
# The reference of each table metric, named in its table's heading.
REFERENCES = {
    "dice": "majority vote",
    "rater_dice": "each rater",
    "kits_dice": "KiTS regions",
    "kits_sd": "KiTS regions",
    **dict.fromkeys(("soft_dice", "ece", "brier", "nll"), "mean of the raters"),
}
FOREST_METRICS = ("dice", "soft_dice", "ece", "brier")


@dataclass(frozen=True)
class StudyReportFiles:
    """The files :func:`write_study_report` wrote."""

    markdown: Path
    summary_csv: Path
    paired_csv: Path
    per_case_csv: Path
    temperatures_csv: Path
    figures: tuple[Path, ...]


def collect_study(spec: StudySpec, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """The evaluated test results of every planned (arm, seed) found under ``out``.

    Returns:
        ``(scores, bins, temperatures, missing)``: per (arm, seed, case) headline scores; per (arm, seed) pooled
        reliability bins; per (arm, seed) temperature; the names of planned runs without results.
    """
    import json

    scores, bins, temperatures, missing = [], [], [], []
    for run in plan_study(spec, Path(out)):
        for arm in run.arms:
            folder = run.directory / f"test-{arm.name}"
            if not (folder / "case_scores.csv").is_file():
                missing.append(f"{arm.name}-seed{run.seed}")
                continue
            frame = pd.read_csv(folder / "case_scores.csv", dtype={"case_id": str})
            scores.append(frame.assign(arm=arm.name, seed=run.seed))
            bins.append(pd.read_csv(folder / "reliability.csv").assign(arm=arm.name, seed=run.seed))
            if arm.temperature is not None:
                state = json.loads((run.directory / "study.json").read_text(encoding="utf-8"))
                value = state.get("tests", {}).get(arm.name, {}).get("temperature")
                temperatures.append({"arm": arm.name, "seed": run.seed, "temperature": value})
    if not scores:
        raise ValueError(f"no evaluated study run under {out}: run medjdt study run first")
    table = pd.concat(scores, ignore_index=True)
    first = ["arm", "seed", "case_id"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table, pd.concat(bins, ignore_index=True), pd.DataFrame(temperatures), missing


def _metrics(scores: pd.DataFrame, spec: StudySpec) -> list[str]:
    numeric = [c for c in scores.columns if c not in ("arm", "seed", "case_id") and pd.api.types.is_numeric_dtype(
        scores[c]) and not c.startswith("inter_rater")]
    return [m for m in (spec.metrics or numeric) if m in numeric]


def _ceiling(scores: pd.DataFrame, baseline: str) -> str | None:
    if "inter_rater_dice" not in scores.columns:
        return None
    cases = scores[scores["arm"] == baseline].groupby("case_id")["inter_rater_dice"].mean()
    mean, low, high = bootstrap_ci(cases.to_numpy())
    rater = scores[scores["arm"] == baseline].groupby("case_id")["rater_dice"].mean()
    return (
        f"Inter-rater ceiling: one rater's Dice against another, averaged over every pair of raters, is {mean:.3f} "
        f"[{low:.3f}, {high:.3f}] on the same {len(cases)} test cases; the `rater_dice` column (the model against "
        f"each rater, averaged over the raters) reads against it (baseline: {rater.mean():.3f})."
    )


def write_study_report(spec: StudySpec, out: str | Path, report_dir: str | Path | None = None,
                       n_resamples: int = 10000) -> StudyReportFiles:
    """Collect the study's results under ``out`` and write the report (files in the module docstring).

    Raises:
        ValueError: no evaluated run, or no run of the baseline arm.
    """
    out = Path(out)
    folder = Path(report_dir) if report_dir is not None else (spec.report_dir or out / "report")
    scores, bins, temperatures, missing = collect_study(spec, out)
    if spec.baseline not in set(scores["arm"]):
        raise ValueError(f"the study's baseline arm {spec.baseline!r} has no evaluated run under {out}")
    metrics = _metrics(scores, spec)
    summary = arm_summary(scores, metrics, n_resamples=n_resamples)
    paired = paired_comparison(scores, metrics, spec.baseline, n_resamples=n_resamples)
    tables = {}
    for title, chosen in TABLES.items():
        shown = [m for m in chosen if m in metrics]
        if shown:
            heading = f"{title} ({', '.join(dict.fromkeys(REFERENCES[m] for m in shown))})"
            tables[heading] = summary_table(summary, paired, shown, spec.baseline)
    primary = [m for m in ("dice", "ece") if m in metrics]
    sentence = headline(summary, paired, spec.baseline, primary=primary) if len(set(scores["arm"])) > 1 else (
        f"Only the {spec.baseline} arm has results so far.")
    n_cases, n_seeds = scores["case_id"].nunique(), scores["seed"].nunique()
    notes = [
        *spec.notes,
        f"{n_cases} held-out test cases x {n_seeds} seed(s) per arm; every value is per case on the case's "
        "original grid, averaged over seeds within a case, then over cases; 95% CIs resample cases (percentile "
        f"bootstrap, {n_resamples} resamples); paired differences are arm minus {spec.baseline}, case by case, "
        "with a two-sided Wilcoxon signed-rank test.",
        "dice (and iou) against the raters' majority vote; soft_dice, thresholded_dice, ece, brier and nll against "
        "the mean of the raters; rater_dice against each rater, averaged over the raters. A class absent from a "
        "case's reference is left out of that case's overlap scores (the voxels predicted for it are counted in "
        "absent_fp_voxels / absent_fp_ml).",
        f"Each run was tested with its {spec.checkpoint} checkpoint"
        + (" (best validation score of the config's monitor on the training manifest's validation fold)"
           if spec.checkpoint == "best" else "") + "; test cases were never used for training, checkpoint "
        "selection or temperature fitting.",
    ]
    ceiling = _ceiling(scores, spec.baseline)
    if ceiling:
        notes.append(ceiling)
    if not temperatures.empty:
        for arm, group in temperatures.groupby("arm"):
            values = ", ".join(f"{t:.3f}" for t in group["temperature"])
            notes.append(f"{arm}: temperatures fitted on each run's validation fold: {values}.")
    if missing:
        notes.append(f"Not yet evaluated (left out): {', '.join(missing)}.")
    folder.mkdir(parents=True, exist_ok=True)
    figures = [plot_reliability_by_arm(pool_reliability(bins), folder / "reliability.png")]
    if "dice" in scores.columns and "ece" in scores.columns:
        figures.append(plot_dice_vs_ece(scores, folder / "dice_vs_ece.png"))
    forest = [m for m in FOREST_METRICS if m in set(paired["metric"])]
    if forest:
        figures.append(plot_forest(paired, folder / "forest.png", metrics=forest))
    notes.append("Figures: reliability.png, dice_vs_ece.png, forest.png; tables: summary.csv, paired.csv, "
                 "per_case.csv, temperatures.csv.")
    title = f"{spec.name}: fusion study on held-out cases"
    return StudyReportFiles(
        markdown=write_study_markdown(folder / "summary.md", title, sentence, tables, notes),
        summary_csv=write_csv(summary, folder / "summary.csv"),
        paired_csv=write_csv(paired, folder / "paired.csv"),
        per_case_csv=write_csv(scores, folder / "per_case.csv"),
        temperatures_csv=write_csv(temperatures if not temperatures.empty else pd.DataFrame(
            columns=["arm", "seed", "temperature"]), folder / "temperatures.csv"),
        figures=tuple(figures),
    )

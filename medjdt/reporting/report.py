"""``medjdt report``: reliability diagrams per run and a comparison of fusion methods across runs.

Case views (:mod:`medjdt.reporting.case_views`): a run directory holds per-case scores, not predictions. Where a
run's last checkpoint was also run through ``medjdt predict`` (``medjdt predict --ckpt_path
<run>/checkpoints/last.ckpt`` writes ``<run>/predict/last/predictions``; the newest ``<run>/predict/last*/predictions``
holding probability maps is used), the report draws the best, the median and the worst (run, case) by the Dice of
the per-case table among the cases with a prediction, into ``case_views/<rank>_<run>_<case_id>.png``, each case from
the manifest that ``predict`` recorded (else the run's). Runs without such predictions get no case views; nothing
is made up for them. The title gives the table's Dice and that of the prediction shown against the majority vote on
the case's original grid (the table's may come from another grid: validation scores the preprocessed one).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medjdt._paths import child_path
from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.data.manifest import read_manifest
from medjdt.labels import fuse
from medjdt.metrics import dice
from medjdt.reporting.case_views import (
    ViewCase,
    case_view_figure,
    clear_views,
    load_view_case,
    recorded_window,
    select_cases,
)
from medjdt.reporting.evaluate import PROBABILITY_SUFFIX
from medjdt.reporting.plots import comparison_figure, reliability_figure, save_figure
from medjdt.reporting.runs import Run, load_runs
from medjdt.reporting.tables import markdown_table, per_case_table, summary_table
from medjdt.runs import read_record

CASE_VIEWS_DIR = "case_views"


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote.

    Attributes:
        summary_csv: ``summary.csv``, :func:`~medjdt.reporting.tables.summary_table` at full precision.
        summary_markdown: ``summary.md``, the same table as ``mean ± std``.
        per_case_csv: ``per_case.csv``, the per-case rows of every run the table was computed from.
        comparison_png: ``comparison.png``, the metrics per fusion method.
        reliability_pngs: run name (``<fusion>-seed<seed>``) -> ``reliability_<name>.png``.
        markdown: the Markdown table itself.
        case_view_pngs: rank (best, median, worst) -> ``case_views/<rank>_<run>_<case_id>.png``; empty when no
            run has predictions (module docstring).
    """

    summary_csv: Path
    summary_markdown: Path
    per_case_csv: Path
    comparison_png: Path
    reliability_pngs: dict[str, Path]
    markdown: str
    case_view_pngs: dict[str, Path] = field(default_factory=dict)


def run_predictions(run: Run) -> tuple[Path, Path] | None:
    """``(predictions folder, manifest)`` of the predictions of ``run``'s last checkpoint (module docstring), or
    None when there are none or their manifest is not found."""
    folders = [f for f in run.path.glob("predict/last*/predictions") if any(f.glob(f"*{PROBABILITY_SUFFIX}"))]
    if not folders:
        return None
    folder = max(folders, key=lambda f: f.stat().st_mtime)
    try:
        record = read_record(folder.parent) or {}
    except ValueError:
        record = {}
    manifest = Path(str((record.get("manifest") or {}).get("path") or run.manifest or ""))
    sessions = record.get("sessions") or [{}]
    if not manifest.is_absolute() and isinstance(sessions[0], dict) and sessions[0].get("cwd"):
        manifest = Path(sessions[0]["cwd"]) / manifest
    return (folder, manifest) if str(manifest) not in ("", ".") and manifest.is_file() else None


def write_case_views(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """The case views of the report (module docstring) in ``out_dir``; ``{rank: png path}``."""
    found = {run.name: (run, where) for run in runs if (where := run_predictions(run)) is not None}
    scores = {}
    for name, (run, (folder, _)) in found.items():
        for case_id, value in zip(run.per_case["case_id"].astype(str), run.per_case["dice"].astype(float)):
            if (folder / f"{case_id}{PROBABILITY_SUFFIX}").is_file():
                scores[(name, case_id)] = value
    chosen = select_cases(scores)
    if not chosen:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_views(out_dir)
    written = {}
    for rank, (name, case_id) in chosen.items():
        run, (folder, manifest_path) = found[name]
        manifest = read_manifest(manifest_path)
        records = {r.case_id: r for r in manifest.cases()}
        if case_id not in records:
            raise ValueError(f"run {run.path}: case {case_id!r} of its predictions is not in manifest {manifest_path}")
        case = load_view_case(manifest, records[case_id], folder)
        shown = _majority_dice(case)
        figure = case_view_figure(case, dice=scores[(name, case_id)], window=recorded_window(folder),
                                  note=f"run {name} ({rank} of {len(scores)}); prediction shown: Dice {shown:.4f}")
        written[rank] = save_figure(figure, child_path(out_dir, f"{rank}_{name}_{case_id}.png", "case_id"))
    return written


def _majority_dice(case: ViewCase) -> float:
    """The Dice of the case's argmax prediction against its raters' majority vote: the mean over the foreground
    classes present in the vote (:func:`medjdt.metrics.dice`)."""
    probs = torch.from_numpy(case.probs)[None]
    majority = fuse(case.raters, "majority", probs.shape[1]).argmax(0)[None]
    return float(dice(probs, majority).nanmean())


def write_report(
    run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *, case_views: bool = True
) -> ReportFiles:
    """Write the report of ``run_dirs`` (see :mod:`medjdt.reporting.runs` for what a run directory holds) to
    ``out_dir``: a reliability diagram per run and the summary table, per-case table and comparison figure across
    runs. Every file is written atomically; all runs are read and checked before anything is written. With
    ``case_views``, the case views of the module docstring when predictions of the runs are found.

    Raises:
        ValueError: as :func:`~medjdt.reporting.runs.load_runs` (missing or unreadable run, no per-case results,
            unfinished sweep run, duplicated fusion and seed, mixed datasets), naming the run.
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reliability_pngs = {}
    for run in runs:
        fig = reliability_figure(run.reliability, title=f"{run.name} (vs mean of raters)")
        reliability_pngs[run.name] = save_figure(fig, out / f"reliability_{run.name}.png")
    per_case = per_case_table(runs)
    summary = summary_table(per_case)
    markdown = markdown_table(summary)
    per_case_csv = atomic_write(out / "per_case.csv", lambda tmp: per_case.to_csv(tmp, index=False), suffix=".csv")
    summary_csv = atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False), suffix=".csv")
    summary_markdown = atomic_write_text(out / "summary.md", markdown)
    comparison_png = save_figure(comparison_figure(per_case), out / "comparison.png")
    views = write_case_views(runs, out / CASE_VIEWS_DIR) if case_views else {}
    return ReportFiles(summary_csv, summary_markdown, per_case_csv, comparison_png, reliability_pngs, markdown,
                       case_view_pngs=views)

"""``medjdt report``: reliability diagrams per run and a comparison of fusion methods across runs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.reporting.plots import comparison_figure, reliability_figure, save_figure
from medjdt.reporting.runs import load_runs
from medjdt.reporting.tables import markdown_table, per_case_table, summary_table


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
    """

    summary_csv: Path
    summary_markdown: Path
    per_case_csv: Path
    comparison_png: Path
    reliability_pngs: dict[str, Path]
    markdown: str


def write_report(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> ReportFiles:
    """Write the report of ``run_dirs`` (see :mod:`medjdt.reporting.runs` for what a run directory holds) to
    ``out_dir``: a reliability diagram per run and the summary table, per-case table and comparison figure across
    runs. Every file is written atomically; all runs are read and checked before anything is written.

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
    return ReportFiles(summary_csv, summary_markdown, per_case_csv, comparison_png, reliability_pngs, markdown)

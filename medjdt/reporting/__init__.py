"""Analysis: precomputed fused targets, evaluation of saved predictions, fusion-method sweeps and reports.

* :func:`write_fused_targets` (``medjdt fuse``): one fused target per case as NIfTI, plus an index CSV.
* :func:`evaluate_predictions` (``medjdt evaluate``): saved probability maps against the mean, the majority and
  each rater, next to the inter-rater baseline (each rater against the others).
* :func:`write_rater_report` (``medjdt raters``): how much the raters disagree, before training, and whether one
  is an outlier (:func:`rater_agreement` for the numbers alone).
* :func:`run_sweep` (``medjdt sweep``): one training run per (fusion method, seed), resumable.
* :func:`write_report` (``medjdt report``): reliability diagrams and a fusion-method comparison table from run
  directories (:func:`load_runs`), with :func:`summary_table`, :func:`pooled_reliability`, :func:`bootstrap_ci`
  and the plotting functions for notebooks.

This package reads data and metrics; it never imports :mod:`medjdt.models` (training runs as subprocesses).
"""

from __future__ import annotations

from medjdt._lazy import lazy_exports

# Public name -> defining module, resolved on first access: the command line imports medjdt.reporting.commands
# at start-up and must not pay for torch, MONAI and matplotlib.
_EXPORTS = {
    "evaluate_case": "medjdt.reporting.evaluate",
    "evaluate_predictions": "medjdt.reporting.evaluate",
    "inter_rater_agreement": "medjdt.reporting.evaluate",
    "FusionOutput": "medjdt.reporting.fused_targets",
    "write_fused_targets": "medjdt.reporting.fused_targets",
    "RaterAgreement": "medjdt.reporting.raters",
    "RaterReport": "medjdt.reporting.rater_report",
    "rater_agreement": "medjdt.reporting.raters",
    "write_rater_report": "medjdt.reporting.rater_report",
    "comparison_figure": "medjdt.reporting.plots",
    "plot_reliability": "medjdt.reporting.plots",
    "reliability_figure": "medjdt.reporting.plots",
    "save_figure": "medjdt.reporting.plots",
    "ReportFiles": "medjdt.reporting.report",
    "write_report": "medjdt.reporting.report",
    "TABLE_METRICS": "medjdt.reporting.runs",
    "Run": "medjdt.reporting.runs",
    "load_run": "medjdt.reporting.runs",
    "load_runs": "medjdt.reporting.runs",
    "SweepRun": "medjdt.reporting.sweep",
    "plan_sweep": "medjdt.reporting.sweep",
    "run_sweep": "medjdt.reporting.sweep",
    "sweep_commands": "medjdt.reporting.sweep",
    "bootstrap_ci": "medjdt.reporting.statistics",
    "markdown_table": "medjdt.reporting.tables",
    "per_case_table": "medjdt.reporting.tables",
    "pooled_reliability": "medjdt.reporting.tables",
    "summary_table": "medjdt.reporting.tables",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("medjdt.reporting", _EXPORTS, globals())

"""``EvaluationTables``: the per-case CSV and the reliability bins of every validation and test, written to disk.

After each validation (during ``fit`` or ``validate``) and each test, the callback writes into ``trainer.log_dir``:

* ``<stage>_per_case.csv`` (``stage`` is ``val`` or ``test``): one row per case, sorted by ``case_id``, with the
  metrics :class:`~medjdt.models.SegmentationModule` logs, per case: ``n_voxels``, ``dice``, ``iou``,
  ``absent_fp_voxels`` (against the raters' majority vote); ``soft_dice``, ``thresholded_dice``, ``ece``,
  ``ece_classwise``, ``brier``, ``nll`` (against the mean of the raters); ``ece_majority``, ``brier_majority``,
  ``nll_majority``; and per-class columns ``<metric>/<class>``.
* ``<stage>_reliability.csv``: the pooled reliability-diagram bins against the mean of the raters.

Nothing is written during Lightning's sanity check. Files are written atomically by rank 0; every rank takes part in
gathering the tables under DDP. The command line adds this callback when a config's ``trainer.callbacks`` lacks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from medjdt.data.atomic import atomic_write

__all__ = ["EvaluationTables", "per_case_table"]

# Per-case columns: (reference, metric names taken from its per_case() frame, suffix of the column in the CSV).
_CASE_COLUMNS = (
    ("majority", ("n_voxels", "dice", "iou", "absent_fp_voxels"), ""),
    ("mean", ("soft_dice", "thresholded_dice", "ece", "ece_classwise", "brier", "nll"), ""),
    ("majority", ("ece", "brier", "nll"), "_majority"),
)


def per_case_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per case from the per-case frames of ``metrics`` (``{"majority": ..., "mean": ...}``, each a
    :class:`~medjdt.metrics.SegmentationMetrics` against that reference); columns as in the module docstring.

    Under DDP every rank must call it (the states are gathered) and every rank gets the whole table.
    """
    frames = {key: metric.per_case().set_index("case_id") for key, metric in metrics.items()}
    columns = {}
    for key, names, suffix in _CASE_COLUMNS:
        frame = frames[key]
        for column in frame.columns:
            head, _, cls = column.partition("/")
            if head in names:
                columns[f"{head}{suffix}" + (f"/{cls}" if cls else "")] = frame[column]
    return pd.DataFrame(columns).rename_axis("case_id").reset_index().sort_values("case_id")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False), suffix=".csv")


class EvaluationTables(Callback):
    """Write ``<stage>_per_case.csv`` and ``<stage>_reliability.csv`` after each validation and test (see the
    module docstring). In a config: ``trainer: {callbacks: [{class_path: medjdt.models.EvaluationTables}]}``.

    The model must offer ``evaluation_metrics(stage)`` (as :class:`~medjdt.models.SegmentationModule` does): the
    metric objects of the evaluation that just ended.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.sanity_checking:
            return
        source = getattr(pl_module, "evaluation_metrics", None)
        if source is None:
            raise ValueError(
                f"EvaluationTables needs a model with evaluation_metrics(stage), got {type(pl_module).__name__}"
            )
        metrics = source(stage)
        per_case = per_case_table(metrics)  # collectives under DDP: every rank computes the tables
        reliability = metrics["mean"].reliability()
        log_dir = trainer.log_dir  # a collective under DDP too
        if trainer.is_global_zero and log_dir:
            _write_csv(per_case, Path(log_dir) / f"{stage}_per_case.csv")
            _write_csv(reliability, Path(log_dir) / f"{stage}_reliability.csv")

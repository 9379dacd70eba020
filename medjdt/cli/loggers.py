"""The loggers of a run folder: CSV (appending when a run resumes) and TensorBoard when it is installed."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from medjdt.data.atomic import atomic_write

__all__ = ["RunCSVLogger", "run_loggers", "truncate_metrics"]


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same run folder: new rows are appended."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_loggers(folder: Path) -> list[Logger]:
    """Loggers writing into ``folder`` itself: CSV, and TensorBoard when ``tensorboard`` is installed."""
    args = {"save_dir": str(folder.parent), "name": "", "version": folder.name}
    loggers: list[Logger] = [RunCSVLogger(**args)]
    if importlib.util.find_spec("tensorboard") is not None:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(**args, default_hp_metric=False))
    return loggers


def truncate_metrics(folder: Path, step: int) -> int:
    """Drop the rows of ``folder/metrics.csv`` logged after ``step`` (the step of the checkpoint a run resumes
    from: a killed run may have logged past it); returns how many rows were dropped."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    kept = [row for row in rows if not row.get("step") or int(float(row["step"])) <= step]
    if len(kept) == len(rows):
        return 0

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)

    atomic_write(path, write, suffix=".csv")
    return len(rows) - len(kept)

"""Write ``predict`` outputs as NIfTI on the input's original grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from medjdt._paths import child_path
from medjdt.data import restore_original_grid, write_nifti

__all__ = ["NiftiPredictionWriter"]


class NiftiPredictionWriter(BasePredictionWriter):
    """Per case, write ``<case_id>_probs.nii.gz`` (float32, C channels on the last axis) and
    ``<case_id>_label.nii.gz`` (uint8 argmax), resampled back to the input image's original grid and affine.

    Files are written atomically, so an interrupted run never leaves a half-written map, and never outside
    ``output_dir`` (a case id that would lead elsewhere is an error).

    Args:
        output_dir: where to write; default ``<trainer.log_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def directory(self, trainer: pl.Trainer) -> Path:
        """The folder this writer writes to for ``trainer``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or ".") / "predictions"

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        out_dir = self.directory(trainer)
        probs, image = prediction["probs"], prediction["image"]
        for i, case_id in enumerate(prediction["case_id"]):
            array, affine = restore_original_grid(probs[i].detach().cpu(), image[i])
            # Resampling can leave tiny departures from the simplex; renormalise so every voxel sums to 1.
            array = np.clip(array, 0.0, None)
            array /= np.maximum(array.sum(0, keepdims=True), 1e-12)
            probs_path = child_path(out_dir, f"{case_id}_probs.nii.gz", "case_id")
            label_path = child_path(out_dir, f"{case_id}_label.nii.gz", "case_id")
            write_nifti(np.moveaxis(array, 0, -1).astype(np.float32), affine, probs_path)
            write_nifti(array.argmax(0).astype(np.uint8), affine, label_path)

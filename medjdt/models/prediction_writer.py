"""Write ``predict`` outputs as NIfTI on the input's original grid, with colour tables for image viewers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from medjdt._paths import child_path
from medjdt.data import restore_original_grid, write_nifti
from medjdt.data.atomic import atomic_write_text
from medjdt.models.viewer_files import colour_tables

__all__ = ["NiftiPredictionWriter", "normalised_entropy"]


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of class probabilities normalised to [0, 1]: ``H(p) / log C`` per voxel.

    Args:
        probs: ``(C, *spatial)`` probabilities (each voxel sums to 1), ``C >= 2``.

    Returns:
        ``(*spatial)`` float32: 0 where one class has probability 1, 1 where all ``C`` classes are equally likely
        (``0 log 0`` counts as 0).

    Raises:
        ValueError: fewer than 2 classes, or values that are not finite probabilities.
    """
    probs = np.asarray(probs)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(f"normalised_entropy: probs must be (C, *spatial) with C >= 2, got shape {probs.shape}")
    low, high = float(probs.min()), float(probs.max())  # NaN compares false, so a NaN fails the check
    if not (low >= 0 and high <= 1 + 1e-5):
        raise ValueError(f"normalised_entropy: probs must be probabilities in [0, 1], got values in [{low}, {high}]")
    # one class at a time, in float32: a whole CT volume's C channels in float64 would need several GB
    entropy = np.zeros(probs.shape[1:], dtype=np.float32)
    for p in probs.astype(np.float32, copy=False):
        entropy -= p * np.log(np.where(p > 0, p, np.float32(1)))
    entropy /= np.float32(math.log(probs.shape[0]))
    return np.clip(entropy, 0.0, 1.0, out=entropy)


class NiftiPredictionWriter(BasePredictionWriter):
    """Per case, write on the input image's original grid and affine (the network's output resampled back):

    - ``<case_id>_probs.nii.gz``: float32 class probabilities, C channels on the last axis;
    - ``<case_id>_label.nii.gz``: uint8 label map (the argmax of the probabilities);
    - ``<case_id>_uncertainty.nii.gz``: float32 predictive entropy ``H / log C`` of those probabilities, 0 where
      one class is certain, 1 where every class is equally likely (:func:`normalised_entropy`).

    Once per folder, beside them, colour tables naming the label values with the model's class names
    (the manifest's; background 0 transparent, see :mod:`medjdt.models.viewer_files`):

    - ``labels.itksnap.txt``: in ITK-SNAP, open the image (*File > Open Main Image*), the label map
      (*Segmentation > Open Segmentation*), then *Segmentation > Import Label Descriptions* with this file;
    - ``labels.ctbl``: in 3D Slicer, drag the image, the label map and this file in together (tick *LabelMap* for
      the label map), or load the table with *Add Data* and pick it in *Volumes > Display > Lookup Table*.

    The probability and uncertainty maps open as ordinary volumes (e.g. as an overlay with a heat colour map).

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

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the colour tables (on the first process only)."""
        if not trainer.is_global_zero:
            return
        names = getattr(pl_module, "class_names", None)
        if names is None:
            names = [f"class{c}" for c in range(int(pl_module.num_classes))]
        for name, text in colour_tables(names).items():
            atomic_write_text(self.directory(trainer) / name, text)

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
            paths = {
                kind: child_path(out_dir, f"{case_id}_{kind}.nii.gz", "case_id")
                for kind in ("probs", "label", "uncertainty")
            }
            write_nifti(np.moveaxis(array, 0, -1).astype(np.float32), affine, paths["probs"])
            write_nifti(array.argmax(0).astype(np.uint8), affine, paths["label"])
            write_nifti(normalised_entropy(array), affine, paths["uncertainty"])

"""``SegmentationDataModule``: multi-rater NIfTI datasets from a manifest, for PyTorch Lightning."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, apply_transform
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

from medjdt.data.cache import PreprocessedCases
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest
from medjdt.data.phantoms import make_phantom_dataset
from medjdt.data.preprocess import PreprocessSettings
from medjdt.data.transforms import eval_transform, train_transform
from medjdt.labels import FUSION_METHODS

SMOOTHING_MODES = ("uniform", "boundary")
PREDICT_ON = ("val", "all")


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of cases: each item is ``transform(load(record))``.

    Args:
        records: the cases.
        load: callable ``CaseRecord -> dict`` (a :class:`~medjdt.data.cache.PreprocessedCases`).
        transform: applied to the loaded case (may return a list of patches).
    """

    def __init__(self, records: Sequence[CaseRecord], load: Callable[[CaseRecord], dict], transform: Compose):
        super().__init__(data=list(records), transform=transform)
        self.load = load

    def _transform(self, index: int) -> Any:
        return apply_transform(self.transform, self.load(self.data[index]))


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test/predict data from a manifest (see ``data_manifests/README.md``).

    Args:
        manifest: manifest CSV path (its metadata JSON sits next to it).
        fold: the validation fold, in ``0..num_folds-1``; training uses the other folds.
        num_folds: number of folds the manifest was split into (must match its metadata).
        fusion: rater fusion method, one of ``medjdt.labels.FUSION_METHODS``; applied per training patch
            after augmentation.
        label_smoothing: epsilon of ``SmoothLabelsd`` on the fused target (0 disables it).
        smoothing_mode: ``"uniform"`` or ``"boundary"``.
        patch_size: training patch size, one entry per spatial axis.
        samples_per_volume: patches drawn from each loaded volume.
        foreground_ratio: probability that a patch is centred on foreground (union of the raters' masks).
        batch_size: volumes per training batch; each contributes ``samples_per_volume`` patches, so a training
            batch holds ``batch_size * samples_per_volume`` patches (MONAI convention). Val/test/predict use 1.
        num_workers: DataLoader worker processes.
        cache_dir: on-disk cache of preprocessed cases; ``None``: ``<manifest folder>/.cache``.
        spacing: target voxel size in mm per spatial axis, or ``None`` to keep each case's grid.
        orientation: axis codes to reorient to, or ``None`` to keep the stored orientation.
        intensity: ``"ct"`` (clip to ``window`` HU, scale to [0, 1]) or ``"zscore"`` (per image, per channel).
        window: ``[low, high]`` HU window for ``"ct"``, e.g. ``[-200, 300]`` (KiTS), ``[-60, 140]`` (LiTS tumour).
        augment: joint spatial and intensity augmentation of training patches.
        seed: seeds patch sampling, augmentation, random-rater fusion and shuffling.
        demo: when given and ``manifest`` does not exist, ``make_phantom_dataset(dirname(manifest), **demo)``
            writes it first (``manifest`` must then be named ``manifest.csv``; ``folds`` defaults to
            ``num_folds``).
        predict_on: cases for ``predict_dataloader``: the validation fold (``"val"``) or every case (``"all"``).

    Batches: train ``{"image": (B, K, *patch) float32, "label": (B, C, *patch) float32}``; val/test
    ``{"image": MetaTensor (1, K, *spatial), "raters": (1, R, *spatial) int64, "case_id": [str]}``; predict
    ``{"image": MetaTensor (1, K, *spatial), "case_id": [str]}``. ``K`` is ``in_channels`` (1 for CT), ``C``
    ``num_classes``; whole volumes are on the preprocessed grid, see
    :func:`medjdt.data.preprocess.restore_original_grid`.
    """

    def __init__(
        self,
        manifest: str,
        fold: int = 0,
        num_folds: int = 5,
        fusion: str = "mean",
        label_smoothing: float = 0.0,
        smoothing_mode: str = "uniform",
        patch_size: Sequence[int] = (96, 96, 96),
        samples_per_volume: int = 2,
        foreground_ratio: float = 0.67,
        batch_size: int = 2,
        num_workers: int = 2,
        cache_dir: str | None = None,
        spacing: Sequence[float] | None = None,
        orientation: str | None = "RAS",
        intensity: str = "ct",
        window: Sequence[float] = (-200.0, 300.0),
        augment: bool = True,
        seed: int = 0,
        demo: dict[str, Any] | None = None,
        predict_on: str = "val",
    ):
        super().__init__()
        self.save_hyperparameters()
        manifest_path = Path(manifest)
        if demo is not None and not manifest_path.exists():
            if manifest_path.name != "manifest.csv":
                raise ValueError(f"with demo, the manifest must be named manifest.csv, got {manifest_path}")
            make_phantom_dataset(manifest_path.parent, **{"folds": num_folds, **demo})
        self.manifest: Manifest = read_manifest(manifest_path)
        self.fold = fold
        self.num_folds = num_folds
        self.fusion = fusion
        self.label_smoothing = float(label_smoothing)
        self.smoothing_mode = smoothing_mode
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = samples_per_volume
        self.foreground_ratio = float(foreground_ratio)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self.predict_on = predict_on
        self._check_args()
        self.settings = PreprocessSettings(
            orientation=orientation,
            spacing=None if spacing is None else tuple(spacing),
            intensity=intensity,
            window=tuple(window),
        )
        self.settings.check_dims(self.spatial_dims)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.manifest.path)
        self.datasets: dict[str, CaseDataset] = {}

    def _check_args(self) -> None:
        m = self.manifest
        if self.num_folds < 1:
            raise ValueError(f"num_folds must be >= 1, got {self.num_folds}")
        if m.num_folds is not None and m.num_folds != self.num_folds:
            raise ValueError(f"manifest {m.path} is split into {m.num_folds} folds, but num_folds={self.num_folds}")
        if not 0 <= self.fold < self.num_folds:
            raise ValueError(f"fold index {self.fold} out of range 0..{self.num_folds - 1}")
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"fusion must be one of {list(FUSION_METHODS)}, got {self.fusion!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.smoothing_mode not in SMOOTHING_MODES:
            raise ValueError(f"smoothing_mode must be one of {SMOOTHING_MODES}, got {self.smoothing_mode!r}")
        if len(self.patch_size) != m.spatial_dims or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {list(self.patch_size)} must have {m.spatial_dims} positive entries")
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must be in [0, 1], got {self.foreground_ratio}")
        for name, low in (("samples_per_volume", 1), ("batch_size", 1), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.predict_on not in PREDICT_ON:
            raise ValueError(f"predict_on must be one of {PREDICT_ON}, got {self.predict_on!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes (from the manifest metadata), background included."""
        return self.manifest.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, index = label value."""
        return list(self.manifest.class_names)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.manifest.spatial_dims

    @property
    def in_channels(self) -> int:
        """Image channels ``K`` (1 for CT)."""
        return self.manifest.in_channels

    def _loader(self) -> PreprocessedCases:
        return PreprocessedCases(self.num_classes, self.spatial_dims, self.settings, self.cache_dir)

    def _records(self, split: str) -> list[CaseRecord]:
        val_folds = [self.fold]
        train_folds = [f for f in range(self.num_folds) if f != self.fold]
        folds = {"train": train_folds, "val": val_folds, "all": None}[split]
        records = self.manifest.cases(folds)
        if not records:
            raise ValueError(f"manifest {self.manifest.path}: no cases in {split} folds {folds}")
        return records

    def setup(self, stage: str | None = None) -> None:
        """Check that every file exists and build the datasets needed for ``stage``."""
        self.manifest.check_files()
        load = self._loader()
        if stage in (None, "fit"):
            transform = train_transform(
                num_classes=self.num_classes,
                spatial_dims=self.spatial_dims,
                patch_size=self.patch_size,
                samples_per_volume=self.samples_per_volume,
                foreground_ratio=self.foreground_ratio,
                fusion=self.fusion,
                label_smoothing=self.label_smoothing,
                smoothing_mode=self.smoothing_mode,
                augment=self.augment,
            )
            transform.set_random_state(seed=self.seed)
            records = self._records("train")
            self._check_patch_fits(records)
            self.datasets["train"] = CaseDataset(records, load, transform)
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "test"):
            self.datasets["test"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "predict"):
            self.datasets["predict"] = CaseDataset(self._records(self.predict_on), load, eval_transform(False))

    def _check_patch_fits(self, records: Sequence[CaseRecord]) -> None:
        """Raise ``ValueError`` naming the case when the patch exceeds a volume on the preprocessed grid.

        The preprocessed shape is predicted from the image header alone (no decoding): axes reordered as the
        orientation step does, then rescaled to ``spacing``.
        """
        dims = self.spatial_dims
        for record in records:
            header = nib.load(str(record.image)).header
            shape = np.asarray(header.get_data_shape()[:dims], dtype=float)
            zooms = np.asarray(header.get_zooms()[:dims], dtype=float)
            if self.settings.orientation is not None and dims == 3:
                order = nib.io_orientation(nib.load(str(record.image)).affine)[:, 0].astype(int)
                shape_out, zooms_out = np.empty(3), np.empty(3)
                shape_out[order], zooms_out[order] = shape, zooms
                shape, zooms = shape_out, zooms_out
            if self.settings.spacing is not None:
                shape = np.round(shape * zooms / np.asarray(self.settings.spacing, dtype=float))
            if np.any(np.asarray(self.patch_size) > shape):
                raise ValueError(
                    f"patch_size {list(self.patch_size)} is larger than case {record.case_id!r} after "
                    f"preprocessing ({[int(s) for s in shape]} voxels at spacing {self.settings.spacing}); "
                    "use a smaller data.patch_size or a finer data.spacing"
                )

    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"call setup() before requesting the {split} dataloader")
        workers = self.num_workers
        sampler = None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads the last round with repeated cases; per-case metrics
            # and CSVs must see every evaluation case exactly once.
            sampler = UnrepeatedDistributedSampler(self.datasets[split], shuffle=False)
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training patches: ``batch_size`` volumes x ``samples_per_volume`` patches per batch."""
        return self._dataloader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Whole validation volumes with every rater, batch size 1."""
        return self._dataloader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Whole volumes of the held-out fold with every rater, batch size 1."""
        return self._dataloader("test", 1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Whole volumes (image and case id only), batch size 1."""
        return self._dataloader("predict", 1, shuffle=False)


def default_cache_dir(manifest: str | os.PathLike) -> Path:
    """Where :class:`SegmentationDataModule` caches when ``cache_dir`` is ``None``."""
    return Path(os.path.abspath(manifest)).parent / ".cache"

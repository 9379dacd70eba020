"""``SegmentationDataModule``: multi-rater NIfTI datasets from a manifest, for PyTorch Lightning.

Manifests may hold unlabelled cases (see ``data_manifests/README.md``). With ``unlabelled_ratio > 0`` the
training loader pairs every labelled batch with a batch of weak/strong views of unlabelled patches (for
:class:`medjdt.models.semi.SemiSupervisedModule`); otherwise unlabelled cases are not trained on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, apply_transform
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import RandomSampler, Sampler

from medjdt.data.cache import CaseCache, PreprocessedCases, from_payload, to_payload
from medjdt.data.case_fusion import CASE_FUSION_METHODS, CaseFusedTargets
from medjdt.data.io import read_image
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest, write_partly_labelled
from medjdt.data.phantoms import make_phantom_dataset
from medjdt.data.preprocess import PreprocessSettings, preprocess_case
from medjdt.data.transforms import eval_transform, train_transform, unlabelled_transform
from medjdt.labels import FUSION_METHODS

SMOOTHING_MODES = ("uniform", "boundary")
PREDICT_ON = ("val", "all")


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of cases: each item is ``transform(load(record))``.

    Args:
        records: the cases.
        load: callable ``CaseRecord -> dict`` (a :class:`CaseLoader`, or for whole-case fusion a
            :class:`~medjdt.data.case_fusion.CaseFusedTargets`).
        transform: applied to the loaded case (may return a list of patches).
    """

    def __init__(self, records: Sequence[CaseRecord], load: Callable[[CaseRecord], dict], transform: Compose):
        super().__init__(data=list(records), transform=transform)
        self.load = load

    def _transform(self, index: int) -> Any:
        return apply_transform(self.transform, self.load(self.data[index]))


class UnlabelledCases:
    """Callable that turns an unlabelled :class:`CaseRecord` into a preprocessed image, through the disk cache.

    The image goes through the same preprocessing as labelled cases (:func:`preprocess_case`). Returns
    ``{"image": MetaTensor (K, *spatial) float32, "case_id": str}`` with the same meta as
    :func:`medjdt.data.cache.from_payload` (so predictions map back to the stored grid).

    Args:
        spatial_dims: 2 or 3.
        settings: the preprocessing settings.
        cache_dir: cache root, or ``None`` to preprocess on every call.
    """

    def __init__(self, spatial_dims: int, settings: PreprocessSettings, cache_dir: str | os.PathLike | None):
        settings.check_dims(spatial_dims)
        self.spatial_dims = spatial_dims
        self.settings = settings
        key = {**settings.key(), "spatial_dims": spatial_dims, "cache_format": 1, "content": "unlabelled image"}
        self.cache = CaseCache(cache_dir, key) if cache_dir is not None else None

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        """Load and preprocess the image of ``record`` (which must have no annotation), or read it from the cache."""
        if record.labelled:
            raise ValueError(f"case {record.case_id!r} is labelled; load it with PreprocessedCases")
        payload = self.cache.read(record) if self.cache is not None else None
        if payload is None:
            image = read_image(record.image, case_id=record.case_id, spatial_dims=self.spatial_dims)
            # preprocess_case moves an image and its rater masks together; an all-background placeholder mask
            # runs that same chain and is dropped afterwards, leaving zero raters.
            placeholder = MetaTensor(torch.zeros((1, *image.shape[1:]), dtype=torch.uint8), affine=image.affine)
            case = {"image": image, "raters": placeholder, "case_id": record.case_id, "rater_names": []}
            case = preprocess_case(case, self.settings, self.spatial_dims)
            case["raters"] = torch.zeros((0, *case["image"].shape[1:]), dtype=torch.uint8)
            payload = to_payload(case)
            if self.cache is not None:
                self.cache.write(record, payload)
        case = from_payload(payload)
        return {"image": case["image"], "case_id": case["case_id"]}


class CaseLoader:
    """Callable ``CaseRecord -> dict``: labelled cases through ``labelled``, unlabelled ones through ``unlabelled``."""

    def __init__(self, labelled: PreprocessedCases, unlabelled: UnlabelledCases):
        self.labelled = labelled
        self.unlabelled = unlabelled

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        return self.labelled(record) if record.labelled else self.unlabelled(record)


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test/predict data from a manifest (see ``data_manifests/README.md``).

    Args:
        manifest: manifest CSV path (its metadata JSON sits next to it).
        fold: the validation fold, in ``0..num_folds-1``; training uses the other folds.
        num_folds: number of folds the manifest was split into (must match its metadata).
        fusion: rater fusion method, one of ``medjdt.labels.FUSION_METHODS``. ``"staple"`` and ``"weighted"``
            (which estimate rater performances from the data) fuse each whole training case once on the
            preprocessed grid and cache the soft target in ``cache_dir`` (see :mod:`medjdt.data.case_fusion`);
            patches then crop and augment that target with the image. The other methods fuse the raters of
            each training patch after augmentation (``"random"`` draws a new rater per patch and epoch).
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
            ``num_folds``). With an extra key ``labelled_fraction`` the phantoms' ``manifest.csv`` (written if
            missing) is copied to ``manifest`` (then not named ``manifest.csv``) by
            :func:`~medjdt.data.manifest.write_partly_labelled`: only that fraction of the training cases
            (the folds other than ``fold``) keep their annotations, chosen with the phantoms' ``demo.seed``.
        predict_on: cases for ``predict_dataloader``: the validation fold (``"val"``) or every case (``"all"``),
            unlabelled cases included.
        unlabelled_ratio: unlabelled volumes per labelled volume in each training step; 0 (default) trains on
            the labelled cases only. When > 0, ``round(unlabelled_ratio * batch_size)`` (>= 1) unlabelled
            volumes from the training folds, each giving ``samples_per_volume`` patches, accompany every
            labelled batch.

    Labelled and unlabelled cases: training (labelled part) and validation/test use the labelled cases of
    their folds; the unlabelled part of training uses the unlabelled cases of the training folds. Unlabelled
    cases in the validation fold are held out like the rest of that fold (they cannot be scored); prediction
    includes them.

    Batches: train ``{"image": (B, K, *patch) float32, "label": (B, C, *patch) float32}``, or with
    ``unlabelled_ratio > 0`` ``{"labelled": <that dict>, "unlabelled": {"weak": (U, K, *patch) float32,
    "strong": (U, K, *patch) float32}}`` (see :func:`medjdt.data.transforms.unlabelled_transform`; ``U`` is
    the unlabelled volumes times ``samples_per_volume``); val/test
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
        unlabelled_ratio: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        manifest_path = Path(manifest)
        if demo is not None and not manifest_path.exists():
            _write_demo(manifest_path, dict(demo), num_folds=num_folds, fold=fold)
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
        self.unlabelled_ratio = float(unlabelled_ratio)
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
        kept = m.metadata.get("labelled_keep_folds") or []
        if kept and self.fold not in kept:
            raise ValueError(
                f"manifest {m.path} hides annotations outside folds {kept} (write_partly_labelled), so validation "
                f"fold {self.fold} is partly unlabelled; derive a manifest that keeps fold {self.fold} labelled"
            )
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
        if not (np.isfinite(self.unlabelled_ratio) and self.unlabelled_ratio >= 0):
            raise ValueError(f"unlabelled_ratio must be a finite number >= 0, got {self.unlabelled_ratio}")
        if self.unlabelled_ratio > 0 and self.unlabelled_batch_size == 0:
            raise ValueError(
                f"unlabelled_ratio {self.unlabelled_ratio} x batch_size {self.batch_size} rounds to 0 unlabelled "
                "volumes per step; use a larger ratio (or 0 to train on labelled cases only)"
            )

    @property
    def unlabelled_batch_size(self) -> int:
        """Unlabelled volumes per training step: ``round(unlabelled_ratio * batch_size)`` (0: none)."""
        return round(self.unlabelled_ratio * self.batch_size)

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

    def _loader(self) -> CaseLoader:
        return CaseLoader(
            PreprocessedCases(self.num_classes, self.spatial_dims, self.settings, self.cache_dir),
            UnlabelledCases(self.spatial_dims, self.settings, self.cache_dir),
        )

    def _records(self, split: str, labelled: bool | None = True) -> list[CaseRecord]:
        """Cases of ``split`` (``train``, ``val`` or ``all`` folds): labelled, unlabelled or (None) both."""
        val_folds = [self.fold]
        train_folds = [f for f in range(self.num_folds) if f != self.fold]
        folds = {"train": train_folds, "val": val_folds, "all": None}[split]
        records = self.manifest.cases(folds, labelled=labelled)
        if not records:
            what = "unlabelled cases" if labelled is False else "cases"
            if labelled and self.manifest.cases(folds):
                what = "labelled cases (only unlabelled ones)"
            raise ValueError(f"manifest {self.manifest.path}: no {what} in {split} folds {folds}")
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
            train_load: Callable[[CaseRecord], dict] = load
            if self.fusion in CASE_FUSION_METHODS:
                train_load = CaseFusedTargets(load.labelled, self.fusion, self.cache_dir)
            self.datasets["train"] = CaseDataset(records, train_load, transform)
            if self.unlabelled_ratio > 0:
                unlabelled = unlabelled_transform(
                    spatial_dims=self.spatial_dims,
                    patch_size=self.patch_size,
                    samples_per_volume=self.samples_per_volume,
                    augment=self.augment,
                )
                unlabelled.set_random_state(seed=self.seed + 1)
                records = self._records("train", labelled=False)
                self._check_patch_fits(records)
                self.datasets["unlabelled"] = CaseDataset(records, load, unlabelled)
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "test"):
            self.datasets["test"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "predict"):
            records = self._records(self.predict_on, labelled=None)
            self.datasets["predict"] = CaseDataset(records, load, eval_transform(False))

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

    def _dataloader(self, split: str, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"call setup() before requesting the {split} dataloader")
        workers = self.num_workers
        evaluating = split not in ("train", "unlabelled")
        if evaluating and torch.distributed.is_available() and torch.distributed.is_initialized():
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

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Shuffled training patches: ``batch_size`` volumes x ``samples_per_volume`` patches per batch.

        With ``unlabelled_ratio > 0``: a ``CombinedLoader`` of ``{"labelled": ..., "unlabelled": ...}`` batches.
        An epoch is one pass over the labelled cases; the unlabelled cases are drawn in shuffled passes (carried
        over from epoch to epoch), exactly one unlabelled batch per labelled batch.
        """
        labelled = self._dataloader("train", self.batch_size, shuffle=True)
        if self.unlabelled_ratio == 0:
            return labelled
        if "unlabelled" not in self.datasets:
            raise ValueError("call setup() before requesting the unlabelled dataloader")
        volumes = self.unlabelled_batch_size
        sampler = RandomSampler(
            self.datasets["unlabelled"],
            num_samples=len(labelled) * volumes,
            generator=torch.Generator().manual_seed(self.seed + 1),
        )
        unlabelled = self._dataloader("unlabelled", volumes, shuffle=False, sampler=sampler)
        return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, mode="min_size")

    def val_dataloader(self) -> DataLoader:
        """Whole validation volumes with every rater, batch size 1."""
        return self._dataloader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Whole volumes of the held-out fold with every rater, batch size 1."""
        return self._dataloader("test", 1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Whole volumes (image and case id only), batch size 1."""
        return self._dataloader("predict", 1, shuffle=False)


def _write_demo(manifest: Path, demo: dict[str, Any], *, num_folds: int, fold: int) -> None:
    """Write the phantoms behind ``manifest`` (see the ``demo`` argument of :class:`SegmentationDataModule`)."""
    fraction = demo.pop("labelled_fraction", None)
    if fraction is None:
        if manifest.name != "manifest.csv":
            raise ValueError(f"with demo, the manifest must be named manifest.csv, got {manifest}")
        make_phantom_dataset(manifest.parent, **{"folds": num_folds, **demo})
        return
    full = manifest.parent / "manifest.csv"
    if manifest.name == "manifest.csv":
        raise ValueError(
            f"with demo.labelled_fraction, the manifest {manifest} must not be named manifest.csv: it is derived "
            f"from the fully labelled {full}"
        )
    if not full.exists():
        make_phantom_dataset(manifest.parent, **{"folds": num_folds, **demo})
    # The phantoms' seed also picks the labelled cases: the demo dataset is a function of ``demo`` alone.
    write_partly_labelled(full, manifest, float(fraction), keep_folds=[fold], seed=int(demo.get("seed", 0)))


def default_cache_dir(manifest: str | os.PathLike) -> Path:
    """Where :class:`SegmentationDataModule` caches when ``cache_dir`` is ``None``."""
    return Path(os.path.abspath(manifest)).parent / ".cache"

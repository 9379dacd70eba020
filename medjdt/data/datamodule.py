"""``SegmentationDataModule``: multi-rater NIfTI datasets from a manifest, for PyTorch Lightning.

It reads a dataset (and caches its preprocessing), never writes one: see :mod:`medjdt.data.demo` for the phantoms.

Manifests may hold unlabelled cases (see ``data_manifests/README.md``). With ``unlabelled_ratio > 0`` the
training loader pairs every labelled batch with a batch of weak/strong views of unlabelled patches (for
:class:`medjdt.models.semi.SemiSupervisedModule`); otherwise unlabelled cases are not trained on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import CombinedLoader
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from medjdt._paths import writable_folder
from medjdt.data.cache import PreprocessedCases
from medjdt.data.case_fusion import CASE_FUSION_METHODS, CaseFusedTargets
from medjdt.data.datasets import CaseDataset, CaseLoader, EpochSampler, UnlabelledCases, worker_init
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest
from medjdt.data.preflight import check_case_geometry, prepare_cases
from medjdt.data.preprocess import PreprocessSettings
from medjdt.data.transforms import eval_transform, train_transform, unlabelled_transform
from medjdt.labels import FUSION_METHODS
from medjdt.labels.smoothing import SMOOTHING_MODES
from medjdt.validation import check_choice, check_number, check_probability

PREDICT_ON = ("val", "all")
STAGES = ("fit", "validate", "test", "predict")


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test/predict data from a manifest (see ``data_manifests/README.md``).

    Args:
        manifest: manifest CSV path (its metadata JSON sits next to it).
        fold: the validation fold, in ``0..num_folds-1``; training uses the other folds.
        num_folds: number of folds; ``None`` (default) reads it from the manifest (its metadata, else its fold
            column). A value that disagrees with the manifest is an error naming both.
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
        max_case_gb: memory budget of preprocessing one case, in GiB: a ``spacing`` that would resample a case
            beyond it (input and output grids of the image and every rater, as float32) is refused, from the
            image header, before anything is allocated.
        spacing: target voxel size in mm per spatial axis, or ``None`` to keep each case's grid.
        orientation: axis codes to reorient to, or ``None`` to keep the stored orientation.
        intensity: ``"ct"`` (clip to ``window`` HU, scale to [0, 1]) or ``"zscore"`` (per image, per channel).
        window: ``[low, high]`` HU window for ``"ct"``, e.g. ``[-200, 300]`` (KiTS), ``[-60, 140]`` (LiTS tumour).
        augment: joint spatial and intensity augmentation of training patches.
        seed: seeds patch sampling, augmentation, random-rater fusion and shuffling: every training sample's
            random stream is a function of ``(seed, epoch, draw, case)``, the same for any ``num_workers``.
        demo: synthetic phantoms behind ``manifest`` (arguments of :func:`~medjdt.data.make_phantom_dataset`,
            optionally ``labelled_fraction``). The data module only reads: the command line writes them before
            building it when ``manifest`` does not exist (:func:`~medjdt.data.ensure_demo_data`, which see); from
            Python call that function first.
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
        num_folds: int | None = None,
        fusion: str = "mean",
        label_smoothing: float = 0.0,
        smoothing_mode: str = "uniform",
        patch_size: Sequence[int] = (96, 96, 96),
        samples_per_volume: int = 2,
        foreground_ratio: float = 0.67,
        batch_size: int = 2,
        num_workers: int = 2,
        cache_dir: str | None = None,
        max_case_gb: float = 8.0,
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
            raise ValueError(
                f"manifest {manifest_path} does not exist: the command line writes the data.demo phantoms there "
                "before it builds the data module; from Python call medjdt.data.ensure_demo_data first"
            )
        self.manifest: Manifest = read_manifest(manifest_path)
        self.num_folds = self.manifest.num_folds if num_folds is None else num_folds
        self.fold = self._check_folds(fold)
        self.fusion = check_choice("data.fusion", fusion, FUSION_METHODS)
        self.label_smoothing = check_number(
            "data.label_smoothing", label_smoothing, low=0, high=1, high_inclusive=False
        )
        self.smoothing_mode = check_choice("data.smoothing_mode", smoothing_mode, SMOOTHING_MODES)
        self.patch_size = tuple(check_number("data.patch_size", p, low=1, integer=True) for p in patch_size)
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {list(self.patch_size)} must have {self.spatial_dims} positive entries")
        self.samples_per_volume = check_number("data.samples_per_volume", samples_per_volume, low=1, integer=True)
        self.foreground_ratio = check_probability("data.foreground_ratio", foreground_ratio)
        self.batch_size = check_number("data.batch_size", batch_size, low=1, integer=True)
        self.num_workers = check_number("data.num_workers", num_workers, low=0, integer=True)
        self.augment = augment
        self.seed = seed
        self.predict_on = check_choice("data.predict_on", predict_on, PREDICT_ON)
        self.unlabelled_ratio = check_number("data.unlabelled_ratio", unlabelled_ratio, low=0)
        if self.unlabelled_ratio > 0 and self.unlabelled_batch_size == 0:
            raise ValueError(
                f"unlabelled_ratio {self.unlabelled_ratio} x batch_size {self.batch_size} rounds to 0 unlabelled "
                "volumes per step; use a larger ratio (or 0 to train on labelled cases only)"
            )
        self.settings = PreprocessSettings(
            orientation=orientation,
            spacing=None if spacing is None else tuple(spacing),
            intensity=intensity,
            window=tuple(window),
        )
        self.settings.check_dims(self.spatial_dims)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.manifest.path)
        writable_folder(self.cache_dir, "cache folder (data.cache_dir)", create=False)
        self.max_case_gb = check_number("data.max_case_gb", max_case_gb, low=0, low_inclusive=False)
        self._prepared: set[str] = set()
        self.datasets: dict[str, CaseDataset] = {}

    def _check_folds(self, fold: int) -> int:
        """``fold`` after checking it and ``num_folds`` against the manifest."""
        m = self.manifest
        check_number("data.num_folds", self.num_folds, low=1, integer=True)
        if m.num_folds != self.num_folds:
            raise ValueError(
                f"data.num_folds={self.num_folds} disagrees with manifest {m.path}, which is split into "
                f"{m.num_folds} folds; leave data.num_folds out to read it from the manifest"
            )
        fold = check_number("data.fold", fold, low=0, high=self.num_folds - 1, integer=True)
        kept = m.metadata.get("labelled_keep_folds") or []
        if kept and fold not in kept:
            raise ValueError(
                f"manifest {m.path} hides annotations outside folds {kept} (write_partly_labelled), so validation "
                f"fold {fold} is partly unlabelled; derive a manifest that keeps fold {fold} labelled"
            )
        return fold

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
            PreprocessedCases(self.num_classes, self.spatial_dims, self.settings, self.cache_dir, self.in_channels),
            UnlabelledCases(self.spatial_dims, self.settings, self.cache_dir, self.in_channels),
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

    def stage_records(self, stage: str) -> dict[str, list[CaseRecord]]:
        """The cases each dataset of ``stage`` (fit, validate, test or predict) uses, by dataset name.

        Raises:
            ValueError: an unknown stage, or a split without cases.
        """
        check_choice("stage", stage, STAGES)
        splits: dict[str, list[CaseRecord]] = {}
        if stage == "fit":
            splits["train"] = self._records("train")
            if self.unlabelled_ratio > 0:
                splits["unlabelled"] = self._records("train", labelled=False)
        if stage in ("fit", "validate"):
            splits["val"] = self._records("val")
        if stage == "test":
            splits["test"] = self._records("val")
        if stage == "predict":
            splits["predict"] = self._records(self.predict_on, labelled=None)
        return splits

    def prepare(self, stage: str) -> None:
        """Check and cache every case ``stage`` uses, before the first step; a no-op when already done.

        First from the image headers (NIfTI, channels, the memory of resampling, the patch size: see
        :func:`~medjdt.data.preflight.check_case_geometry`), then by loading every case through the cache in
        ``num_workers`` processes (every file readable, finite intensities, labels within the classes, rater grids
        equal to the image's).

        Raises:
            ValueError: one line naming the failing cases and files.
        """
        if stage in self._prepared:
            return
        self.manifest.check_files()
        writable_folder(self.cache_dir, "cache folder (data.cache_dir)")
        splits = self.stage_records(stage)
        records = list({r.case_id: r for rs in splits.values() for r in rs}.values())
        training = {r.case_id for name in ("train", "unlabelled") for r in splits.get(name, [])}
        check_case_geometry(
            records, self.settings, self.spatial_dims, in_channels=self.in_channels, max_case_gb=self.max_case_gb
        )
        if training:
            check_case_geometry(
                [r for r in records if r.case_id in training], self.settings, self.spatial_dims,
                in_channels=self.in_channels, max_case_gb=self.max_case_gb, patch_size=self.patch_size,
            )
        load = self._loader()

        def is_cached(record: CaseRecord) -> bool:
            cache = load.labelled.cache if record.labelled else load.unlabelled.cache
            return cache is not None and cache.entry_path(record).is_file()

        done = prepare_cases(records, load, is_cached, self.num_workers, worker_init)
        rank_zero_info(
            f"{stage}: {len(records)} case(s) checked ({done.cached} from the cache, {done.built} preprocessed) in "
            f"{done.seconds:.1f} s; cache {self.cache_dir}"
        )
        self._prepared.add(stage)

    def prepare_data(self) -> None:
        """Lightning's hook (once per node, before ``setup``): :meth:`prepare` for the trainer's current stage."""
        trainer = self.trainer
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        if stage is not None:
            self.prepare(str(stage.value))

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
            transform.set_random_state(seed=self.seed)  # for plain integer indexing from Python
            records = self._records("train")
            check_case_geometry(
                records, self.settings, self.spatial_dims, in_channels=self.in_channels,
                max_case_gb=self.max_case_gb, patch_size=self.patch_size,
            )
            train_load: Callable[[CaseRecord], dict] = load
            if self.fusion in CASE_FUSION_METHODS:
                train_load = CaseFusedTargets(load.labelled, self.fusion, self.cache_dir)
            self.datasets["train"] = CaseDataset(records, train_load, transform, seed=self.seed)
            if self.unlabelled_ratio > 0:
                unlabelled = unlabelled_transform(
                    spatial_dims=self.spatial_dims,
                    patch_size=self.patch_size,
                    samples_per_volume=self.samples_per_volume,
                    augment=self.augment,
                )
                unlabelled.set_random_state(seed=self.seed + 1)
                records = self._records("train", labelled=False)
                check_case_geometry(
                    records, self.settings, self.spatial_dims, in_channels=self.in_channels,
                    max_case_gb=self.max_case_gb, patch_size=self.patch_size,
                )
                self.datasets["unlabelled"] = CaseDataset(records, load, unlabelled, seed=self.seed + 1)
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "test"):
            self.datasets["test"] = CaseDataset(self._records("val"), load, eval_transform())
        if stage in (None, "predict"):
            records = self._records(self.predict_on, labelled=None)
            self.datasets["predict"] = CaseDataset(records, load, eval_transform(False))

    def _dataloader(self, split: str, batch_size: int, sampler: EpochSampler | None = None) -> DataLoader:
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
            shuffle=False,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=worker_init,
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Shuffled training patches: ``batch_size`` volumes x ``samples_per_volume`` patches per batch.

        With ``unlabelled_ratio > 0``: a ``CombinedLoader`` of ``{"labelled": ..., "unlabelled": ...}`` batches.
        An epoch is one pass over the labelled cases; each epoch draws as many unlabelled volumes as it needs
        (``unlabelled_batch_size`` per labelled batch) from shuffled passes over the unlabelled cases.
        Order and random transforms follow the epoch (see :class:`~medjdt.data.datasets.EpochSampler`).
        """
        train = self.datasets.get("train")
        if train is None:
            raise ValueError("call setup() before requesting the train dataloader")
        labelled = self._dataloader("train", self.batch_size, EpochSampler(len(train), self.seed))
        if self.unlabelled_ratio == 0:
            return labelled
        if "unlabelled" not in self.datasets:
            raise ValueError("call setup() before requesting the unlabelled dataloader")
        volumes = self.unlabelled_batch_size
        sampler = EpochSampler(len(self.datasets["unlabelled"]), self.seed + 1, num_samples=len(labelled) * volumes)
        unlabelled = self._dataloader("unlabelled", volumes, sampler)
        return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, mode="min_size")

    def val_dataloader(self) -> DataLoader:
        """Whole validation volumes with every rater, batch size 1."""
        return self._dataloader("val", 1)

    def test_dataloader(self) -> DataLoader:
        """Whole volumes of the held-out fold with every rater, batch size 1."""
        return self._dataloader("test", 1)

    def predict_dataloader(self) -> DataLoader:
        """Whole volumes (image and case id only), batch size 1."""
        return self._dataloader("predict", 1)


def default_cache_dir(manifest: str | os.PathLike) -> Path:
    """Where :class:`SegmentationDataModule` caches when ``cache_dir`` is ``None``."""
    return Path(os.path.abspath(manifest)).parent / ".cache"

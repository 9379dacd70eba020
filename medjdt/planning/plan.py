"""From a fingerprint to a training config: every setting with the reason it has its value.

The decisions (learned from nnU-Net's experiment planning and MONAI Auto3DSeg, not copied):

- **spacing**: the median spacing per axis. When the coarsest median axis is more than 3x the next coarsest and
  has fewer than a third of the voxels of the others (a stack of thick slices), that axis goes to the 10th
  percentile of its spacings instead (never finer than the other axes): thick slices are not interpolated into
  many thin ones.
- **patch and batch**: :func:`medjdt.planning.topology.fit_patch_and_batch` under a memory budget, starting from
  a patch of equal extent in mm on every axis, clipped to the median shape after resampling and to the smallest
  case (the data module refuses a patch larger than a case).
- **intensity**: CT keeps Hounsfield units in a window from the foreground's 0.5 and 99.5 percentiles (medians
  over the cases); other modalities are z-scored per image.
- **network**: MONAI ``DynUNet`` (it takes a stride and a kernel per axis and level; ``UNet`` takes one stride per
  level), with the levels of :func:`medjdt.planning.topology.topology`.
- the rest follows ``configs/kits.yaml`` (GPU) and ``configs/demo.yaml`` (CPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medjdt.planning.fingerprint import Fingerprint
from medjdt.planning.topology import Fit, fit_patch_and_batch
from medjdt.validation import check_number

__all__ = ["ANISOTROPY_THRESHOLD", "Decision", "Plan", "make_plan", "target_spacing"]

ANISOTROPY_THRESHOLD = 3.0
DEFAULT_WINDOW = (-200.0, 300.0)


@dataclass(frozen=True)
class Profile:
    """What a machine can train: GPU (bf16-mixed, memory-bound) or a small CPU (fp32, compute-bound)."""

    name: str
    base_filters: int
    max_filters: int
    max_levels: int
    value_bytes: int
    overhead_gib: float
    start_voxels: int  # the first patch has about this many voxels (equal extent in mm on every axis)
    max_patches: int | None
    deep_supervision: bool
    max_epochs: int


def _profile(cpu: bool, dims: int) -> Profile:
    if cpu:
        return Profile("cpu", 8, 64, 4 if dims == 3 else 5, 4, 0.0, 48**3 if dims == 3 else 128**2, 2, False, 40)
    return Profile(
        "gpu",
        32,
        320 if dims == 3 else 512,
        6 if dims == 3 else 7,
        2,
        0.5,
        256**3 if dims == 3 else 2048**2,
        None,
        True,
        500,
    )


@dataclass(frozen=True)
class Decision:
    """One row of plan.md: the config key, its value and why."""

    setting: str
    value: Any
    reason: str


@dataclass
class Plan:
    """``config``: the LightningCLI config (a plain mapping); ``decisions``: the reasons, in config order."""

    config: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)
    fit: Fit | None = None


def _mm(values: Any) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in np.atleast_1d(values)) + "]"


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """The resampling target (mm per axis) of cases with ``spacings`` and ``shapes`` (both ``(N, D)``, RAS order),
    and the reason in words."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    median_shape = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    reason = f"median spacing per axis over {len(spacings)} case(s)"
    if len(target) < 2:
        return [round(float(t), 5) for t in target], reason
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    coarsest_other = max(target[a] for a in others)
    few_voxels = median_shape[coarse] * ANISOTROPY_THRESHOLD < min(median_shape[a] for a in others)
    ratio = target[coarse] / coarsest_other
    if ratio > ANISOTROPY_THRESHOLD and few_voxels:
        p10 = float(np.percentile(spacings[:, coarse], 10))
        value = max(p10, float(coarsest_other))
        target[coarse] = value
        kept = (
            "kept at the slice thickness: it is not resampled"
            if np.allclose(spacings[:, coarse], value)
            else "so that at most a tenth of the cases lose slices to resampling"
        )
        reason += (
            f"; anisotropic: axis {coarse} (median {np.median(spacings[:, coarse]):.3g} mm) is {ratio:.1f}x coarser "
            f"than the other axes (> {ANISOTROPY_THRESHOLD:g}x) and has {median_shape[coarse]:.0f} voxels against "
            f"{min(median_shape[a] for a in others):.0f}, so it takes the 10th percentile of its spacings "
            f"({p10:.3g} mm{'' if value == p10 else f', raised to the other axes {coarsest_other:.3g} mm'}), {kept}"
        )
    elif ratio > ANISOTROPY_THRESHOLD:
        reason += (
            f"; axis {coarse} is {ratio:.1f}x coarser than the others but has about as many voxels, so the "
            "median is kept (nnU-Net's rule needs both)"
        )
    return [round(float(t), 5) for t in target], reason


def _resampled_shapes(fp: Fingerprint, target: list[float]) -> np.ndarray:
    """``(N, D)`` case shapes after resampling to ``target``, as the data module's header check computes them."""
    return np.maximum(np.round(fp.ras("shape") * fp.ras("spacing") / np.asarray(target)), 1)


def _start_patch(target: list[float], median_shape: np.ndarray, smallest: np.ndarray, voxels: int) -> list[int]:
    inverse = 1.0 / np.asarray(target)
    cube = inverse * (voxels / np.prod(inverse)) ** (1.0 / len(target))  # equal extent in mm on every axis
    return [int(max(1, min(c, m, s))) for c, m, s in zip(np.round(cube), np.floor(median_shape), smallest)]


def _window(fp: Fingerprint) -> tuple[list[float], str]:
    stats = fp.summary.get("intensity") or []
    lows = [s["p0.5"]["median"] for s in stats if s.get("p0.5")]
    highs = [s["p99.5"]["median"] for s in stats if s.get("p99.5")]
    if not lows or not highs or math.floor(min(lows)) >= math.ceil(max(highs)):
        return list(DEFAULT_WINDOW), "no foreground intensities to window on: the data module's default window"
    window = [float(math.floor(min(lows))), float(math.ceil(max(highs)))]
    return window, (
        "CT: clip to the foreground's 0.5 and 99.5 percentiles (medians over the labelled cases, "
        "rounded outwards), scaled to [0, 1]"
    )


def make_plan(
    fp: Fingerprint,
    *,
    memory_gb: float = 24.0,
    cpu: bool = False,
    max_epochs: int | None = None,
    cpu_count: int | None = None,
) -> Plan:
    """The training config for the dataset of ``fp`` on a GPU with ``memory_gb`` GiB (or a small CPU)."""
    memory_gb = check_number("--memory-gb", memory_gb, low=0, low_inclusive=False)
    s = fp.summary
    dims, classes, channels = int(s["spatial_dims"]), int(s["num_classes"]), int(s["in_channels"])
    profile = _profile(cpu, dims)
    epochs = profile.max_epochs if max_epochs is None else check_number("--max-epochs", max_epochs, low=1, integer=True)
    labelled = [r for r in fp.rows if int(float(r["raters"])) > 0]
    train = [r for r in labelled if int(float(r["fold"])) != 0]
    if not train or len(train) == len(labelled):
        raise ValueError(
            f"manifest {s['manifest']}: fold 0 must hold some but not all labelled cases (it is the "
            f"validation fold of the plan); folds present: {s['folds']}"
        )
    decisions: list[Decision] = []

    def decide(setting: str, value: Any, reason: str) -> Any:
        decisions.append(Decision(setting, value, reason))
        return value

    # Spacing, shapes after resampling, patch and batch.
    spacing, spacing_reason = target_spacing(fp.ras("spacing"), fp.ras("shape"))
    resampled = _resampled_shapes(fp, spacing)
    median_shape, smallest = np.median(resampled, axis=0), resampled.min(axis=0)
    dataset_voxels = float(np.prod(resampled, axis=1).sum())
    start = _start_patch(spacing, median_shape, smallest, profile.start_voxels)
    budget = memory_gb
    fit = fit_patch_and_batch(
        start,
        median_shape,
        spacing,
        budget_gib=budget,
        dataset_voxels=dataset_voxels,
        in_channels=channels,
        out_channels=classes,
        value_bytes=profile.value_bytes,
        overhead_gib=profile.overhead_gib,
        base_filters=profile.base_filters,
        max_filters=profile.max_filters,
        max_levels=profile.max_levels,
        max_patches=profile.max_patches,
        deep_supervision=profile.deep_supervision,
    )
    topo = fit.topology
    per_volume = 2 if fit.patches % 2 == 0 and fit.patches >= 4 else 1
    batch = fit.patches // per_volume
    steps = max(1, math.ceil(len(train) / batch))
    workers = min(8 if not cpu else 2, cpu_count or os.cpu_count() or 1)
    heads = max(0, min(3, topo.levels - 2)) if profile.deep_supervision else 0
    fits = "" if fit.fits else " It does NOT fit: even the smallest patch needs more; raise --memory-gb."

    # Intensity.
    is_ct = str(s["modality"]).strip().upper() == "CT"
    if is_ct:
        window, window_reason = _window(fp)

    data: dict[str, Any] = {
        "manifest": decide("data.manifest", s["manifest"], "the planned manifest, by absolute path"),
        "fold": decide(
            "data.fold",
            0,
            f"validation fold; the other folds train ({len(train)} training and "
            f"{len(labelled) - len(train)} validation case(s))",
        ),
        "fusion": decide(
            "data.fusion",
            "mean",
            "the raters' average: the soft target the JML/DML losses are made "
            "for (change it to compare fusion strategies)",
        ),
        "orientation": decide(
            "data.orientation", "RAS", "every case reoriented alike; spacing and patch size are in this axis order"
        ),
        "spacing": decide("data.spacing", spacing, spacing_reason),
        "patch_size": decide(
            "data.patch_size",
            list(fit.patch),
            (
                f"starts from about {profile.start_voxels ** (1 / dims):.0f}^{dims} voxels of equal extent in mm, "
                f"clipped to the median shape after resampling {_mm(median_shape)} and the smallest case "
                f"{_mm(smallest)} (the data module refuses a patch larger than a case): {start}; each axis a "
                f"multiple of its total stride {list(topo.divisor)}; "
                + (
                    f"shrunk, the axis covering most of the median shape first, until the estimate fits {budget:g} GiB"
                    if fit.shrunk
                    else f"fits {budget:g} GiB as it is"
                )
                + f" (estimate {fit.memory_gib:.2f} GiB).{fits}"
            ),
        ),
        "batch_size": decide(
            "data.batch_size",
            batch,
            (
                f"{fit.patches} patches per step ({'at least 2; ' if fit.patches == 2 else ''}limited by "
                f"{fit.batch_limit}) = batch_size volumes x samples_per_volume patches"
            ),
        ),
        "samples_per_volume": decide(
            "data.samples_per_volume",
            per_volume,
            ("2 patches from each loaded volume when the step holds an even number of at least 4, else 1"),
        ),
        "foreground_ratio": decide(
            "data.foreground_ratio",
            0.67,
            "two patches in three centred on foreground (as configs/kits.yaml): small structures are seen often enough",
        ),
        "num_workers": decide(
            "data.num_workers",
            workers,
            (f"loader processes: this machine's {cpu_count or os.cpu_count()} CPU core(s), at most {2 if cpu else 8}"),
        ),
        "intensity": decide(
            "data.intensity",
            "ct" if is_ct else "zscore",
            (
                "CT: Hounsfield units are comparable between scanners, so one window fits every case"
                if is_ct
                else f"modality {s['modality']!r} has no absolute scale: zero mean, unit variance per image and channel"
            ),
        ),
    }
    if is_ct:
        data["window"] = decide("data.window", window, window_reason)
    arrays = channels + max(1, int(s["raters"]["max"] if s.get("raters") else 1))
    needed = float(((np.prod(fp.ras("shape"), axis=1) + np.prod(resampled, axis=1)) * arrays * 4).max()) / 2**30
    if needed > 8.0:
        data["max_case_gb"] = decide(
            "data.max_case_gb",
            float(math.ceil(needed * 1.1)),
            (
                f"the largest case needs about {needed:.1f} GiB to resample (image and raters, in and out, fp32), more "
                "than the default 8"
            ),
        )

    filters = list(topo.filters)
    network = {
        "class_path": "monai.networks.nets.DynUNet",
        "init_args": {
            "spatial_dims": dims,
            "in_channels": channels,
            "out_channels": classes,
            "kernel_size": [list(k) for k in topo.kernels],
            "strides": [list(st) for st in topo.strides],
            "upsample_kernel_size": [list(st) for st in topo.strides[1:]],
            "filters": filters,
            "norm_name": "instance",
            "deep_supervision": heads > 0,
            "deep_supr_num": max(1, heads),
            "res_block": False,
        },
    }
    decide(
        "model.network",
        "monai.networks.nets.DynUNet",
        (
            f"{topo.levels} levels; strides {[list(st) for st in topo.strides]}: an axis is halved while its spacing "
            "is less than twice the finest and its patch side at least 8, so a coarse axis keeps stride 1; kernels "
            f"{[list(k) for k in topo.kernels]}: 3 where the spacing is less than twice the finest, else 1; filters "
            f"{filters} ({profile.base_filters} doubling per level, at most {profile.max_filters}); "
            f"{classes} output channels {s['class_names']}, {channels} input channel(s); "
            + (f"deep supervision on {heads} lower level(s)" if heads else "no deep supervision")
        ),
    )
    model: dict[str, Any] = {
        "network": network,
        "ce_weight": decide("model.ce_weight", 0.25, "soft-target cross-entropy keeps probabilities calibrated"),
        "jdt_weight": decide("model.jdt_weight", 0.75, "the Dice semimetric loss optimises overlap on soft targets"),
        "jdt": {"class_path": "medjdt.losses.DiceSemimetricLoss", "init_args": {"aggregation": "dataset"}},
        "lr": decide(
            "model.lr",
            0.01 if cpu else 0.001,
            "AdamW peak rate of configs/demo.yaml (short CPU runs)" if cpu else "AdamW peak rate of configs/kits.yaml",
        ),
        "weight_decay": decide("model.weight_decay", 3e-5, "as configs/kits.yaml"),
        "warmup_fraction": decide("model.warmup_fraction", 0.05 if cpu else 0.02, "linear warm-up, then poly decay"),
        "schedule": "poly",
        "sw_batch_size": decide("model.sw_batch_size", 2 if cpu else 4, "sliding-window patches per inference step"),
        "overlap": decide("model.overlap", 0.25 if cpu else 0.5, "sliding-window overlap: less on a CPU, for speed"),
        "blend_mode": "gaussian",
    }
    decide(
        "model.jdt",
        "DiceSemimetricLoss(aggregation=dataset)",
        "cardinalities summed over the batch before the index: optimises the dataset Dice",
    )
    trainer: dict[str, Any] = {
        "accelerator": decide(
            "trainer.accelerator",
            "cpu" if cpu else "gpu",
            "--cpu" if cpu else f"planned for a GPU with {memory_gb:g} GiB",
        ),
        "devices": 1,
        "precision": decide(
            "trainer.precision",
            "32-true" if cpu else "bf16-mixed",
            "fp32 on a CPU" if cpu else "bf16 activations halve the memory (the estimate counts 2 bytes a value)",
        ),
        "max_epochs": decide(
            "trainer.max_epochs",
            epochs,
            "--max-epochs"
            if max_epochs is not None
            else f"default of the {profile.name} plan (as configs/{'demo' if cpu else 'kits'}.yaml)",
        ),
        "check_val_every_n_epoch": decide(
            "trainer.check_val_every_n_epoch",
            min(10, max(1, epochs // 10)),
            "about ten validations per run, at most every 10 epochs",
        ),
        "log_every_n_steps": decide(
            "trainer.log_every_n_steps",
            min(50, steps),
            f"{steps} training step(s) per epoch ({len(train)} case(s), {batch} per batch)",
        ),
        "num_sanity_val_steps": 0,
        "callbacks": [{"class_path": "medjdt.models.EvaluationTables"}],
    }
    decide("checkpoint.monitor", "val/dice", "the best checkpoint by validation Dice")
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "checkpoint": {"monitor": "val/dice", "mode": "max"},
        "model": model,
        "data": data,
    }
    return Plan(config, decisions, fit)

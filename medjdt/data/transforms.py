"""MONAI transform chains applied after the (cached) preprocessing: patch sampling, augmentation, fusion.

Training: foreground = union of the raters' hard masks -> pad to the patch size -> ``samples_per_volume``
patches with a foreground/background ratio -> joint augmentation of image and every rater mask (flips,
small rotations/scales with nearest-neighbour masks, intensity scale/shift on the image) -> fusion
(``FuseRatersd``) -> optional label smoothing. Fusion runs after augmentation, so ``random`` selection
draws a new rater per patch and per epoch.

Unlabelled cases (semi-supervised training): pad -> ``samples_per_volume`` random patches -> the same spatial
augmentation as above (the *weak* view) -> a copy of the weak view gets intensity-only augmentation (Gaussian
noise, Gaussian blur, contrast, intensity scale/shift: the *strong* view). Both views come from one spatially
transformed patch, so they are aligned voxel for voxel: a teacher's prediction on the weak view is a target
for the student on the strong view without any inverse transform.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SelectItemsd,
    SpatialPadd,
)

from medjdt.labels import FuseRatersd, SmoothLabelsd

# Augmentation strengths (nnU-Net-like, milder): rotations up to 15 degrees and scaling up to 10 %
# on 25 % of the patches, because resampling a 96^3 patch costs far more than the rest of the chain.
AFFINE_PROB = 0.25
MAX_ROTATION_RAD = math.pi / 12
MAX_SCALE = 0.1
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1
# Strong view of unlabelled patches (intensities in CT window units of [0, 1], or z-scores): each operation
# on half of the patches. Noise of 0.05 is about 25 HU in a 500 HU window.
STRONG_PROB = 0.5
STRONG_NOISE_STD = 0.05
STRONG_BLUR_SIGMA = (0.5, 1.0)
STRONG_GAMMA = (0.7, 1.5)
STRONG_SCALE = 0.2
STRONG_SHIFT = 0.1


class RaterUniond(MapTransform):
    """Union of the raters' hard foreground: ``(R, *spatial)`` labels -> ``(1, *spatial)`` uint8 in ``output_key``."""

    def __init__(self, keys: KeysCollection = "raters", output_key: str = "foreground"):
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = (torch.as_tensor(d[key]) > 0).any(dim=0, keepdim=True).to(torch.uint8)
        return d


def spatial_augmentations(keys: Sequence[str], modes: Sequence[str], spatial_dims: int) -> list[Any]:
    """Random flips on every axis and a random small rotation/scaling, applied identically to ``keys``.

    ``modes`` is the interpolation of each key (``"bilinear"`` for images, ``"nearest"`` for label maps).
    """
    keys = list(keys)
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    n_angles = 1 if spatial_dims == 2 else 3
    affine = RandAffined(
        keys=keys,
        prob=AFFINE_PROB,
        rotate_range=(MAX_ROTATION_RAD,) * n_angles,
        scale_range=(MAX_SCALE,) * spatial_dims,
        mode=tuple(modes),
        padding_mode="border",  # the same for every key, so padded regions stay consistent pairs
    )
    return [*flips, affine]


def augmentations(spatial_dims: int) -> list[Any]:
    """Joint spatial augmentation of ``image`` and ``raters`` plus intensity augmentation of ``image``."""
    intensity = [
        RandScaleIntensityd(keys="image", factors=INTENSITY_SCALE, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=INTENSITY_SHIFT, prob=0.5),
    ]
    return [*spatial_augmentations(["image", "raters"], ["bilinear", "nearest"], spatial_dims), *intensity]


def strong_augmentations(key: str) -> list[Any]:
    """Intensity-only augmentation of ``key`` (no voxel moves): noise, blur, brightness, contrast, shift."""
    return [
        RandGaussianNoised(keys=key, prob=STRONG_PROB, std=STRONG_NOISE_STD),
        RandGaussianSmoothd(
            keys=key, prob=STRONG_PROB, sigma_x=STRONG_BLUR_SIGMA, sigma_y=STRONG_BLUR_SIGMA, sigma_z=STRONG_BLUR_SIGMA
        ),
        RandScaleIntensityd(keys=key, factors=STRONG_SCALE, prob=STRONG_PROB),
        RandAdjustContrastd(keys=key, prob=STRONG_PROB, gamma=STRONG_GAMMA),
        RandShiftIntensityd(keys=key, offsets=STRONG_SHIFT, prob=STRONG_PROB),
    ]


def train_transform(
    *,
    num_classes: int,
    spatial_dims: int,
    patch_size: Sequence[int],
    samples_per_volume: int,
    foreground_ratio: float,
    fusion: str,
    label_smoothing: float,
    smoothing_mode: str,
    augment: bool,
) -> Compose:
    """Chain from a preprocessed case ``{"image": (K, *spatial), "raters": (R, *spatial), ...}`` to a list of
    ``samples_per_volume`` dicts ``{"image": (K, *patch) float32, "label": (C, *patch) float32}``."""
    patch = tuple(int(p) for p in patch_size)
    steps: list[Any] = [
        # Patches need no geometry metadata; plain tensors avoid MetaTensor bookkeeping in every transform.
        EnsureTyped(keys=["image", "raters"], track_meta=False),
        RaterUniond(keys="raters", output_key="foreground"),
        SpatialPadd(keys=["image", "raters", "foreground"], spatial_size=patch, mode="constant"),
        RandCropByPosNegLabeld(
            keys=["image", "raters"],
            label_key="foreground",
            spatial_size=patch,
            pos=foreground_ratio,
            neg=1.0 - foreground_ratio,
            num_samples=samples_per_volume,
        ),
        DeleteItemsd(keys="foreground"),
    ]
    if augment:
        steps += augmentations(spatial_dims)
    steps += [
        CastToTyped(keys="raters", dtype=torch.uint8),  # nearest-neighbour resampling returned float
        FuseRatersd(keys="raters", method=fusion, num_classes=num_classes, output_key="label"),
    ]
    if label_smoothing > 0:
        steps.append(SmoothLabelsd(keys="label", epsilon=label_smoothing, mode=smoothing_mode))
    steps += [
        SelectItemsd(keys=["image", "label"]),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def unlabelled_transform(
    *, spatial_dims: int, patch_size: Sequence[int], samples_per_volume: int, augment: bool
) -> Compose:
    """Chain from a preprocessed unlabelled case ``{"image": (K, *spatial), ...}`` to a list of
    ``samples_per_volume`` dicts ``{"weak": (K, *patch) float32, "strong": (K, *patch) float32}``.

    Patches are drawn uniformly (there is no foreground to centre on). ``weak`` is the patch after the shared
    spatial augmentation (when ``augment``); ``strong`` is the same patch after :func:`strong_augmentations`,
    so the two views are aligned voxel for voxel.
    """
    patch = tuple(int(p) for p in patch_size)
    steps: list[Any] = [
        EnsureTyped(keys="image", track_meta=False),
        SpatialPadd(keys="image", spatial_size=patch, mode="constant"),
        RandSpatialCropSamplesd(keys="image", roi_size=patch, num_samples=samples_per_volume, random_size=False),
    ]
    if augment:
        steps += spatial_augmentations(["image"], ["bilinear"], spatial_dims)
    steps += [
        CopyItemsd(keys="image", times=2, names=["weak", "strong"]),
        *strong_augmentations("strong"),
        SelectItemsd(keys=["weak", "strong"]),
        EnsureTyped(keys=["weak", "strong"], dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def eval_transform(with_raters: bool = True) -> Compose:
    """Whole-volume chain: ``{"image": MetaTensor (K, *spatial), "raters": (R, *spatial) int64, "case_id": str}``
    (without ``raters`` when ``with_raters`` is false, for prediction)."""
    keys = ["image", "raters", "case_id"] if with_raters else ["image", "case_id"]
    steps: list[Any] = [SelectItemsd(keys=keys)]
    if with_raters:
        steps.append(CastToTyped(keys="raters", dtype=torch.long))
    return Compose(steps)

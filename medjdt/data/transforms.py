"""MONAI transform chains applied after the (cached) preprocessing: patch sampling, augmentation, fusion.

Training: foreground = union of the raters' hard masks -> pad to the patch size -> ``samples_per_volume``
patches with a foreground/background ratio -> joint augmentation of image and every rater mask (flips,
small rotations/scales with nearest-neighbour masks, intensity scale/shift on the image) -> fusion
(``FuseRatersd``) -> optional label smoothing. Fusion runs after augmentation, so ``random`` selection
draws a new rater per patch and per epoch.
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
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
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


def augmentations(spatial_dims: int) -> list[Any]:
    """Joint spatial augmentation of ``image`` and ``raters`` plus intensity augmentation of ``image``."""
    keys = ["image", "raters"]
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    n_angles = 1 if spatial_dims == 2 else 3
    affine = RandAffined(
        keys=keys,
        prob=AFFINE_PROB,
        rotate_range=(MAX_ROTATION_RAD,) * n_angles,
        scale_range=(MAX_SCALE,) * spatial_dims,
        mode=("bilinear", "nearest"),
        padding_mode="border",  # the same for image and raters, so padded regions stay consistent pairs
    )
    intensity = [
        RandScaleIntensityd(keys="image", factors=INTENSITY_SCALE, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=INTENSITY_SHIFT, prob=0.5),
    ]
    return [*flips, affine, *intensity]


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


def eval_transform(with_raters: bool = True) -> Compose:
    """Whole-volume chain: ``{"image": MetaTensor (K, *spatial), "raters": (R, *spatial) int64, "case_id": str}``
    (without ``raters`` when ``with_raters`` is false, for prediction)."""
    keys = ["image", "raters", "case_id"] if with_raters else ["image", "case_id"]
    steps: list[Any] = [SelectItemsd(keys=keys)]
    if with_raters:
        steps.append(CastToTyped(keys="raters", dtype=torch.long))
    return Compose(steps)

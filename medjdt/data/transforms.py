"""MONAI transform chains applied after the (cached) preprocessing: patch sampling, augmentation, fusion.

Training, per-patch fusion (``mean``, ``majority``, ``random``): foreground = union of the raters'
hard masks -> pad to the patch size -> ``samples_per_volume`` patches with a foreground/background ratio ->
joint augmentation of image and every rater mask (flips, small rotations/scales with nearest-neighbour masks,
intensity scale/shift on the image) -> fusion of the patch's raters (``FuseRatersd``) -> optional label
smoothing. Fusion runs after augmentation, so ``random`` selection draws a new rater per patch and per epoch.

Training, whole-case fusion (``staple``, ``weighted``, see :mod:`medjdt.data.case_fusion`): the loaded case
already holds the soft target ``label`` fused once on the whole preprocessed case. Foreground = union of the
raters' masks (the same patch centring as above) -> pad -> patches of image and target -> the same joint
augmentation, with the target interpolated bilinearly (a convex combination of probability vectors is one)
-> the background channel is set to 1 minus the other channels (:class:`FillBackgroundd`), so voxels padded
with zeros become pure background -> optional label smoothing.

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

from medjdt.data.case_fusion import CASE_FUSION_METHODS
from medjdt.labels import FuseRatersd, SmoothLabelsd

# Augmentation strengths (nnU-Net-like, milder): rotations up to 15 degrees and scaling up to 10 %
# on 25 % of the patches, because resampling a 96^3 patch costs far more than the rest of the chain.
AFFINE_PROB = 0.25
MAX_ROTATION_RAD = math.pi / 12
MAX_SCALE = 0.1
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1
# Largest amount by which the foreground channels of an interpolated soft target may sum above 1 (float32
# rounding of a convex combination); more means the input was not a soft target.
SIMPLEX_ATOL = 1e-4
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
            # labels are >= 0: the largest label over raters, clamped to 1, is the union (a max over the rater
            # axis is far cheaper on CPUs than a comparison to a bool tensor followed by any())
            labels = torch.as_tensor(d[key])
            d[self.output_key] = labels.amax(dim=0, keepdim=True).clamp_(0, 1).to(torch.uint8)
        return d


class FillBackgroundd(MapTransform):
    """Set channel 0 (background) of soft targets ``(C, *spatial)`` to 1 minus the sum of the other channels.

    Inside the volume an interpolated soft target already sums to 1, so this only removes rounding; where
    padding filled every channel with 0 (``SpatialPad``, zero-padded resampling) the voxel becomes pure
    background ``[1, 0, ..., 0]`` instead of an all-zero vector. The result replaces the input as a float32
    tensor.

    Raises:
        ValueError: a target that is not floating point with ``C >= 2`` channels, or whose foreground channels
            are negative or sum above 1 by more than ``SIMPLEX_ATOL`` (not a soft target).
    """

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each target in a copy of ``data`` by the completed one."""
        d = dict(data)
        for key in self.key_iterator(d):
            target = torch.as_tensor(d[key])
            if not target.is_floating_point() or target.ndim < 3 or target.shape[0] < 2:
                raise ValueError(f"{key!r} must be a floating soft target (C >= 2, *spatial), got {target.dtype} "
                                 f"{list(target.shape)}")
            foreground = target[1:].float()
            total = foreground.sum(0)
            if foreground.min() < -SIMPLEX_ATOL or total.max() > 1 + SIMPLEX_ATOL:
                raise ValueError(
                    f"{key!r} is not a soft target: foreground channels range over [{float(foreground.min())}, "
                    f"{float(foreground.max())}] and sum up to {float(total.max())}"
                )
            # Rounding only (checked above): keeps every value in [0, 1] and the sum exactly 1.
            foreground = foreground.clamp(0, 1)
            total = foreground.sum(0, keepdim=True)
            d[key] = torch.cat([(1 - total).clamp_min(0), foreground / total.clamp_min(1)])
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


def augmentations(spatial_dims: int, label_key: str = "raters", label_mode: str = "nearest") -> list[Any]:
    """Joint spatial augmentation of ``image`` and ``label_key`` plus intensity augmentation of ``image``.

    ``label_mode`` is ``"nearest"`` for hard rater masks, ``"bilinear"`` for a soft target.
    """
    intensity = [
        RandScaleIntensityd(keys="image", factors=INTENSITY_SCALE, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=INTENSITY_SHIFT, prob=0.5),
    ]
    return [*spatial_augmentations(["image", label_key], ["bilinear", label_mode], spatial_dims), *intensity]


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
    """Chain from a preprocessed case to a list of ``samples_per_volume`` dicts
    ``{"image": (K, *patch) float32, "label": (C, *patch) float32}``.

    Input: ``{"image": (K, *spatial), "raters": (R, *spatial), ...}``; for a whole-case fusion method
    (``fusion`` in ``CASE_FUSION_METHODS``) also ``"label"``: the case's fused soft target ``(C, *spatial)``
    (see :class:`medjdt.data.case_fusion.CaseFusedTargets`), which is cropped and augmented with the image
    instead of fusing the raters of every patch.
    """
    patch = tuple(int(p) for p in patch_size)
    whole_case = fusion in CASE_FUSION_METHODS
    # The keys that move with the image: the fused target, or the raters to be fused per patch.
    moved = ["image", "label"] if whole_case else ["image", "raters"]
    steps: list[Any] = [
        # Patches need no geometry metadata; plain tensors avoid MetaTensor bookkeeping in every transform.
        EnsureTyped(keys=["image", "raters", "label"] if whole_case else ["image", "raters"], track_meta=False),
        RaterUniond(keys="raters", output_key="foreground"),
    ]
    if whole_case:
        steps.append(DeleteItemsd(keys="raters"))  # only their union (patch centring) is needed from here on
    steps += [
        SpatialPadd(keys=[*moved, "foreground"], spatial_size=patch, mode="constant"),
        RandCropByPosNegLabeld(
            keys=moved,
            label_key="foreground",
            spatial_size=patch,
            pos=foreground_ratio,
            neg=1.0 - foreground_ratio,
            num_samples=samples_per_volume,
        ),
        DeleteItemsd(keys="foreground"),
    ]
    if whole_case:
        if augment:
            steps += augmentations(spatial_dims, label_key="label", label_mode="bilinear")
        steps.append(FillBackgroundd(keys="label"))  # zero padding -> background, rounding -> sum exactly 1
    else:
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

"""Deterministic preprocessing of a loaded case: orientation, spacing, intensity (the cached part of the pipeline).

Image and rater masks move together: orientation and resampling are applied to both (image interpolated
bilinearly, each rater mask nearest-neighbour, before fusion); the intensity step touches the image only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialResample,
)
from monai.utils import convert_to_numpy

from medjdt.validation import check_choice, check_number

INTENSITY_MODES = ("ct", "zscore")


@dataclass(frozen=True)
class PreprocessSettings:
    """Preprocessing choices; they (with :data:`VERSION`) key the on-disk cache.

    Args:
        orientation: axis codes to reorient to (``"RAS"``; the first ``spatial_dims`` letters are used in 2D),
            or ``None`` to keep the stored orientation.
        spacing: target voxel size in mm, one value per spatial axis, or ``None`` to keep the stored grid.
        intensity: ``"ct"``: clip to ``window`` (HU) and scale it to [0, 1] (e.g. [-200, 300] for KiTS,
            [-60, 140] for LiTS tumour work); ``"zscore"``: per-image, per-channel zero mean / unit variance (MRI).
        window: ``(low, high)`` HU window for ``"ct"``; ignored for ``"zscore"``.
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, ...] | None = None
    intensity: str = "ct"
    window: tuple[float, float] = (-200.0, 300.0)

    VERSION = 1

    def __post_init__(self) -> None:
        check_choice("intensity", self.intensity, INTENSITY_MODES)
        window = tuple(check_number("window", w) for w in self.window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window!r}")
        object.__setattr__(self, "window", window)
        if self.spacing is not None:
            spacing = tuple(check_number("spacing", s, low=0, low_inclusive=False) for s in self.spacing)
            object.__setattr__(self, "spacing", spacing)
        if self.orientation is not None and (
            len(self.orientation) != 3 or set(self.orientation.upper()) - set("RLAPSI")
        ):
            raise ValueError(f"orientation must be three axis codes such as 'RAS', got {self.orientation!r}")

    def check_dims(self, spatial_dims: int) -> None:
        """Raise ``ValueError`` if ``spacing`` does not have one value per spatial axis."""
        if self.spacing is not None and len(self.spacing) != spatial_dims:
            raise ValueError(f"spacing {list(self.spacing)} must have {spatial_dims} values for {spatial_dims}D data")

    def key(self) -> dict[str, Any]:
        """A JSON-able description of the settings (including the preprocessing version)."""
        return {**asdict(self), "version": self.VERSION}


def preprocessing_transform(settings: PreprocessSettings, spatial_dims: int) -> Compose:
    """The MONAI transform chain on ``{"image": (K, *spatial), "raters": (R, *spatial)}`` MetaTensors."""
    settings.check_dims(spatial_dims)
    keys = ["image", "raters"]
    steps: list[Any] = []
    if settings.orientation is not None:
        # NIfTI affines are RAS: the axis labels are MONAI's historical (and nibabel's) convention.
        axcodes = settings.orientation.upper()[:spatial_dims]
        steps.append(Orientationd(keys=keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if settings.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=settings.spacing, mode=("bilinear", "nearest")))
    if settings.intensity == "ct":
        low, high = settings.window
        steps.append(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(NormalizeIntensityd(keys="image", channel_wise=True))
    return Compose(steps)


def preprocess_case(case: dict[str, Any], settings: PreprocessSettings, spatial_dims: int) -> dict[str, Any]:
    """Apply :func:`preprocessing_transform` to a loaded case (see :func:`medjdt.data.io.load_case`).

    Returns a new dict: ``"image"`` float32 ``(K, *spatial')``, ``"raters"`` uint8 ``(R, *spatial')`` on the
    preprocessed grid (``spatial'``), plus the input's other keys and ``"original_affine"`` (4x4) and
    ``"original_shape"`` (the input grid), which :func:`restore_original_grid` uses to map outputs back.
    """
    image = case["image"]
    out = preprocessing_transform(settings, spatial_dims)({"image": image, "raters": case["raters"]})
    result = dict(case)
    result["image"] = out["image"].to(torch.float32)
    result["raters"] = out["raters"].round().to(torch.uint8)
    result["original_affine"] = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    result["original_shape"] = [int(s) for s in image.shape[1:]]
    return result


def restore_original_grid(
    prediction: torch.Tensor | np.ndarray, image: MetaTensor, mode: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Map a network output on the preprocessed grid back to the input image's original grid and affine.

    Args:
        prediction: ``(C, *spatial)`` or ``(1, C, *spatial)`` values on the grid of ``image``.
        image: the preprocessed image as delivered in a val/test/predict batch, ``(1, K, *spatial)`` or
            ``(K, *spatial)`` ``MetaTensor`` whose meta holds ``affine`` (preprocessed grid),
            ``original_affine`` and ``spatial_shape`` (the stored grid).
        mode: interpolation, ``"bilinear"`` for probabilities/logits or ``"nearest"`` for labels.

    Returns:
        ``(array (C, *orig_spatial) float32, affine 4x4 float64)``, ready for :func:`medjdt.data.io.write_nifti`
        (after moving channels last).

    The preprocessing steps (reorientation, resampling) are affine changes of the grid, so one explicit
    resampling from the preprocessed affine to the original affine and shape undoes them.
    """
    if not isinstance(image, MetaTensor):
        raise ValueError(f"image must be a MetaTensor carrying its affine, got {type(image).__name__}")
    meta = image.meta
    for key in ("original_affine", "spatial_shape"):
        if key not in meta:
            raise ValueError(f"image meta lacks {key!r}; pass the MetaTensor delivered by SegmentationDataModule")

    def unbatch(value: Any) -> np.ndarray:
        arr = np.asarray(convert_to_numpy(value))
        return arr[0] if image.is_batch else arr

    affine = unbatch(image.affine).astype(np.float64)
    original_affine = unbatch(meta["original_affine"]).astype(np.float64)
    original_shape = [int(s) for s in unbatch(meta["spatial_shape"]).reshape(-1)]
    spatial_dims = len(original_shape)
    pred = prediction.as_tensor() if isinstance(prediction, MetaTensor) else torch.as_tensor(prediction)
    if pred.ndim == spatial_dims + 2:
        if pred.shape[0] != 1:
            raise ValueError(f"prediction batch must have size 1, got shape {tuple(pred.shape)}")
        pred = pred[0]
    grid = tuple(image.shape[-spatial_dims:])
    if pred.ndim != spatial_dims + 1 or tuple(pred.shape[1:]) != grid:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} does not match the image grid {grid}")
    src = MetaTensor(pred.detach().to("cpu", torch.float32), affine=torch.as_tensor(affine))
    resample = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)
    out = resample(src, dst_affine=torch.as_tensor(original_affine), spatial_size=original_shape)
    return convert_to_numpy(out).astype(np.float32), np.asarray(original_affine, dtype=np.float64)


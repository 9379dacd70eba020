"""The KiTS challenge's own scoring (KiTS21/KiTS23): Dice and surface Dice on hierarchical evaluation regions.

Labels of a KiTS label map: 0 background, 1 kidney, 2 tumor, 3 cyst. The challenge does not score the labels one by
one but three nested *hierarchical evaluation regions* (HECs, :data:`KITS_REGIONS`): ``kidney_and_mass`` (labels
1, 2, 3), ``mass`` (2, 3) and ``tumor`` (2). A voxel predicted as cyst where the reference says tumor therefore
counts for ``kidney_and_mass`` and ``mass`` but not for ``tumor``.

For each region the score is the Dice ``2|A∩B| / (|A| + |B|)`` and the surface Dice (normalised surface distance,
Nikolov et al. 2021) at the region's tolerance in mm (:data:`KITS_TOLERANCES_MM`): the fraction of the surface area
of both masks that lies within the tolerance of the other mask's surface. Surfaces are made of surfels on the
voxel-corner lattice with the areas of DeepMind's ``surface-distance`` package (MONAI's
``compute_surface_dice(..., use_subvoxels=True)``), and distances are Euclidean in mm with the given voxel spacing.
Empty rule: a region empty in both prediction and reference scores Dice = surface Dice = 1; empty in exactly one
of them, both are 0. The challenge averages each metric over cases and regions; :func:`kits_scores` gives one
case's per-region scores and the means over its three regions.

Both masks are cropped to the bounding box of their union (plus one voxel) before surface distances are computed,
so a 512 x 512 x 600 volume with a small tumour costs about as much as the tumour's neighbourhood.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from medjdt.validation import check_choice, check_number

__all__ = [
    "KITS_LABELS",
    "KITS_REGIONS",
    "KITS_TOLERANCES_MM",
    "kits_region_masks",
    "kits_region_scores",
    "kits_scores",
]

KITS_LABELS: dict[int, str] = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
"""The labels of a KiTS21/KiTS23 label map."""

KITS_REGIONS: dict[str, tuple[int, ...]] = {
    "kidney_and_mass": (1, 2, 3),
    "mass": (2, 3),
    "tumor": (2,),
}
"""The challenge's hierarchical evaluation regions: region name -> labels it is the union of."""

KITS_TOLERANCES_MM: dict[str, float] = {
    "kidney_and_mass": 1.0330772532390826,
    "mass": 1.1328796488598762,
    "tumor": 1.1498198361434828,
}
"""Surface Dice tolerance of each region in mm (the challenge's values)."""

_MAX_LABEL = max(KITS_LABELS)
_CROP_MARGIN = 1  # voxels kept around the union's bounding box; the surfel lattice needs one layer of background
_SHOWN_VALUES = 10  # offending label values named in an error message


def kits_region_masks(labels: np.ndarray | torch.Tensor, region: str) -> np.ndarray | torch.Tensor:
    """Boolean mask of one hierarchical evaluation region.

    Args:
        labels: ``(*spatial)`` integer KiTS label map (numpy array or torch tensor, any integer dtype).
        region: a key of :data:`KITS_REGIONS`: ``"kidney_and_mass"``, ``"mass"`` or ``"tumor"``.

    Returns:
        ``(*spatial)`` bool mask, True where the label belongs to the region: a numpy array for a numpy input, a
        torch tensor on the input's device for a tensor input.

    Raises:
        ValueError: if ``region`` is not a KiTS region, or ``labels`` is not an integer array or tensor.
    """
    check_choice("region", region, tuple(KITS_REGIONS), where="kits_region_masks")
    _check_integer_labels(labels, "labels")
    members = KITS_REGIONS[region]
    mask = labels == members[0]
    for label in members[1:]:
        mask |= labels == label
    return mask


def kits_region_scores(
    prediction_mask: np.ndarray | torch.Tensor,
    reference_mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | np.ndarray | torch.Tensor,
    tolerance_mm: float,
) -> tuple[float, float]:
    """Dice and surface Dice of one region, with the KiTS empty rule.

    Args:
        prediction_mask: ``(X, Y, Z)`` bool mask of the region in the prediction (numpy array or torch tensor).
        reference_mask: ``(X, Y, Z)`` bool mask of the region in the reference.
        spacing: voxel size in mm along each of the three array axes (3 finite positive numbers).
        tolerance_mm: surface Dice tolerance in mm (finite, >= 0); a surfel counts when its distance to the other
            surface is at most this.

    Returns:
        ``(dice, surface_dice)`` as floats in [0, 1]: ``(1.0, 1.0)`` when both masks are empty, ``(0.0, 0.0)`` when
        exactly one is.

    Raises:
        ValueError: if a mask is not a bool array or tensor, the masks are not 3-D or differ in shape, or
            ``spacing`` or ``tolerance_mm`` is invalid.
    """
    pred = _to_numpy(prediction_mask, "prediction_mask")
    ref = _to_numpy(reference_mask, "reference_mask")
    for name, mask in (("prediction_mask", pred), ("reference_mask", ref)):
        if mask.dtype != np.bool_:
            raise ValueError(f"{name} must be a bool mask, got dtype {mask.dtype}.")
    _check_shapes(pred, ref, "prediction_mask", "reference_mask")
    spacing_mm = _check_spacing(spacing, "kits_region_scores")
    tolerance = check_number("tolerance_mm", tolerance_mm, low=0, where="kits_region_scores")
    return _region_scores(pred, ref, spacing_mm, tolerance)


def kits_scores(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | np.ndarray | torch.Tensor,
) -> dict[str, float]:
    """KiTS challenge scores of one case: Dice and surface Dice of each hierarchical region, and their means.

    Args:
        prediction: ``(X, Y, Z)`` integer label map (0 background, 1 kidney, 2 tumor, 3 cyst), numpy array or
            torch tensor of any integer dtype.
        reference: ``(X, Y, Z)`` integer label map on the same grid.
        spacing: voxel size in mm along each array axis, in the order of the array's axes (3 finite positive
            numbers). For an array from SimpleITK's ``GetArrayFromImage`` this is ``image.GetSpacing()[::-1]``.

    Returns:
        ``{"kits_dice/<region>": ..., "kits_sd/<region>": ...}`` for each region of :data:`KITS_REGIONS`, then
        ``"kits_dice"`` and ``"kits_sd"``, the means over the three regions; all floats in [0, 1].

    Raises:
        ValueError: if the maps are not 3-D, differ in shape, are not integer, hold labels outside 0..3, or
            ``spacing`` is not 3 finite positive numbers.
    """
    pred = _to_numpy(prediction, "prediction")
    ref = _to_numpy(reference, "reference")
    for name, labels in (("prediction", pred), ("reference", ref)):
        _check_integer_labels(labels, name)
    _check_shapes(pred, ref, "prediction", "reference")
    for name, labels in (("prediction", pred), ("reference", ref)):
        _check_label_values(labels, name)
    spacing_mm = _check_spacing(spacing, "kits_scores")

    # Every region lies inside the union of the non-background voxels: crop once to it, then per region.
    box = _bounding_box((pred != 0) | (ref != 0))
    if box is not None:
        pred, ref = pred[box], ref[box]
    dice_scores: dict[str, float] = {}
    sd_scores: dict[str, float] = {}
    for region, tolerance in KITS_TOLERANCES_MM.items():
        dice_scores[region], sd_scores[region] = _region_scores(
            kits_region_masks(pred, region), kits_region_masks(ref, region), spacing_mm, tolerance
        )
    scores = {f"kits_dice/{region}": value for region, value in dice_scores.items()}
    scores.update({f"kits_sd/{region}": value for region, value in sd_scores.items()})
    scores["kits_dice"] = float(np.mean(list(dice_scores.values())))
    scores["kits_sd"] = float(np.mean(list(sd_scores.values())))
    return scores


def _region_scores(pred: np.ndarray, ref: np.ndarray, spacing: list[float], tolerance: float) -> tuple[float, float]:
    """Dice and surface Dice of validated ``(X, Y, Z)`` bool masks, with the KiTS empty rule."""
    pred_count, ref_count = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if pred_count == 0 and ref_count == 0:
        return 1.0, 1.0
    if pred_count == 0 or ref_count == 0:
        return 0.0, 0.0
    box = _bounding_box(pred | ref)
    pred, ref = pred[box], ref[box]
    dice = 2.0 * np.count_nonzero(pred & ref) / (pred_count + ref_count)
    return float(dice), _surface_dice(pred, ref, spacing, tolerance)


def _surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: list[float], tolerance: float) -> float:
    """Surface Dice of two non-empty ``(X, Y, Z)`` bool masks at ``tolerance`` mm (DeepMind's surfel areas)."""
    from monai.metrics import compute_surface_dice  # heavy import, only needed here

    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own surface-distance code still passes; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_surface_dice(
            torch.from_numpy(np.ascontiguousarray(pred))[None, None],
            torch.from_numpy(np.ascontiguousarray(ref))[None, None],
            class_thresholds=[tolerance],
            include_background=True,
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(value[0, 0])


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the bounding box of a bool mask's True voxels grown by the crop margin; None if it has none.

    Two passes over the volume: one reduction over the last axis, one over the others.
    """
    if mask.ndim != 3:  # callers validate 3-D inputs; guard the axis arithmetic below
        raise ValueError(f"expected a 3-D mask, got shape {tuple(mask.shape)}.")
    first_two = mask.any(axis=2)
    profiles = (first_two.any(axis=1), first_two.any(axis=0), mask.any(axis=(0, 1)))
    slices = []
    for profile in profiles:
        hits = np.flatnonzero(profile)
        if hits.size == 0:
            return None
        start = max(int(hits[0]) - _CROP_MARGIN, 0)
        stop = min(int(hits[-1]) + 1 + _CROP_MARGIN, profile.size)
        slices.append(slice(start, stop))
    return tuple(slices)


def _to_numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}.")


def _check_integer_labels(labels: object, name: str) -> None:
    if isinstance(labels, torch.Tensor):
        dtype = labels.dtype
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    elif isinstance(labels, np.ndarray):
        dtype = labels.dtype
        integer = bool(np.issubdtype(dtype, np.integer))
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(labels).__name__}.")
    if not integer:
        raise ValueError(f"{name} must be an integer label map, got dtype {dtype}.")


def _check_shapes(pred: np.ndarray, ref: np.ndarray, pred_name: str, ref_name: str) -> None:
    for name, x in ((pred_name, pred), (ref_name, ref)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D (X, Y, Z), got shape {tuple(x.shape)}.")
    if pred.shape != ref.shape:
        raise ValueError(f"{pred_name} shape {tuple(pred.shape)} does not match {ref_name} shape {tuple(ref.shape)}.")
    if pred.size == 0:
        raise ValueError(f"{pred_name} and {ref_name} are empty, shape {tuple(pred.shape)}.")


def _check_label_values(labels: np.ndarray, name: str) -> None:
    low, high = labels.min(), labels.max()
    if low >= 0 and high <= _MAX_LABEL:
        return
    bad = np.unique(labels[(labels < 0) | (labels > _MAX_LABEL)])
    shown = ", ".join(str(int(v)) for v in bad[:_SHOWN_VALUES]) + (", ..." if bad.size > _SHOWN_VALUES else "")
    raise ValueError(
        f"{name} holds labels [{shown}] outside the KiTS labels 0..{_MAX_LABEL} "
        "(0 background, 1 kidney, 2 tumor, 3 cyst)."
    )


def _check_spacing(spacing: object, where: str) -> list[float]:
    """``spacing`` as 3 floats after checking that it holds one finite positive number per array axis."""
    try:
        values = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: spacing must be 3 positive numbers in mm, got {spacing!r}") from None
    if values.shape != (3,):
        raise ValueError(f"{where}: spacing must be 3 numbers in mm (one per array axis), got {spacing!r}")
    return [
        check_number(f"spacing[{i}]", float(v), low=0, low_inclusive=False, where=where) for i, v in enumerate(values)
    ]

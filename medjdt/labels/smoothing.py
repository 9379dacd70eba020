"""Label smoothing: uniform, or only on class boundaries."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medjdt.labels._checks import SPATIAL_DIMS, as_tensor, check_label_values, check_num_classes, label_dtype
from medjdt.validation import check_choice, check_number, check_probability

SMOOTHING_MODES = ("uniform", "boundary")
_SUM_TOLERANCE = 1e-4


def _soft_target(target: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Validate ``target`` and return it as float32 ``(B, C, *spatial)``."""
    if target.dtype == torch.bool or not (target.is_floating_point() or target.is_complex()):
        # Hard labels (B, *spatial).
        if num_classes is None:
            raise ValueError(f"hard labels of shape {tuple(target.shape)} need num_classes")
        num_classes = check_num_classes(num_classes)
        if target.ndim - 1 not in SPATIAL_DIMS:
            raise ValueError(
                f"hard labels must have shape (B, *spatial) with 2 or 3 spatial dims, got {tuple(target.shape)}"
            )
        check_label_values(target, num_classes, "target")
        labels = target.to(label_dtype(num_classes))
        out = torch.empty((target.shape[0], num_classes, *target.shape[1:]), dtype=torch.float32, device=target.device)
        for c in range(num_classes):
            torch.eq(labels, c, out=out[:, c])
        return out
    if target.is_complex():
        raise ValueError(f"target has complex dtype {target.dtype}")
    if target.ndim - 2 not in SPATIAL_DIMS:
        raise ValueError(
            f"soft targets must have shape (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(target.shape)}"
        )
    if num_classes is not None and target.shape[1] != num_classes:
        raise ValueError(f"target has {target.shape[1]} channels but num_classes={num_classes}")
    if target.shape[1] < 2:
        raise ValueError(f"soft targets need C >= 2 channels, got shape {tuple(target.shape)}")
    target = target.to(torch.float32)
    if not torch.isfinite(target).all():
        raise ValueError("target contains NaN or infinite values")
    low, high = torch.aminmax(target)
    if low < 0 or high > 1:
        raise ValueError(f"soft target values must lie in [0, 1], got range [{low.item()}, {high.item()}]")
    error = (target.sum(dim=1) - 1).abs().max()
    if error > _SUM_TOLERANCE:
        raise ValueError(f"soft target must sum to 1 over classes (dim 1); largest deviation is {error.item():.3g}")
    return target


def check_smoothing_args(epsilon: Any, mode: Any, kernel_size: Any) -> tuple[float, int]:
    """``(epsilon, kernel_size)`` as ``(float, int)`` after checking the smoothing arguments (see
    :func:`smooth_labels`)."""
    check_choice("mode", mode, SMOOTHING_MODES, where="label smoothing")
    kernel_size = check_number("kernel_size", kernel_size, low=1, integer=True, where="label smoothing")
    if kernel_size % 2 == 0:
        raise ValueError(f"label smoothing: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    return check_probability("epsilon", epsilon, where="label smoothing"), kernel_size


def _max_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Maximum over the k x k (x k) neighbourhood of every voxel; ``x`` is ``(B, C, *spatial)`` float."""
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size, stride=1, padding=kernel_size // 2)


def smooth_labels(
    target: Any,
    epsilon: float,
    mode: str = "uniform",
    kernel_size: int = 3,
    ignore_mask: Any = None,
    *,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Label smoothing of hard or soft targets.

    A smoothed voxel becomes ``(1 - epsilon) * y + epsilon / C``.

    - ``mode="uniform"``: every voxel is smoothed.
    - ``mode="boundary"``: only voxels whose ``k x k`` (2D) or ``k x k x k`` (3D) neighbourhood contains another
      class are smoothed; interior voxels are unchanged. For soft targets "another class" means that some class
      probability varies within the neighbourhood (for one-hot targets the two agree). The image border is not a
      boundary.

    Voxels in ``ignore_mask`` are never smoothed; in boundary mode, neither is any voxel with an ignored voxel in
    its neighbourhood (the edge of an ignored region is not a class boundary).

    Args:
        target: hard labels ``(B, *spatial)`` (integer or bool dtype; needs ``num_classes``) or a one-hot/soft
            target ``(B, C, *spatial)`` (floating dtype, values in [0, 1] summing to 1 over ``C``); 2 or 3 spatial
            dims. The dtype decides which of the two it is.
        epsilon: smoothing strength in [0, 1].
        mode: ``"uniform"`` or ``"boundary"``.
        kernel_size: odd neighbourhood size ``k >= 1`` for boundary detection.
        ignore_mask: optional bool ``(B, *spatial)``; True marks ignored voxels.
        num_classes: number of classes ``C``; required for hard labels, checked against ``C`` for soft targets.

    Returns:
        float32 ``(B, C, *spatial)`` on the device of ``target``, a new tensor.

    Raises:
        ValueError: epsilon outside [0, 1], unknown mode, even or non-positive kernel size, bad labels, soft
            targets outside [0, 1] or not summing to 1, wrong shapes, ``ignore_mask`` of the wrong shape or dtype.
    """
    epsilon, kernel_size = check_smoothing_args(epsilon, mode, kernel_size)
    y = _soft_target(as_tensor(target, "target"), num_classes)
    batch_spatial = (y.shape[0], *y.shape[2:])

    if mode == "uniform":
        smooth = torch.ones(batch_spatial, dtype=torch.bool, device=y.device)
    else:
        spread = _max_filter(y, kernel_size) + _max_filter(-y, kernel_size)  # max - min per class
        smooth = (spread > 0).any(dim=1)
    if ignore_mask is not None:
        ignore = as_tensor(ignore_mask, "ignore_mask").to(y.device)
        if ignore.dtype != torch.bool:
            raise ValueError(f"ignore_mask must be a bool tensor, got dtype {ignore.dtype}")
        if tuple(ignore.shape) != batch_spatial:
            raise ValueError(f"ignore_mask has shape {tuple(ignore.shape)}, expected (B, *spatial) = {batch_spatial}")
        if mode == "boundary":
            ignore = _max_filter(ignore[:, None].to(torch.float32), kernel_size)[:, 0] > 0
        smooth &= ~ignore

    smoothed = y * (1.0 - epsilon) + epsilon / y.shape[1]
    return torch.where(smooth[:, None], smoothed, y)

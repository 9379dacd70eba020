"""Checks of the tensors the label sources (fusion, smoothing, distillation) receive: rater label maps, targets,
rater weights. Scalar arguments are checked with :mod:`medjdt.validation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medjdt.validation import check_number

SPATIAL_DIMS = (2, 3)


def check_num_classes(num_classes: Any) -> int:
    """Return ``num_classes`` as an ``int`` after checking it is an integer >= 2."""
    return check_number("num_classes", num_classes, low=2, integer=True)


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Return a numpy array or torch tensor as a plain ``torch.Tensor`` (no copy where possible).

    Tensor subclasses such as MONAI's ``MetaTensor`` are viewed as plain tensors so that the
    arithmetic below does not pay for (or propagate) their metadata handling.
    """
    if isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor)
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise ValueError(f"{name} has unsupported numpy dtype {x.dtype}")
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            # torch supports few ops on uint16/32/64; widen (values are range-checked later).
            if x.size and x.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{name} contains value {x.max()} that does not fit in int64")
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def label_dtype(num_classes: int) -> torch.dtype:
    """Smallest integer dtype used to hold class indices ``0 .. num_classes - 1``."""
    return torch.uint8 if num_classes <= 256 else torch.int64


def check_label_values(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise ``ValueError`` if ``labels`` holds NaN or values outside ``[0, num_classes)``.

    Whether floating-point labels are whole numbers is checked by :func:`as_label_stack`.
    """
    if labels.is_complex():
        raise ValueError(f"{name} has complex dtype {labels.dtype}; label maps must hold integer class indices")
    if labels.dtype == torch.bool:
        return
    low, high = torch.aminmax(labels)  # NaN propagates into both
    if torch.isnan(low.float()):
        raise ValueError(f"{name} contains NaN; label maps must hold integer class indices")
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} contains label {bad.item()} outside [0, {num_classes}) for num_classes={num_classes}")


def as_label_stack(raters: Any, num_classes: int) -> torch.Tensor:
    """Validate rater label maps and stack them into one integer tensor.

    Args:
        raters: integer label maps ``(R, *spatial)`` (numpy array or torch tensor; a MONAI
            ``MetaTensor`` is accepted) or a list/tuple of ``R`` arrays/tensors of shape ``(*spatial)``,
            with 2 or 3 spatial dims. Floating-point maps are accepted when every value is an integer.
        num_classes: number of classes ``C``; every label must lie in ``[0, C)``.

    Returns:
        Contiguous tensor ``(R, *spatial)`` of dtype ``label_dtype(num_classes)``; the input itself when it
        already has that dtype and layout.

    Raises:
        ValueError: zero raters, raters of different shapes or devices, wrong number of spatial dims, empty
            spatial extent, NaN / non-integer / out-of-range labels. The message names the offending rater.
    """
    stack = None
    if isinstance(raters, (list, tuple)):
        if len(raters) == 0:
            raise ValueError("raters is empty: at least one rater label map is needed")
        maps = [as_tensor(m, f"raters[{i}]") for i, m in enumerate(raters)]
        for i, m in enumerate(maps):
            if m.shape != maps[0].shape:
                raise ValueError(
                    f"raters have different shapes: raters[{i}] is {tuple(m.shape)} but raters[0] is "
                    f"{tuple(maps[0].shape)}"
                )
            if m.device != maps[0].device:
                raise ValueError(
                    f"raters are on different devices: raters[{i}] on {m.device}, raters[0] on {maps[0].device}"
                )
        stack_shape = (len(maps), *maps[0].shape)
    else:
        stack = as_tensor(raters, "raters")
        if stack.ndim >= 1 and stack.shape[0] == 0:
            raise ValueError(f"raters has shape {tuple(stack.shape)}: zero raters, at least one is needed")
        maps = list(stack.unbind(0)) if stack.ndim >= 1 else [stack]
        stack_shape = tuple(stack.shape)
    spatial = stack_shape[1:]
    if len(spatial) not in SPATIAL_DIMS:
        raise ValueError(
            f"raters must have shape (R, *spatial) with 2 or 3 spatial dims, got shape {tuple(stack_shape)}"
        )
    if min(spatial) == 0:
        raise ValueError(f"raters have an empty spatial extent: shape {tuple(stack_shape)}")

    dtype = label_dtype(num_classes)
    if stack is not None and stack.dtype == dtype:
        for i, m in enumerate(maps):
            check_label_values(m, num_classes, f"raters[{i}]")
        return stack.contiguous()
    out = torch.empty(stack_shape, dtype=dtype, device=maps[0].device)
    scratch = None
    for i, m in enumerate(maps):
        check_label_values(m, num_classes, f"raters[{i}]")
        out[i].copy_(m)
        if m.is_floating_point():
            # The copy truncated any fraction, so copying back reproduces m only if m holds whole numbers.
            if scratch is None or scratch.dtype != m.dtype:
                scratch = torch.empty_like(m)
            if not torch.equal(scratch.copy_(out[i]), m):
                value = m[m != torch.round(m)][0].item()
                raise ValueError(
                    f"raters[{i}] contains non-integer value {value}; label maps must hold integer class indices"
                )
    return out


def check_weights(weights: Any, num_raters: int | None = None) -> torch.Tensor:
    """Validate explicit rater weights and return them normalised to sum 1, as float64 ``(R,)``.

    Raises:
        ValueError: not 1-D, wrong length (when ``num_raters`` is given), negative, non-finite or all zero.
    """
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        weights = np.asarray(weights, dtype=np.float64)
    w = as_tensor(weights, "weights").to(torch.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence with one weight per rater, got shape {tuple(w.shape)}")
    if num_raters is not None and w.numel() != num_raters:
        raise ValueError(f"got {w.numel()} weights for {num_raters} raters")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w / w.sum()

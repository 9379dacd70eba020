"""Input checks and target parsing shared by the losses.

Every loss accepts the same inputs: logits (or probabilities) ``(B, C, *spatial)`` with 2 or 3 spatial
dims, a target that is either hard labels ``(B, *spatial)`` (integer class indices) or soft labels
``(B, C, *spatial)`` (floats in [0, 1]), and an optional bool ``mask`` ``(B, *spatial)`` of voxels to keep.
The helpers here raise ``ValueError`` naming the offending shape, dtype or value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_ACTIVATIONS = ("softmax", "sigmoid", None)


@dataclass(frozen=True)
class PreparedTarget:
    """A validated target in one of two forms, plus the voxels that count.

    Exactly one of ``labels`` and ``soft`` is set:

    - ``labels``: ``(B, *spatial)`` int64 class indices in ``[0, C)``; voxels excluded by ``mask`` hold 0.
    - ``soft``: ``(B, C, *spatial)`` floating values in [0, 1].

    ``mask``: ``(B, *spatial)`` bool, True for voxels that count, or None when every voxel counts.
    """

    labels: torch.Tensor | None
    soft: torch.Tensor | None
    mask: torch.Tensor | None


def check_activation(activation: str | None) -> None:
    """Raise ``ValueError`` unless ``activation`` is ``"softmax"``, ``"sigmoid"`` or None."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def check_ignore_index(ignore_index: int | None) -> None:
    """Raise ``ValueError`` unless ``ignore_index`` is None or an int."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")


def check_logits(logits: torch.Tensor, activation: str | None) -> tuple[float, float] | None:
    """Check a prediction tensor ``(B, C, *spatial)`` with 2 or 3 spatial dims.

    Logits must be finite floats; with ``activation=None`` the input holds probabilities and must lie in
    [0, 1]. ``"softmax"`` needs at least 2 channels (a softmax over one channel is constantly 1).

    Returns:
        The smallest and largest logit (one pass over the data, used to pick a cheaper softmax), or None for
        probabilities (``activation=None``).
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim not in (4, 5):
        raise ValueError(
            f"logits must have shape (B, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if activation == "softmax" and logits.shape[1] < 2:
        raise ValueError(
            f"activation='softmax' needs at least 2 channels, got logits of shape {tuple(logits.shape)}; "
            "use activation='sigmoid' for a single foreground channel"
        )
    if activation is None:
        check_unit_interval(logits, "probabilities (activation=None)")
        return None
    if logits.numel() == 0:
        return 0.0, 0.0
    # NaN propagates through aminmax, and an infinite value is the minimum or the maximum
    low, high = torch.stack(torch.aminmax(logits.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"logits of shape {tuple(logits.shape)} contain NaN or Inf")
    return low, high


def check_unit_interval(values: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless every entry of ``values`` is a number in [0, 1] (NaN fails too)."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values.detach())
    low, high = float(low), float(high)
    # written so that NaN (which compares False) fails the check
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"{what} must lie in [0, 1], found values in [{low}, {high}]")


def prepare_target(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> PreparedTarget:
    """Validate ``target`` and ``mask`` against predictions of shape ``(B, C, *spatial)``.

    Args:
        logits: the predictions (logits or probabilities), ``(B, C, *spatial)``; only shape and device are read.
        target: hard labels ``(B, *spatial)`` of an integer (or bool) dtype with values in ``[0, C)``, or soft
            labels ``(B, C, *spatial)`` of a floating dtype with values in [0, 1]. With ``C == 1`` hard labels
            are a binary foreground mask (values in {0, 1}) and are returned as a soft ``(B, 1, *spatial)``
            target. Soft targets are not required to sum to 1 over the channels.
        mask: optional ``(B, *spatial)`` bool tensor, True for voxels that count.
        ignore_index: hard-label value whose voxels are excluded (may lie outside ``[0, C)``). It does not
            apply to soft targets; exclude voxels of a soft target with ``mask``.

    Returns:
        A :class:`PreparedTarget` whose ``mask`` combines ``mask`` and ``ignore_index``.

    Raises:
        ValueError: wrong type, dtype, shape or device, soft values outside [0, 1] or NaN, or a class index outside
            ``[0, C)``.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    shape = tuple(logits.shape)
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape (B, *spatial), got {got}")
        if tuple(mask.shape) != (batch, *spatial):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match (B, *spatial) = {(batch, *spatial)}")
    if mask is not None and mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}")

    if tuple(target.shape) == shape:
        if not target.is_floating_point():
            raise ValueError(
                f"a target of the logits' shape {shape} holds soft labels and must be floating, got dtype "
                f"{target.dtype}; pass hard labels as (B, *spatial) class indices"
            )
        check_unit_interval(target, f"soft target of shape {shape}")
        return PreparedTarget(labels=None, soft=target, mask=mask)

    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target shape {tuple(target.shape)} matches neither hard labels (B, *spatial) = {(batch, *spatial)} "
            f"nor soft labels (B, C, *spatial) = {shape}"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"hard labels of shape {tuple(target.shape)} must be an integer tensor, got dtype {target.dtype}"
        )
    labels = target.long()
    if ignore_index is not None:
        keep = labels != ignore_index
        mask = keep if mask is None else mask & keep
        labels = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    if labels.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(labels))
        n_valid = max(channels, 2)  # one channel: binary labels in {0, 1}
        if low < 0 or high >= n_valid:
            bad = low if low < 0 else high
            raise ValueError(
                f"hard labels contain class index {bad} outside [0, {n_valid}) "
                f"(logits have {channels} channel(s), ignore_index={ignore_index})"
            )
    if channels == 1:
        return PreparedTarget(labels=None, soft=labels.unsqueeze(1).float(), mask=mask)
    return PreparedTarget(labels=labels, soft=None, mask=mask)

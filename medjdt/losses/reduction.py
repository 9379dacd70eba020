"""From cardinalities to one loss value: the Tversky loss per entry and the dataset/image/class reductions."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["REDUCTIONS", "class_mean", "dataset_mean", "image_mean", "parse_reduction", "tversky_loss"]

REDUCTIONS = ("dataset", "image", "class")


def parse_reduction(reduction: str | Mapping[str, float]) -> dict[str, float]:
    """Normalise ``reduction`` to a dict ``{name: weight}`` over ``REDUCTIONS``.

    A string selects one reduction with weight 1; a mapping such as ``{"image": 0.5, "class": 0.5}`` mixes
    several. Weights must be finite and >= 0 with a positive sum; entries with weight 0 are dropped.

    Raises:
        ValueError: unknown name, bad weight, or no positive weight.
    """
    if isinstance(reduction, str):
        reduction = {reduction: 1.0}
    if not isinstance(reduction, Mapping) or not reduction:
        raise ValueError(f"reduction must be one of {REDUCTIONS} or a non-empty dict of weights, got {reduction!r}")
    parsed = {}
    for name, weight in reduction.items():
        if name not in REDUCTIONS:
            raise ValueError(f"unknown reduction {name!r}; choose from {REDUCTIONS}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"reduction weight for {name!r} must be a finite number >= 0, got {weight!r}")
        if weight > 0:
            parsed[name] = float(weight)
    if not parsed:
        raise ValueError(f"reduction {dict(reduction)!r} has no positive weight")
    return parsed


def tversky_loss(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    alpha: float,
    beta: float,
    smooth: float,
    log_loss: bool = False,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Element-wise Tversky loss from cardinalities of any (equal) shape, e.g. ``(B, C)`` or ``(C,)``.

    ``T = (TP + s) / (TP + alpha*FP + beta*FN + s)``; the loss is ``1 - T`` (or ``-log T`` with ``log_loss``),
    raised to the power ``gamma``. Where the denominator is 0 (empty prediction and target with ``s = 0``)
    the two agree perfectly and ``T = 1``.
    """
    numerator = tp + smooth
    denominator = tp + alpha * fp + beta * fn + smooth
    defined = denominator > 0
    # the inner where keeps 0/0 out of the graph, so its gradient cannot turn into NaN
    index = torch.where(defined, numerator / torch.where(defined, denominator, 1.0), 1.0)
    loss = -torch.log(index) if log_loss else 1 - index
    if gamma != 1:
        # For p = 1 or alpha = beta the loss is >= 0 in exact arithmetic; rounding can leave it a hair below 0,
        # where a fractional power would give NaN.
        loss = loss.clamp_min(0).pow(gamma)
    return loss


def _weighted_sum_and_total(values: torch.Tensor, weights: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (values * weights).sum(dim), weights.sum(dim)


def _safe_divide(numerator: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """numerator / total, and 0 where total is 0 (there numerator is 0 too, so the graph stays intact)."""
    return numerator / torch.where(total > 0, total, 1.0)


def dataset_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-class losses ``(C,)`` with weights ``(C,)`` (0 for inactive classes); 0 if none."""
    weighted, total = _weighted_sum_and_total(losses, weights, 0)
    return _safe_divide(weighted, total)


def image_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's weighted class mean.

    ``losses``, ``weights``: ``(B, C)``; weight 0 marks a class inactive in that image. Images without an
    active class are left out of the mean over images; with none at all the result is 0.
    """
    weighted, total = _weighted_sum_and_total(losses, weights, 1)
    per_image = _safe_divide(weighted, total)
    has_class = (total > 0).to(losses.dtype)
    return _safe_divide(per_image.sum(), has_class.sum())


def class_mean(losses: torch.Tensor, active: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over classes of each class's mean over the images where it is active.

    ``losses``: ``(B, C)``; ``active``: ``(B, C)`` bool; ``class_weights``: ``(C,)``. Classes active in no image
    are left out; with none at all the result is 0.
    """
    active = active.to(losses.dtype)
    summed, count = _weighted_sum_and_total(losses, active, 0)
    per_class = _safe_divide(summed, count)
    weights = class_weights * (count > 0).to(losses.dtype)
    return dataset_mean(per_class, weights)

"""The Tversky loss of one entry of cardinalities: ``1 - T`` (or ``-log T``) with ``T = (TP + s) / (TP +
alpha*FP + beta*FN + s)``, optionally raised to a focal power."""

from __future__ import annotations

import torch

__all__ = ["tversky_loss"]


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

"""Cross-entropy for hard or soft targets, with voxel masks and ``ignore_index``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medjdt.losses._inputs import (
    DeferredChecks,
    PreparedTarget,
    check_ignore_index,
    check_logits,
    prepare_target,
)
from medjdt.losses.dtypes import compute_dtype
from medjdt.validation import check_choice

__all__ = ["SoftTargetCrossEntropy"]


class SoftTargetCrossEntropy(nn.Module):
    """Mean voxel-wise cross-entropy ``H(y, x) = -sum_c y_c log x_c`` for hard or soft targets.

    For soft targets this is the KL divergence ``KL(y || x)`` plus the target entropy ``H(y)``, which does
    not depend on the network, so both have the same gradients; the value reported is the cross-entropy.

    ``activation="softmax"`` uses :func:`torch.nn.functional.cross_entropy` over the channels;
    ``"sigmoid"`` uses :func:`torch.nn.functional.binary_cross_entropy_with_logits` per channel and averages
    over channels (hard labels with C > 1 channels are one-hot encoded for this; with C = 1 they are the
    {0, 1} foreground). The loss is computed in float32 (float64 for float64 logits) even under autocast.
    The mean runs over the voxels that count; if none does, the loss is 0 and still attached to the graph.

    Args:
        activation: ``"softmax"`` or ``"sigmoid"``; the input are logits.
        ignore_index: hard-label value whose voxels are excluded; does not apply to soft targets (use ``mask``).

    Inputs of :meth:`forward`:
        logits: ``(B, C, *spatial)`` floating, 2 or 3 spatial dims.
        target: hard labels ``(B, *spatial)`` integer in ``[0, C)``, or soft labels ``(B, C, *spatial)`` in [0, 1]
            (not required to sum to 1 over channels).
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.

    Returns:
        A scalar tensor, float32 (float64 for float64 logits).

    Raises:
        ValueError: bad activation or ``ignore_index``; in ``forward`` the same input errors as
            :class:`~medjdt.losses.JDTLoss` (shapes, dtypes, ranges, NaN/Inf logits).
    """

    def __init__(self, activation: str = "softmax", ignore_index: int | None = None) -> None:
        super().__init__()
        where = type(self).__name__
        # this loss takes logits: no activation=None
        self.activation = check_choice("activation", activation, ("softmax", "sigmoid"), where=where)
        self.ignore_index = check_ignore_index(ignore_index, where=where)
        self._deferred = DeferredChecks()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of ``logits`` ``(B, C, *spatial)`` against ``target`` -> scalar.

        On an accelerator the value checks of the inputs are deferred (see :meth:`flush_checks`).
        """
        deferred = self._deferred.for_inputs(logits)
        check_logits(logits, self.activation, deferred)
        return self._forward_checked(logits, prepare_target(logits, target, mask, self.ignore_index, deferred))

    def flush_checks(self) -> None:
        """Wait for the deferred value checks of earlier calls on an accelerator; ``ValueError`` if one failed."""
        self._deferred.flush()

    def _forward_checked(self, logits: torch.Tensor, prepared: PreparedTarget) -> torch.Tensor:
        """:meth:`forward` on inputs checked by :func:`check_logits` and :func:`prepare_target`."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.to(compute_dtype(logits.dtype))
            if self.activation == "softmax":
                if prepared.labels is not None:
                    voxel_loss = F.cross_entropy(logits, prepared.labels, reduction="none")
                else:
                    voxel_loss = F.cross_entropy(logits, prepared.soft.to(logits.dtype), reduction="none")
            else:
                soft = prepared.soft
                if soft is None:
                    soft = F.one_hot(prepared.labels, logits.shape[1]).movedim(-1, 1)
                voxel_loss = F.binary_cross_entropy_with_logits(logits, soft.to(logits.dtype), reduction="none").mean(1)
            if prepared.mask is None:
                return voxel_loss.mean()
            keep = prepared.mask.to(voxel_loss.dtype)
            count = keep.sum()
            return (voxel_loss * keep).sum() / torch.where(count > 0, count, 1.0)

"""The mixed training loss: weighted cross-entropy plus a JDT loss."""

from __future__ import annotations

import torch
from torch import nn

from medjdt.losses._inputs import DeferredChecks, check_logits, prepare_target
from medjdt.losses.cross_entropy import SoftTargetCrossEntropy
from medjdt.losses.jdt import DiceSemimetricLoss, JDTLoss
from medjdt.validation import check_number

__all__ = ["SegmentationLoss"]


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + jdt_weight * JDT`` on the same logits, target and mask.

    The cross-entropy term is a :class:`~medjdt.losses.SoftTargetCrossEntropy` with the JDT loss's
    activation and ``ignore_index``, so both terms read the target the same way.

    Args:
        ce_weight: weight of the cross-entropy, finite and >= 0.
        jdt_weight: weight of the JDT loss, finite and >= 0 (the two weights must not both be 0).
        jdt: the JDT loss; None means ``DiceSemimetricLoss()``. Its activation must be ``"softmax"`` or
            ``"sigmoid"`` because this loss takes logits.

    Inputs of :meth:`forward`:
        logits: ``(B, C, *spatial)`` floating, 2 or 3 spatial dims.
        target: hard labels ``(B, *spatial)`` or soft labels ``(B, C, *spatial)`` in [0, 1].
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.

    Returns:
        ``(total, parts)``: the scalar loss to optimise and ``{"ce": ..., "jdt": ...}``, detached scalar
        tensors of the unweighted terms, for logging.

    Raises:
        ValueError: bad weights or a JDT loss without activation; input errors as in the two terms.
    """

    def __init__(self, ce_weight: float = 0.25, jdt_weight: float = 0.75, jdt: JDTLoss | None = None) -> None:
        super().__init__()
        where = type(self).__name__
        ce_weight = check_number("ce_weight", ce_weight, low=0, where=where)
        jdt_weight = check_number("jdt_weight", jdt_weight, low=0, where=where)
        if ce_weight == 0 and jdt_weight == 0:
            raise ValueError(f"{where}: ce_weight and jdt_weight must not both be 0")
        jdt = DiceSemimetricLoss() if jdt is None else jdt
        if not isinstance(jdt, JDTLoss):
            raise ValueError(f"{where}: jdt must be a JDTLoss, got {type(jdt).__name__}")
        if jdt.activation is None:
            raise ValueError("SegmentationLoss takes logits: the JDT loss needs activation 'softmax' or 'sigmoid'")
        self.ce_weight, self.jdt_weight = ce_weight, jdt_weight
        self.jdt = jdt
        self.ce = SoftTargetCrossEntropy(activation=jdt.activation, ignore_index=jdt.ignore_index)
        self._deferred = DeferredChecks()

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its detached parts for ``logits`` ``(B, C, *spatial)`` and ``target``.

        The inputs are checked once for both terms; on an accelerator the value checks are deferred (see
        :meth:`flush_checks`).
        """
        deferred = self._deferred.for_inputs(logits)
        logit_range = check_logits(logits, self.jdt.activation, deferred)
        prepared = prepare_target(logits, target, mask, self.jdt.ignore_index, deferred)
        ce = self.ce._forward_checked(logits, prepared)
        jdt = self.jdt._forward_checked(logits, prepared, logit_range)
        total = self.ce_weight * ce + self.jdt_weight * jdt
        return total, {"ce": ce.detach(), "jdt": jdt.detach()}

    def flush_checks(self) -> None:
        """Wait for the deferred value checks of earlier calls on an accelerator; ``ValueError`` if one failed."""
        self._deferred.flush()
        self.jdt.flush_checks()
        self.ce.flush_checks()

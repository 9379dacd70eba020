"""Fused JDT cardinalities straight from logits, with an analytic backward and no voxel-sized temporaries.

The reference path (:func:`~medjdt.losses.activate` followed by :func:`~medjdt.losses.soft_cardinalities` or
:func:`~medjdt.losses.hard_cardinalities`) keeps the probabilities ``x`` alive for backward and builds several
voxel-sized temporaries. Here the activation is part of one ``torch.autograd.Function``:

- forward walks over the voxels in chunks, computes ``x`` for the chunk and adds the chunk's per-(image,
  class) sums; it saves the logits, the target and the mask, which are alive anyway;
- backward receives the gradients of the ``(B, C)`` sums, walks over the same chunks again and writes the
  gradient of the logits chunk by chunk (dL/dx from closed forms, then the softmax or sigmoid
  Jacobian-vector product).

The pieces, one module each:

- :mod:`medjdt.losses.fused_chunks`: the chunks and the buffers reused from chunk to chunk;
- :mod:`medjdt.losses.fused_activation`: the activation forward and backward, and the probabilities that forward
  keeps for backward in the memory of the logits' gradient;
- :mod:`medjdt.losses.fused_soft` and :mod:`medjdt.losses.fused_hard`: the autograd functions for soft targets
  and for hard labels, with their sums and derivatives;
- :mod:`medjdt.losses.fused_triton`: on CUDA, when Triton is installed, two kernels replace the chunk loops (p = 1
  and 2, a target without gradient, fp32/fp16/bf16 logits); everything else takes the torch code.

This module picks the path (:func:`fused_sums`) and offers the checked public function
:func:`fused_cardinalities`. Under DDP the dataset aggregation all-reduces the sums between the two passes
(:class:`~medjdt.losses.JDTLoss` does it on the output of forward).
"""

from __future__ import annotations

import torch

from medjdt.losses._inputs import (
    PreparedTarget,
    check_activation,
    check_ignore_index,
    check_logits,
    check_p_variant,
    prepare_target,
)
from medjdt.losses.fused_activation import softmax_shift
from medjdt.losses.fused_hard import FusedHardSums
from medjdt.losses.fused_soft import FusedSoftSums, soft_cardinalities_from_sums
from medjdt.losses.fused_triton import TritonSums, triton_available

__all__ = ["fused_cardinalities", "fused_sums"]

# Devices on which the Triton kernels of medjdt.losses.fused_triton replace the chunked torch code (when Triton
# is importable).
_TRITON_DEVICES = {"cuda"}


def fused_sums(
    logits: torch.Tensor,
    prepared: PreparedTarget,
    activation: str | None,
    p: float,
    variant: int,
    logit_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unchecked core of :func:`fused_cardinalities`: ``(tp, fp, fn, count)``, each ``(B, C)``.

    ``logits``: ``(B, C, *spatial)``; ``prepared``: its target from :func:`~medjdt.losses._inputs.prepare_target`.
    ``count`` is the voxel count per image and class for hard labels (None for soft targets). ``logit_range``,
    the smallest and largest logit when known (from :func:`~medjdt.losses._inputs.check_logits`), lets the
    softmax skip the per-voxel maximum.
    """
    shift = softmax_shift(activation, logit_range)
    batch, channels = logits.shape[:2]
    flat_logits = logits.reshape(batch, channels, -1)
    mask = None if prepared.mask is None else prepared.mask.reshape(batch, -1)
    if _use_triton(logits, prepared, p):
        hard = prepared.labels is not None
        target = prepared.labels.reshape(batch, -1) if hard else prepared.soft.reshape(batch, channels, -1)
        sums = TritonSums.apply(flat_logits, target, mask, activation, hard, float(p), variant == 2)
        if hard:
            sum_x, tp, count = sums
            return tp, sum_x - tp, count - tp, count
        return soft_cardinalities_from_sums(sums, variant)
    keep_probs = torch.is_grad_enabled() and logits.requires_grad
    if prepared.labels is not None:
        labels = prepared.labels.reshape(batch, -1)
        sum_x, tp, count = FusedHardSums.apply(flat_logits, labels, mask, activation, shift, float(p), keep_probs)
        return tp, sum_x - tp, count - tp, count
    target = prepared.soft.reshape(batch, channels, -1)
    sums = FusedSoftSums.apply(flat_logits, target, mask, activation, shift, float(p), variant == 2, keep_probs)
    return soft_cardinalities_from_sums(sums, variant)


def _use_triton(logits: torch.Tensor, prepared: PreparedTarget, p: float) -> bool:
    """The Triton kernels cover CUDA tensors (fp32/16/bf16), p in (1, 2) and a target without gradient."""
    return (
        logits.device.type in _TRITON_DEVICES
        and p in (1, 2)
        and logits.dtype != torch.float64
        and (prepared.soft is None or not prepared.soft.requires_grad)
        and triton_available()
    )


def fused_cardinalities(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    activation: str | None = "softmax",
    p: float = 1,
    variant: int = 1,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class TP, FP, FN of ``activation(logits)`` against a hard or soft target, fused.

    Equal (to float rounding) to :func:`~medjdt.losses.activate` followed by
    :func:`~medjdt.losses.soft_cardinalities` or :func:`~medjdt.losses.hard_cardinalities`, with extra memory of
    a few small chunks plus, when a gradient is needed, the gradient of the logits (allocated by forward).

    Args:
        logits: ``(B, C, *spatial)`` floating, 2 or 3 spatial dims (probabilities in [0, 1] if ``activation`` is
            None).
        target: hard labels ``(B, *spatial)`` integer in ``[0, C)`` (a {0, 1} foreground when C = 1) or soft
            labels ``(B, C, *spatial)`` in [0, 1].
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.
        activation: ``"softmax"``, ``"sigmoid"`` or None.
        p: exponent of the Lp cardinalities, a finite number >= 1.
        variant: 1 or 2 (p = 1 only); hard labels give the same result for both.
        ignore_index: hard-label value whose voxels are excluded.

    Returns:
        ``(tp, fp, fn)``, each ``(B, C)`` float32 (float64 for float64 logits), differentiable with respect to
        ``logits`` and a soft ``target``.

    Raises:
        ValueError: bad activation, ``p``, ``variant`` or ``ignore_index``, and the input errors of
            :class:`~medjdt.losses.JDTLoss`.
    """
    where = "fused_cardinalities"
    check_activation(activation, where=where)
    p, variant = check_p_variant(p, variant, where=where)
    ignore_index = check_ignore_index(ignore_index, where=where)
    logit_range = check_logits(logits, activation)
    prepared = prepare_target(logits, target, mask, ignore_index)
    tp, fp, fn, _ = fused_sums(logits, prepared, activation, p, variant, logit_range)
    return tp, fp, fn

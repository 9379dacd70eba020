"""Fused JDT sums of act(logits) against hard labels: one chunked pass forward, one backward.

With the one-hot encoding ``e`` of the labels (built chunk by chunk, never for the whole volume) the sums per
image and class over unmasked voxels are ``S_x = sum x^p``, ``TP = sum e t(x)`` with ``t(g) = (g^p + 1 - (1 -
g)^p) / 2`` (the variant-1 TP of a one-hot target; ``t(g) = g`` for p = 1 and 2) and the voxel count ``sum e``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from medjdt.losses.dtypes import compute_dtype
from medjdt.losses.fused_activation import activated, activation_backward_into, chunk_probs, probs_buffer
from medjdt.losses.fused_chunks import Chunks, chunk_mask, expand

__all__ = ["FusedHardSums"]


def _true_positive_term(x: torch.Tensor, p: float) -> torch.Tensor:
    """t(x) = (x^p + 1 - (1 - x)^p) / 2 in place (the identity for p = 1 and 2)."""
    if p in (1, 2):
        return x
    complement = torch.pow(1 - x, p)
    return x.pow_(p).add_(1).sub_(complement).mul_(0.5)


def _true_positive_slope(x: torch.Tensor, p: float) -> torch.Tensor:
    """t'(x) = p (x^(p-1) + (1 - x)^(p-1)) / 2 as a new tensor (constant 1 for p = 1 and 2)."""
    return torch.pow(1 - x, p - 1).add_(torch.pow(x, p - 1)).mul_(p / 2)


class FusedHardSums(torch.autograd.Function):
    """``(3, B, C)`` sums ``S_x``, ``TP`` and the voxel count of act(logits) against hard labels.

    ``logits``: ``(B, C, N)``; ``labels``: ``(B, N)`` int64 in ``[0, C)``; ``mask``: ``(B, N)`` bool or None.
    Differentiable with respect to ``logits`` (the count is constant). ``keep_probs``: a backward will follow (see
    :func:`~medjdt.losses.fused_activation.probs_buffer`).
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, activation, shift, p, keep_probs):
        dtype = compute_dtype(logits.dtype)
        batch, channels, _ = logits.shape
        sums = logits.new_zeros((3, batch, channels), dtype=dtype)
        chunks = Chunks(logits, dtype)
        probs = probs_buffer(logits, dtype, keep_probs)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = activated(logits, chunks, chunk, activation, shift, keep_in=probs)
                one_hot = chunks.one_hot(chunks.buffer(1, chunk), labels, chunk)
                keep = chunk_mask(mask, chunks, chunk, 1)
                if keep is not None:
                    x.mul_(keep)  # masked voxels: x = 0, so x^p and t(x) vanish
                    one_hot.mul_(keep)
                work = chunks.buffer(2, chunk)
                sums[0].add_((x if p == 1 else torch.pow(x, p, out=work)).sum(-1))
                own = _true_positive_term(x if p in (1, 2) else work.copy_(x), p)
                sums[1].add_(torch.linalg.vecdot(own, one_hot))
                sums[2].add_(one_hot.sum(-1))
        ctx.save_for_backward(logits, labels, mask)
        ctx.activation, ctx.p, ctx.shift = activation, p, shift
        ctx.probs = probs
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, labels, mask = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None  # overwritten by the gradient: a second backward recomputes
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        p, activation = ctx.p, ctx.activation
        g_x, g_tp = expand(grad[0]), expand(grad[1])
        grad_logits = torch.empty_like(logits) if probs is None else probs
        chunks = Chunks(logits, grad.dtype)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = chunk_probs(probs, logits, chunks, chunk, activation, ctx.shift)
                # dL/dx = e t'(x) dL/dTP + p x^(p-1) dL/dS_x
                grad_x = chunks.one_hot(chunks.buffer(1, chunk), labels, chunk).mul_(g_tp)
                if p not in (1, 2):
                    grad_x.mul_(_true_positive_slope(x, p))
                if p == 1:
                    grad_x.add_(g_x)
                else:
                    grad_x.add_(torch.pow(x, p - 1, out=chunks.buffer(2, chunk)).mul_(p * g_x))
                keep = chunk_mask(mask, chunks, chunk, 1)
                if keep is not None:
                    grad_x.mul_(keep)
                activation_backward_into(grad_logits[:, :, chunk], x, grad_x, activation, chunks.plane(0, chunk))
        return grad_logits, None, None, None, None, None, None

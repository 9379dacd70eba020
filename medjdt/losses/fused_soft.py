"""Fused JDT sums of act(logits) against a soft target: one chunked pass forward, one backward.

Per image and class over unmasked voxels, with ``d = x - y``: ``S_x = sum x^p``, ``S_y = sum y^p``,
``S_d = sum |d|^p`` and, for variant 2, ``S_xy = sum x*y``. Their derivatives are ``p x^(p-1)``, ``p y^(p-1)``,
``+-p |d|^(p-1) sign(d)`` and ``y`` / ``x``; ``sign(0) = 0`` picks the zero subgradient of ``|d|`` at ties, as
in the reference path (:mod:`medjdt.losses.cardinalities`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from medjdt.losses.dtypes import compute_dtype
from medjdt.losses.fused_activation import activated, activation_backward_into, chunk_probs, probs_buffer
from medjdt.losses.fused_chunks import Chunks, chunk_mask, chunk_target, expand

__all__ = ["FusedSoftSums", "soft_cardinalities_from_sums"]


def _power(values: torch.Tensor, p: float, out: torch.Tensor) -> torch.Tensor:
    """``values^p``, written into ``out`` unless p = 1."""
    return values if p == 1 else torch.pow(values, p, out=out)


class FusedSoftSums(torch.autograd.Function):
    """``(K, B, C)`` sums ``S_x, S_y, S_d`` (and ``S_xy`` for variant 2) of act(logits) against a soft target.

    ``logits``, ``target``: ``(B, C, N)``; ``mask``: ``(B, N)`` bool or None. Differentiable with respect to
    ``logits`` and ``target``. ``keep_probs``: a backward will follow (see
    :func:`~medjdt.losses.fused_activation.probs_buffer`).
    """

    @staticmethod
    def forward(ctx, logits, target, mask, activation, shift, p, with_product, keep_probs):
        dtype = compute_dtype(logits.dtype)
        batch, channels, _ = logits.shape
        sums = logits.new_zeros((4 if with_product else 3, batch, channels), dtype=dtype)
        chunks = Chunks(logits, dtype)
        probs = probs_buffer(logits, dtype, keep_probs)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = activated(logits, chunks, chunk, activation, shift, keep_in=probs)
                y = chunk_target(target, chunks, chunk, 1)
                keep = chunk_mask(mask, chunks, chunk, 1)
                if keep is not None:
                    x.mul_(keep)
                    y = torch.mul(y, keep, out=chunks.buffer(1, chunk))
                work = chunks.buffer(2, chunk)
                sums[0].add_(_power(x, p, work).sum(-1))
                sums[1].add_(_power(y, p, work).sum(-1))
                diff = torch.sub(x, y, out=work).abs_()
                sums[2].add_((diff if p == 1 else diff.pow_(p)).sum(-1))
                if with_product:
                    sums[3].add_(torch.mul(x, y, out=work).sum(-1))
        ctx.save_for_backward(logits, target, mask)
        ctx.activation, ctx.p, ctx.with_product, ctx.shift = activation, p, with_product, shift
        ctx.probs = probs
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, target, mask = ctx.saved_tensors
        p, activation = ctx.p, ctx.activation
        need_logits, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_x, g_y, g_d = (expand(g) for g in grad[:3])
        g_xy = expand(grad[3]) if ctx.with_product else None
        probs, ctx.probs = ctx.probs, None  # overwritten by the gradient: a second backward recomputes
        grad_logits = (torch.empty_like(logits) if probs is None else probs) if need_logits else None
        grad_target = torch.empty_like(target) if need_target else None
        chunks = Chunks(logits, grad.dtype)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = chunk_probs(probs, logits, chunks, chunk, activation, ctx.shift)
                y = chunk_target(target, chunks, chunk, 1)
                keep = chunk_mask(mask, chunks, chunk, 1)
                # slope = d|d|^p / dd = p |d|^(p-1) sign(d)
                slope = torch.sub(x, y, out=chunks.buffer(2, chunk))
                if p == 1:
                    slope.sign_()
                else:
                    magnitude = torch.abs(slope, out=chunks.buffer(3, chunk)).pow_(p - 1).mul_(p)
                    slope = magnitude.mul_(slope.sign_())
                if need_target:
                    grad_y = slope * -g_d
                    grad_y += g_y if p == 1 else y.pow(p - 1).mul_(p * g_y)
                    if g_xy is not None:
                        grad_y += x * g_xy
                    if keep is not None:
                        grad_y *= keep
                    grad_target[:, :, chunk] = grad_y
                if need_logits:
                    grad_x = slope.mul_(g_d)
                    if p == 1:
                        grad_x += g_x
                    else:
                        # the slope lives in buffer 3 for p != 1; buffer 2 (the difference) is free again
                        grad_x += torch.pow(x, p - 1, out=chunks.buffer(2, chunk)).mul_(p * g_x)
                    if g_xy is not None:
                        grad_x.addcmul_(y, g_xy)
                    if keep is not None:
                        grad_x *= keep
                    activation_backward_into(grad_logits[:, :, chunk], x, grad_x, activation, chunks.plane(0, chunk))
        return grad_logits, grad_target, None, None, None, None, None, None


def soft_cardinalities_from_sums(
    sums: torch.Tensor, variant: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """``(tp, fp, fn, None)``, each ``(B, C)``, from the ``(K, B, C)`` soft sums ``S_x, S_y, S_d`` (and ``S_xy``
    for variant 2)."""
    sum_x, sum_y, sum_diff = sums[0], sums[1], sums[2]
    if variant == 2:
        return sums[3], (sum_x - sum_y + sum_diff) / 2, (sum_y - sum_x + sum_diff) / 2, None
    tp = (sum_x + sum_y - sum_diff) / 2
    return tp, sum_x - tp, sum_y - tp, None

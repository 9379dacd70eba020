"""Triton kernels for the fused JDT cardinalities on CUDA: one pass over the voxels for the sums, one for the
gradient.

Same contract and formulas as the chunked torch functions of :mod:`medjdt.losses.fused_soft` and
:mod:`medjdt.losses.fused_hard` (see there), for p = 1 and 2 and a target without gradient;
:func:`medjdt.losses.fused.fused_sums` picks these kernels for CUDA tensors when Triton is importable and falls
back to the torch path otherwise. Each program handles one image
and ``BLOCK`` voxels as a ``(C, BLOCK)`` tile: it computes the activation over the classes in registers, reduces
its part of the per-(image, class) sums and adds it atomically (forward), or recomputes the activation and
writes the gradient of its tile (backward). Nothing voxel-sized besides the gradient is allocated.

Triton is optional (``pip install triton``; CUDA builds of torch ship it). With ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors through Triton's interpreter, which is how the tests check them against the torch
path on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.autograd.function import once_differentiable

__all__ = ["triton_available"]

# Voxels per program and warps per program. Compiled for sm_90 (C = 3, fp32, mask, variant 2), a (4, 512) tile on
# 8 warps takes 47 registers per thread in forward and 56 in backward, none spilled: 4 programs (32 warps) fit on
# an SM, enough loads in flight for these memory-bound passes; (4, 1024) on 4 warps took 130 and 145 registers.
_BLOCK = 512
_NUM_WARPS = 8
_ACTIVATION_CODES = {"softmax": 0, "sigmoid": 1, None: 2}


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    """The kernels, imported on first use (importing triton is slow and optional)."""
    import triton

    from medjdt.losses import _triton_kernels

    return triton, _triton_kernels.forward_kernel, _triton_kernels.backward_kernel


def _launch(kernel, logits, target, mask, extra, activation, hard, p, with_product):
    triton = _kernels()[0]
    batch, channels, n_voxels = logits.shape
    grid = (batch, triton.cdiv(n_voxels, _BLOCK))
    kernel[grid](
        logits, target, logits if mask is None else mask, *extra, n_voxels, channels, batch,
        ACTIVATION=_ACTIVATION_CODES[activation], HARD=hard, HAS_MASK=mask is not None, P2=p == 2,
        PRODUCT=with_product, C_PAD=triton.next_power_of_2(channels), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )


class TritonSums(torch.autograd.Function):
    """Sums of act(logits) against a target, as ``FusedSoftSums`` (soft) or ``FusedHardSums`` (hard labels).

    ``logits``: ``(B, C, N)`` contiguous; ``target``: ``(B, C, N)`` soft or ``(B, N)`` int64 labels; ``mask``:
    ``(B, N)`` bool or None; p in (1, 2). Returns float32 sums ``(K, B, C)``: soft ``S_x, S_y, S_d`` (and
    ``S_xy``), hard ``S_x, TP, count``. Differentiable with respect to ``logits`` only.
    """

    @staticmethod
    def forward(ctx, logits, target, mask, activation, hard, p, with_product):
        logits, target = logits.contiguous(), target.contiguous()
        mask = None if mask is None else mask.contiguous().view(torch.uint8)
        batch, channels, _ = logits.shape
        rows = 3 if hard or not with_product else 4
        sums = torch.zeros(rows, batch, channels, dtype=torch.float32, device=logits.device)
        _launch(_kernels()[1], logits, target, mask, (sums,), activation, hard, p, with_product)
        ctx.save_for_backward(logits, target, mask)
        ctx.options = (activation, hard, p, with_product)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, target, mask = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        _launch(_kernels()[2], logits, target, mask, (grad.float().contiguous(), grad_logits), *ctx.options)
        return grad_logits, None, None, None, None, None, None

"""The activation of the fused JDT passes, chunk by chunk: softmax or sigmoid forward into a buffer, and its
Jacobian-vector product backward into the gradient of the logits.

Backward needs the probabilities ``x``. When a backward will follow (and the logits are in the compute dtype),
forward allocates the gradient of the logits itself and keeps ``x`` in it (:func:`probs_buffer`); backward reads
each chunk's ``x`` there and overwrites it with the gradient. The gradient has to exist anyway, and the peak
memory of a training step comes at the start of backward, so this costs no memory and spares backward the
activation (about a quarter of the work on a CPU). Otherwise (no gradient needed, half-precision logits, or a
second backward through a retained graph) backward recomputes ``x`` from the logits, bit for bit as forward
computed it (:func:`activated` is the one code path for both).
"""

from __future__ import annotations

import torch

from medjdt.losses.fused_chunks import Chunks

__all__ = ["activated", "activation_backward_into", "chunk_probs", "probs_buffer", "softmax_shift"]

# exp(t) = exp2(t log2(e)); on CPUs torch's exp2 is several times faster than its exp.
_LOG2_E = 1.4426950408889634
# With every |logit| below this, exp(z) neither overflows nor underflows in float32 (e^64 * C << 3.4e38,
# e^-64 >> 1.2e-38), so the softmax can skip subtracting the per-voxel maximum.
_SAFE_EXP = 64.0


def softmax_shift(activation: str | None, logit_range: tuple[float, float] | None) -> bool:
    """Whether the softmax must subtract the per-voxel maximum: unless every logit is known to be small."""
    if activation != "softmax":
        return False
    return logit_range is None or not (-_SAFE_EXP < logit_range[0] and logit_range[1] < _SAFE_EXP)


def _activate_into(
    out: torch.Tensor, z: torch.Tensor, activation: str | None, scratch: torch.Tensor, shift: bool
) -> None:
    """Write the probabilities of a chunk ``z`` ``(B, C, n)`` into ``out``; ``scratch`` ``(B, 1, n)`` is clobbered."""
    if z.dtype != out.dtype:
        z = out.copy_(z)
    if activation == "softmax":
        if shift:
            torch.amax(z, 1, keepdim=True, out=scratch)
            torch.sub(z, scratch, out=out).mul_(_LOG2_E)
        else:
            torch.mul(z, _LOG2_E, out=out)
        out.exp2_()
        torch.sum(out, 1, keepdim=True, out=scratch)
        out.mul_(scratch.reciprocal_())
    elif activation == "sigmoid":
        torch.sigmoid(z, out=out)
    elif z is not out:
        out.copy_(z)


def activation_backward_into(
    dest: torch.Tensor, x: torch.Tensor, grad_x: torch.Tensor, activation: str | None, scratch: torch.Tensor
) -> None:
    """Write dL/dz of a chunk into ``dest`` ``(B, C, n)`` from dL/dx ``grad_x`` and x = act(z), both ``(B, C, n)``.

    Clobbers ``x``, ``grad_x`` and ``scratch`` ``(B, 1, n)``.
    """
    if activation == "softmax":
        # dL/dz_c = x_c G_c - x_c sum_k x_k G_k
        grad_x.mul_(x)
        torch.sum(grad_x, 1, keepdim=True, out=scratch)
        if dest.dtype == grad_x.dtype:
            torch.addcmul(grad_x, x, scratch, value=-1, out=dest)
        else:
            dest.copy_(grad_x.addcmul_(x, scratch, value=-1))
    elif activation == "sigmoid":
        # dL/dz = G x (1 - x)
        grad_x.mul_(x)
        if dest.dtype == grad_x.dtype:
            torch.addcmul(grad_x, grad_x, x, value=-1, out=dest)
        else:
            dest.copy_(grad_x.addcmul_(grad_x, x, value=-1))
    else:
        dest.copy_(grad_x)


def probs_buffer(logits: torch.Tensor, dtype: torch.dtype, keep_probs: bool) -> torch.Tensor | None:
    """A ``(B, C, N)`` buffer for the probabilities of forward, which backward overwrites with the gradient of the
    logits, or None (backward recomputes them chunk by chunk).

    Only for logits in the compute dtype ``dtype`` (the probabilities of half-precision logits would be rounded)
    and when a backward will follow (``keep_probs``).
    """
    return torch.empty_like(logits) if keep_probs and logits.dtype == dtype else None


def activated(
    logits: torch.Tensor,
    chunks: Chunks,
    chunk: slice,
    activation: str | None,
    shift: bool,
    keep_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """The probabilities ``(B, C, n)`` of ``chunk`` of ``(B, C, N)`` logits, computed into buffer 0.

    With ``keep_in`` ``(B, C, N)`` they are copied there too: the same code as a recomputation in backward, so
    the same bits.
    """
    x = chunks.buffer(0, chunk)
    _activate_into(x, logits[:, :, chunk], activation, chunks.plane(0, chunk), shift)
    if keep_in is not None:
        keep_in[:, :, chunk] = x
    return x


def chunk_probs(
    probs: torch.Tensor | None,
    logits: torch.Tensor,
    chunks: Chunks,
    chunk: slice,
    activation: str | None,
    shift: bool,
) -> torch.Tensor:
    """The probabilities of ``chunk`` in backward: kept by forward in ``probs``, or recomputed into a buffer."""
    return probs[:, :, chunk] if probs is not None else activated(logits, chunks, chunk, activation, shift)

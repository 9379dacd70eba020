"""Fused JDT cardinalities straight from logits, with an analytic backward and no voxel-sized temporaries.

The reference path (:func:`~medjdt.losses.activate` followed by :func:`~medjdt.losses.soft_cardinalities` or
:func:`~medjdt.losses.hard_cardinalities`) keeps the probabilities ``x`` alive for backward and builds several
voxel-sized temporaries. Here the activation is part of one ``torch.autograd.Function``:

- forward walks over the voxels in chunks, computes ``x`` for the chunk and adds the chunk's per-(image,
  class) sums; it saves the logits, the target and the mask, which are alive anyway;
- backward receives the gradients of the ``(B, C)`` sums, walks over the same chunks again and writes the
  gradient of the logits chunk by chunk (dL/dx from the closed forms below, then the softmax or sigmoid
  Jacobian-vector product).

Backward needs ``x``. When a backward will follow (and the logits are in the compute dtype), forward allocates
the gradient of the logits itself and keeps ``x`` in it; backward reads each chunk's ``x`` there and overwrites
it with the gradient. The gradient has to exist anyway, and the peak memory of a training step comes at the
start of backward, so this costs no memory and spares backward the activation (about a quarter of the work on
a CPU). Otherwise (no gradient needed, half-precision logits, or a second backward through a retained graph)
backward recomputes ``x`` from the logits, bit for bit as forward computed it.

A chunk holds about ``_CHUNK_ELEMENTS`` values per CPU thread and all its temporaries live in a few buffers that
are reused from chunk to chunk, so on a CPU they stay in the cache and the extra memory is the gradient itself plus
those buffers. Under DDP the dataset reduction all-reduces the sums between the two passes
(:class:`~medjdt.losses.JDTLoss` does it on the output of forward).

Sums per image and class over unmasked voxels, with ``d = x - y``:

- soft targets: ``S_x = sum x^p``, ``S_y = sum y^p``, ``S_d = sum |d|^p`` and, for variant 2, ``S_xy = sum x*y``;
  their derivatives are ``p x^(p-1)``, ``p y^(p-1)``, ``+-p |d|^(p-1) sign(d)`` and ``y`` / ``x``;
- hard labels with one-hot ``e`` (built chunk by chunk, never for the whole volume): ``S_x = sum x^p``,
  ``TP = sum e t(x)`` with ``t(g) = (g^p + 1 - (1 - g)^p) / 2`` (the variant-1 TP of a one-hot target;
  ``t(g) = g`` for p = 1 and 2) and the voxel count ``sum e``.

``sign(0) = 0`` picks the zero subgradient of ``|d|`` at ties, as in the reference path.

On CUDA, when Triton is installed, :mod:`medjdt.losses.fused_triton` replaces the chunk loops by two kernels
(p = 1 and 2, a target without gradient, fp32/fp16/bf16 logits) whose backward recomputes ``x`` (free there: the
passes are bound by memory traffic); everything else takes the torch code here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from medjdt.losses._inputs import PreparedTarget, check_activation, check_logits, prepare_target
from medjdt.losses.cardinalities import _check_p_variant
from medjdt.losses.fused_triton import TritonSums, triton_available

__all__ = ["fused_cardinalities"]

# Values per chunk and CPU thread: buffers of 512 KiB (float32) per thread stay in the L2/L3 cache and amortise
# the per-operation overhead of Python and OpenMP (each operation splits its chunk among the threads). On
# accelerators the chunk only bounds the temporaries: 1/16 of the logits per
# buffer (at least 2**20 values, to keep the number of kernel launches low).
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_MAX_CPU_CHUNK_ELEMENTS = 1 << 20  # with many threads: buffers of at most 4 MiB, small next to large logits
_CHUNK_FRACTION_OTHER = 16
_MIN_CHUNK_ELEMENTS_OTHER = 1 << 20
# Devices on which the Triton kernels of medjdt.losses.fused_triton replace the chunked torch code (when Triton
# is importable).
_TRITON_DEVICES = {"cuda"}
# Below this many voxels per chunk the per-operation overhead of Python dominates.
_MIN_CHUNK_VOXELS = 2048
# exp(t) = exp2(t log2(e)); on CPUs torch's exp2 is several times faster than its exp.
_LOG2_E = 1.4426950408889634
# With every |logit| below this, exp(z) neither overflows nor underflows in float32 (e^64 * C << 3.4e38,
# e^-64 >> 1.2e-38), so the softmax can skip subtracting the per-voxel maximum.
_SAFE_EXP = 64.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunks:
    """Chunks of the voxel axis of ``(B, C, N)`` logits and reusable buffers for their temporaries.

    Every chunk's temporaries are written into the same few allocations (``out=`` and in-place operations):
    a fresh allocation per chunk would cost page faults that take longer than the arithmetic. Buffers are
    allocated on first use, so a pass only pays for the ones it needs.
    """

    def __init__(self, logits: torch.Tensor, dtype: torch.dtype) -> None:
        batch, channels, n_voxels = logits.shape
        budget = _CHUNK_ELEMENTS.get(logits.device.type)
        if budget is not None and logits.device.type == "cpu":
            budget = min(budget * torch.get_num_threads(), _MAX_CPU_CHUNK_ELEMENTS)
        if budget is None:  # accelerators: a fixed fraction of the logits, so the buffers stay small next to them
            budget = max(_MIN_CHUNK_ELEMENTS_OTHER, logits.numel() // _CHUNK_FRACTION_OTHER)
        self.step = min(n_voxels, max(_MIN_CHUNK_VOXELS, budget // max(1, batch * channels)))
        self.n_voxels, self.batch, self.channels = n_voxels, batch, channels
        self._like, self._dtype = logits, dtype
        self._buffers: dict = {}  # i -> flat storage, (i, n) -> its (B, C, n) view
        self._planes: dict = {}
        self._labels = None

    def __iter__(self) -> Iterator[slice]:
        for start in range(0, self.n_voxels, self.step):
            yield slice(start, min(start + self.step, self.n_voxels))

    def buffer(self, i: int, chunk: slice) -> torch.Tensor:
        """Buffer ``i`` as a contiguous ``(B, C, n)`` tensor for ``chunk`` (n voxels)."""
        return self._view(self._buffers, i, self.channels, chunk.stop - chunk.start)

    def plane(self, i: int, chunk: slice) -> torch.Tensor:
        """Plane ``i`` as a contiguous ``(B, 1, n)`` tensor for ``chunk``."""
        return self._view(self._planes, i, 1, chunk.stop - chunk.start)

    def _view(self, store: dict, i: int, rows: int, n: int) -> torch.Tensor:
        # views are cached per length (all chunks but the last have the same): making them costs Python time
        key = (i, n)
        if key not in store:
            if i not in store:
                store[i] = self._like.new_empty(self.batch * rows * self.step, dtype=self._dtype)
            store[key] = store[i][: self.batch * rows * n].view(self.batch, rows, n)
        return store[key]

    def one_hot(self, out: torch.Tensor, labels: torch.Tensor, chunk: slice) -> torch.Tensor:
        """Write the one-hot encoding of ``labels[:, chunk]`` (``(B, N)`` int64) into ``out`` ``(B, C, n)``."""
        if self._labels is None:
            self._labels = labels.new_empty(self.batch * self.step, dtype=torch.int32)
            self._classes = torch.arange(self.channels, dtype=torch.int32, device=labels.device).view(1, -1, 1)
        n = chunk.stop - chunk.start
        # int32 compares twice as fast as int64; labels lie in [0, C)
        narrow = self._labels[: self.batch * n].view(self.batch, 1, n).copy_(labels[:, None, chunk])
        return torch.eq(narrow, self._classes, out=out)


def _softmax_shift(activation: str | None, logit_range: tuple[float, float] | None) -> bool:
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


def _activation_backward_into(
    dest: torch.Tensor, x: torch.Tensor, grad_x: torch.Tensor, activation: str | None, scratch: torch.Tensor
) -> None:
    """Write dL/dz of a chunk into ``dest`` from dL/dx ``grad_x`` and x = act(z); clobbers x, grad_x, scratch."""
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


def _chunk_mask(mask: torch.Tensor | None, chunks: _Chunks, chunk: slice, plane: int) -> torch.Tensor | None:
    """``(B, 1, n)`` {0, 1} multiplier of one chunk (written into a plane buffer), or None without a mask."""
    return None if mask is None else chunks.plane(plane, chunk).copy_(mask[:, None, chunk])


def _chunk_target(target: torch.Tensor, chunks: _Chunks, chunk: slice, buffer: int) -> torch.Tensor:
    """The soft target of one chunk in the compute dtype (copied into a buffer only if it differs)."""
    y = target[:, :, chunk]
    out = chunks.buffer(buffer, chunk)
    return y if y.dtype == out.dtype else out.copy_(y)


def _expand(stat: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1) for broadcasting against a chunk."""
    return stat.unsqueeze(-1)


def _power(values: torch.Tensor, p: float, out: torch.Tensor) -> torch.Tensor:
    """``values^p``, written into ``out`` unless p = 1."""
    return values if p == 1 else torch.pow(values, p, out=out)


def _true_positive_term(x: torch.Tensor, p: float) -> torch.Tensor:
    """t(x) = (x^p + 1 - (1 - x)^p) / 2 in place (the identity for p = 1 and 2)."""
    if p in (1, 2):
        return x
    complement = torch.pow(1 - x, p)
    return x.pow_(p).add_(1).sub_(complement).mul_(0.5)


def _true_positive_slope(x: torch.Tensor, p: float) -> torch.Tensor:
    """t'(x) = p (x^(p-1) + (1 - x)^(p-1)) / 2 as a new tensor (constant 1 for p = 1 and 2)."""
    return torch.pow(1 - x, p - 1).add_(torch.pow(x, p - 1)).mul_(p / 2)


def _probs_buffer(logits: torch.Tensor, dtype: torch.dtype, keep_probs: bool) -> torch.Tensor | None:
    """A ``(B, C, N)`` buffer for the probabilities of forward, which backward overwrites with the gradient of the
    logits, or None (backward recomputes them chunk by chunk).

    The gradient has to be allocated anyway; allocating it in forward instead and keeping the probabilities in
    it spares backward the activation (about a quarter of the work on a CPU) without raising the peak memory of
    a training step, which comes at the start of backward. Only for logits in the compute dtype (the
    probabilities of half-precision logits would be rounded) and when a backward will follow.
    """
    return torch.empty_like(logits) if keep_probs and logits.dtype == dtype else None


def _activated(logits, chunks: _Chunks, chunk: slice, activation, shift: bool, keep_in=None) -> torch.Tensor:
    """The probabilities of ``chunk``, computed into buffer 0 (and copied into ``keep_in`` when given: the same
    code as a recomputation in backward, so the same bits)."""
    x = chunks.buffer(0, chunk)
    _activate_into(x, logits[:, :, chunk], activation, chunks.plane(0, chunk), shift)
    if keep_in is not None:
        keep_in[:, :, chunk] = x
    return x


def _chunk_probs(probs, logits, chunks: _Chunks, chunk: slice, activation, shift: bool) -> torch.Tensor:
    """The probabilities of ``chunk`` in backward: kept by forward in ``probs``, or recomputed into a buffer."""
    return probs[:, :, chunk] if probs is not None else _activated(logits, chunks, chunk, activation, shift)


class _FusedSoftSums(torch.autograd.Function):
    """``(K, B, C)`` sums ``S_x, S_y, S_d`` (and ``S_xy`` for variant 2) of act(logits) against a soft target.

    ``logits``, ``target``: ``(B, C, N)``; ``mask``: ``(B, N)`` bool or None. Differentiable with respect to
    ``logits`` and ``target``.
    """

    @staticmethod
    def forward(ctx, logits, target, mask, activation, shift, p, with_product, keep_probs):
        dtype = _compute_dtype(logits.dtype)
        batch, channels, _ = logits.shape
        sums = logits.new_zeros((4 if with_product else 3, batch, channels), dtype=dtype)
        chunks = _Chunks(logits, dtype)
        probs = _probs_buffer(logits, dtype, keep_probs)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = _activated(logits, chunks, chunk, activation, shift, keep_in=probs)
                y = _chunk_target(target, chunks, chunk, 1)
                keep = _chunk_mask(mask, chunks, chunk, 1)
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
        g_x, g_y, g_d = (_expand(g) for g in grad[:3])
        g_xy = _expand(grad[3]) if ctx.with_product else None
        probs, ctx.probs = ctx.probs, None  # overwritten by the gradient: a second backward recomputes
        grad_logits = (torch.empty_like(logits) if probs is None else probs) if need_logits else None
        grad_target = torch.empty_like(target) if need_target else None
        chunks = _Chunks(logits, grad.dtype)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = _chunk_probs(probs, logits, chunks, chunk, activation, ctx.shift)
                y = _chunk_target(target, chunks, chunk, 1)
                keep = _chunk_mask(mask, chunks, chunk, 1)
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
                    _activation_backward_into(
                        grad_logits[:, :, chunk], x, grad_x, activation, chunks.plane(0, chunk)
                    )
        return grad_logits, grad_target, None, None, None, None, None, None


class _FusedHardSums(torch.autograd.Function):
    """``(3, B, C)`` sums ``S_x``, ``TP`` and the voxel count of act(logits) against hard labels.

    ``logits``: ``(B, C, N)``; ``labels``: ``(B, N)`` int64 in ``[0, C)``; ``mask``: ``(B, N)`` bool or None.
    Differentiable with respect to ``logits`` (the count is constant).
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, activation, shift, p, keep_probs):
        dtype = _compute_dtype(logits.dtype)
        batch, channels, _ = logits.shape
        sums = logits.new_zeros((3, batch, channels), dtype=dtype)
        chunks = _Chunks(logits, dtype)
        probs = _probs_buffer(logits, dtype, keep_probs)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = _activated(logits, chunks, chunk, activation, shift, keep_in=probs)
                one_hot = chunks.one_hot(chunks.buffer(1, chunk), labels, chunk)
                keep = _chunk_mask(mask, chunks, chunk, 1)
                if keep is not None:
                    x.mul_(keep)  # masked voxels: x = 0, so x^p and t(x) vanish
                    one_hot.mul_(keep)
                work = chunks.buffer(2, chunk)
                sums[0].add_(_power(x, p, work).sum(-1))
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
        g_x, g_tp = _expand(grad[0]), _expand(grad[1])
        grad_logits = torch.empty_like(logits) if probs is None else probs
        chunks = _Chunks(logits, grad.dtype)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in chunks:
                x = _chunk_probs(probs, logits, chunks, chunk, activation, ctx.shift)
                # dL/dx = e t'(x) dL/dTP + p x^(p-1) dL/dS_x
                grad_x = chunks.one_hot(chunks.buffer(1, chunk), labels, chunk).mul_(g_tp)
                if p not in (1, 2):
                    grad_x.mul_(_true_positive_slope(x, p))
                if p == 1:
                    grad_x.add_(g_x)
                else:
                    grad_x.add_(torch.pow(x, p - 1, out=chunks.buffer(2, chunk)).mul_(p * g_x))
                keep = _chunk_mask(mask, chunks, chunk, 1)
                if keep is not None:
                    grad_x.mul_(keep)
                _activation_backward_into(grad_logits[:, :, chunk], x, grad_x, activation, chunks.plane(0, chunk))
        return grad_logits, None, None, None, None, None, None


def fused_sums(
    logits: torch.Tensor,
    prepared: PreparedTarget,
    activation: str | None,
    p: float,
    variant: int,
    logit_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unchecked core of :func:`fused_cardinalities`: ``(tp, fp, fn, count)``, each ``(B, C)``.

    ``count`` is the voxel count per image and class for hard labels (None for soft targets). ``logit_range``,
    the smallest and largest logit when known (from :func:`~medjdt.losses._inputs.check_logits`), lets the
    softmax skip the per-voxel maximum.
    """
    shift = _softmax_shift(activation, logit_range)
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
        return _soft_cardinalities_from_sums(sums, variant)
    keep_probs = torch.is_grad_enabled() and logits.requires_grad
    if prepared.labels is not None:
        labels = prepared.labels.reshape(batch, -1)
        sum_x, tp, count = _FusedHardSums.apply(flat_logits, labels, mask, activation, shift, float(p), keep_probs)
        return tp, sum_x - tp, count - tp, count
    target = prepared.soft.reshape(batch, channels, -1)
    sums = _FusedSoftSums.apply(flat_logits, target, mask, activation, shift, float(p), variant == 2, keep_probs)
    return _soft_cardinalities_from_sums(sums, variant)


def _soft_cardinalities_from_sums(sums: torch.Tensor, variant: int):
    """``(tp, fp, fn, None)`` from the soft sums ``S_x, S_y, S_d`` (and ``S_xy`` for variant 2)."""
    sum_x, sum_y, sum_diff = sums[0], sums[1], sums[2]
    if variant == 2:
        return sums[3], (sum_x - sum_y + sum_diff) / 2, (sum_y - sum_x + sum_diff) / 2, None
    tp = (sum_x + sum_y - sum_diff) / 2
    return tp, sum_x - tp, sum_y - tp, None


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
        ValueError: bad activation, ``p`` or ``variant``, and the input errors of :class:`~medjdt.losses.JDTLoss`.
    """
    check_activation(activation)
    _check_p_variant(p, variant)
    logit_range = check_logits(logits, activation)
    prepared = prepare_target(logits, target, mask, ignore_index)
    tp, fp, fn, _ = fused_sums(logits, prepared, activation, p, variant, logit_range)
    return tp, fp, fn

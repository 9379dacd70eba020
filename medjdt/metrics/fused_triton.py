"""The one-pass metric sums of :func:`medjdt.metrics.fused.voxel_sums` as one Triton kernel, for CUDA tensors.

On a GPU the torch code of :func:`~medjdt.metrics.fused.voxel_sums` builds its histograms with ``index_add_``:
every voxel adds atomically into one of a few dozen global bins, and the atomics on the same addresses serialise.
Here one program sums a tile of voxels of one image (``_ITERS`` blocks of ``_BLOCK`` voxels, read as one row per
class) and keeps all its sums on chip: counts are ``tl.histogram`` calls (shared memory, private to the program),
binned float sums reductions over the voxel axis of a comparison of each voxel's bin with ``tl.arange`` over the
bins. Each program then adds every sum to the output with one atomic add, so the global atomics per bin are the
number of programs, not of voxels.

The hard counts come out as the histograms the reference functions of :mod:`medjdt.metrics.overlap` build (the
argmax confusion matrix and, with levels, the joint histogram of the number of levels below x and below y per
class) and turn into TP/FP/FN and the thresholded counts the same way.

Accuracy: float sums are float32 over one program's ``_BLOCK * _ITERS`` voxels (a tree sum per block, then a
running sum over the blocks: relative error below ~2e-6 in the worst case, ~1e-7 typically) and float64 from
there (float64 atomics); counts are exact (int32 per program, float64 outputs, exact to 2**53 voxels). The
order of the atomic adds varies, so float sums may differ in the last bits from run to run (counts never do).

Nothing here synchronises with the host: the outputs are one zero-initialised float64 buffer, the levels a
device tensor cached per (levels, device), and the grid depends on shapes only.

Triton is optional (``pip install triton``; CUDA builds of torch ship it); the kernel needs ``tl.histogram``
with a ``mask`` (Triton 3.4 or later, see :func:`triton_supports`). With ``TRITON_INTERPRET=1`` set before first
use, the kernel runs on CPU tensors through Triton's interpreter (how the tests check it without a GPU).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from medjdt.losses.fused_triton import triton_available
from medjdt.metrics._checks import MetricInputs, check_levels
from medjdt.metrics._sums import VoxelSums
from medjdt.metrics.overlap import OverlapSums, resolve_levels, threshold_counts_from_histogram
from medjdt.validation import check_number

__all__ = ["triton_supports", "triton_voxel_sums"]

# Voxels per block (one class row in registers: one voxel per thread with 4 warps) and blocks per program. A
# program's global atomics are amortised over _BLOCK * _ITERS voxels; (2, 3, 128**3) gives 2 x 1024 programs.
# Compiled for sm_90, the variants for C = 3 take 45-125 registers per thread, and none spills up to the limits below.
_BLOCK = 128
_ITERS = 16
_NUM_WARPS = 4
# The kernel unrolls its loops over the classes and levels and keeps a (C, C) confusion and (C, L * L) band
# histograms on chip; beyond these sizes voxel_sums' torch code is the better tool.
_MAX_CLASSES = 16
_MAX_LEVELS = 15
_PROBS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LABEL_DTYPES = (torch.int64, torch.int32)

_LEVELS_ON: dict[tuple, Tensor] = {}


@functools.cache
def _triton_has_masked_histogram() -> bool:
    """Whether Triton is importable and its ``tl.histogram`` takes a ``mask`` (Triton >= 3.4)."""
    if not triton_available():
        return False
    import triton.language as tl

    return "mask" in inspect.signature(tl.histogram).parameters


def triton_supports(
    inputs: MetricInputs, levels: Sequence[float] = (), *, thresholds: Sequence[float] | None = None
) -> bool:
    """Whether :func:`triton_voxel_sums` can take these inputs: Triton >= 3.4 is installed, probs ``(B, C, N)``
    and a soft reference are float32/float16/bfloat16 (not float64), C <= ``_MAX_CLASSES`` and at most
    ``_MAX_LEVELS`` levels (``thresholds``: their deprecated name). Reads no tensor values."""
    levels = resolve_levels("triton_supports", levels, thresholds, default=())
    probs, target = inputs.probs, inputs.target
    return (
        probs.dtype in _PROBS_DTYPES
        and (target.dtype in _PROBS_DTYPES if inputs.soft else target.dtype in _LABEL_DTYPES)
        and probs.ndim == 3
        and probs.shape[1] <= _MAX_CLASSES
        and len(levels) <= _MAX_LEVELS
        and _triton_has_masked_histogram()
    )


@functools.cache
def _kernel():
    """The kernel, imported on first use (importing triton is slow and optional)."""
    if not _triton_has_masked_histogram():
        raise ModuleNotFoundError(
            "triton_voxel_sums needs Triton 3.4 or later (masked tl.histogram); pip install -U triton."
        )
    import triton

    from medjdt.metrics._triton_kernels import voxel_sums_kernel

    return triton, voxel_sums_kernel


def _levels_on(levels: tuple[float, ...], device: torch.device) -> Tensor:
    """float32 levels on ``device``, cached: a host-to-device copy on every batch would synchronise."""
    key = (levels, device)
    if key not in _LEVELS_ON:
        if len(_LEVELS_ON) > 64:
            _LEVELS_ON.clear()
        _LEVELS_ON[key] = torch.tensor(levels, dtype=torch.float32).to(device)
    return _LEVELS_ON[key]


def _check_inputs(inputs: MetricInputs) -> None:
    """Shapes, dtypes and devices the kernel reads; the values are not read (that would synchronise)."""
    probs, target, mask = inputs.probs, inputs.target, inputs.mask
    if probs.ndim != 3 or probs.dtype not in _PROBS_DTYPES:
        raise ValueError(
            f"probs must be a (B, C, N) float32, float16 or bfloat16 tensor, got shape {tuple(probs.shape)} and "
            f"dtype {probs.dtype}; use medjdt.metrics.fused.voxel_sums for float64."
        )
    batch, channels, n_voxels = probs.shape
    if not 2 <= channels <= _MAX_CLASSES or n_voxels == 0:
        raise ValueError(
            f"probs must have 2 to {_MAX_CLASSES} classes and at least 1 voxel, got shape {tuple(probs.shape)}; "
            "use medjdt.metrics.fused.voxel_sums for more classes."
        )
    if inputs.soft:
        if tuple(target.shape) != tuple(probs.shape) or target.dtype not in _PROBS_DTYPES:
            raise ValueError(
                f"a soft reference must be a float32, float16 or bfloat16 tensor of the shape of probs "
                f"{tuple(probs.shape)}, got shape {tuple(target.shape)} and dtype {target.dtype}."
            )
    elif tuple(target.shape) != (batch, n_voxels) or target.dtype not in _LABEL_DTYPES:
        raise ValueError(
            f"hard labels must be an int64 or int32 tensor of shape {(batch, n_voxels)}, got shape "
            f"{tuple(target.shape)} and dtype {target.dtype}."
        )
    if mask is not None and (tuple(mask.shape) != (batch, n_voxels) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {(batch, n_voxels)}, got shape {tuple(mask.shape)} and dtype "
            f"{mask.dtype}."
        )
    for name, tensor in (("target", target), ("mask", mask)):
        if tensor is not None and tensor.device != probs.device:
            raise ValueError(f"{name} is on {tensor.device} but probs is on {probs.device}.")
    if probs.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got probs on {probs.device} (set TRITON_INTERPRET=1 before "
            "first use to run it on CPU tensors through Triton's interpreter)."
        )


def triton_voxel_sums(
    inputs: MetricInputs,
    *,
    n_bins: int | None = None,
    overlap: bool = False,
    levels: Sequence[float] = (),
    eps: float = 1e-7,
    unchecked: bool = False,
    thresholds: Sequence[float] | None = None,
) -> VoxelSums:
    """Calibration sums (when ``n_bins`` is given) and overlap sums (when ``overlap``) in one Triton kernel.

    Same contract and results as :func:`medjdt.metrics.fused.voxel_sums` (counts exactly, sums to about 1e-7
    relative), without host synchronisation.

    Args:
        inputs: probabilities ``(B, C, N)`` float32, float16 or bfloat16 (contiguous copies are made if needed),
            hard labels ``(B, N)`` int64/int32 or a soft reference ``(B, C, N)`` float32/float16/bfloat16, and an
            optional mask ``(B, N)`` bool (False voxels contribute nothing); usually from
            :func:`~medjdt.metrics._checks.prepare_inputs`. Values are read in float32.
        n_bins: number of calibration bins M; None skips the calibration sums (top-label and classwise bins,
            squared error, NLL).
        overlap: compute the overlap sums (argmax TP/FP/FN, |x|_1, |y|_1, |x - y|_1, threshold counts).
        levels: strictly increasing levels in (0, 1) of the thresholded Dice (with ``overlap``); empty gives
            ``thr_*`` with T = 0 entries.
        eps: floor of the probabilities inside the log of the NLL, in (0, 1).
        unchecked: the values of ``inputs`` have not been checked yet (``prepare_inputs(defer=True)``). Accepted
            for parity with :func:`~medjdt.metrics.fused.voxel_sums`; the kernel always clamps every histogram
            key into range (the bin of NaN or of a value outside [0, 1] becomes an edge bin, a label outside
            [0, C) the nearest class), so bad values give wrong sums, which the pending check reports, but never
            an out-of-range index.
        thresholds: deprecated name of ``levels``.

    Returns:
        :class:`~medjdt.metrics.fused.VoxelSums` (float64): ``top_label`` ``(3, B, M)``, ``classwise``
        ``(3, B, C, M)``, ``squared_error`` and ``nll`` ``(B,)``, ``overlap`` with ``(B, C)`` and ``(B, C, T)``
        fields; a part not requested is None.

    Raises:
        ValueError: on shapes, dtypes or devices the kernel cannot read, more than ``_MAX_CLASSES`` classes or
            ``_MAX_LEVELS`` levels (see :func:`triton_supports`), ``n_bins < 1``, bad levels, ``eps`` outside
            (0, 1), or both ``levels`` and ``thresholds``.
        ModuleNotFoundError: when Triton is missing or older than 3.4.
    """
    where = "triton_voxel_sums"
    levels = resolve_levels(where, levels, thresholds, default=())
    if n_bins is not None:
        n_bins = check_number("n_bins", n_bins, low=1, integer=True, where=where)
    eps = check_number("eps", eps, low=0, high=1, low_inclusive=False, high_inclusive=False, where=where)
    levels = check_levels(levels, where=where) if overlap and len(levels) else ()
    if len(levels) > _MAX_LEVELS:
        raise ValueError(
            f"{where}: at most {_MAX_LEVELS} levels, got {len(levels)}; use medjdt.metrics.fused.voxel_sums"
        )
    _check_inputs(inputs)
    if n_bins is None and not overlap:
        return VoxelSums.nothing()
    triton, kernel = _kernel()

    probs, target, mask = inputs.probs.contiguous(), inputs.target.contiguous(), inputs.mask
    mask = None if mask is None else mask.contiguous().view(torch.uint8)
    batch, channels, n_voxels = probs.shape
    bins, bands = n_bins or 0, len(levels) + 1
    sizes = (3 * batch * bins, 3 * batch * channels * bins, 2 * batch, batch * channels * channels,
             3 * batch * channels, batch * channels * bands * bands)  # fmt: skip
    out = torch.zeros(sum(sizes), dtype=torch.float64, device=probs.device)
    top, classwise, image, confusion, masses, histogram = out.split(sizes)
    level_values = _levels_on(levels, probs.device) if levels else out

    grid = (triton.cdiv(n_voxels, _BLOCK * _ITERS), batch)
    kernel[grid](
        probs, target, probs if mask is None else mask, level_values,
        top, classwise, image, confusion, masses, histogram,
        n_voxels, batch, max(bins, 1), eps,
        C=channels, SOFT=inputs.soft, HAS_MASK=mask is not None, CALIBRATION=n_bins is not None,
        OVERLAP=overlap, N_THR=len(levels),
        C_PAD=triton.next_power_of_2(channels), M_PAD=triton.next_power_of_2(max(bins, 1)),
        CC_PAD=triton.next_power_of_2(channels * channels), LL_PAD=triton.next_power_of_2(bands * bands),
        BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_NUM_WARPS,
    )  # fmt: skip

    calibration = {"top_label": None, "classwise": None, "squared_error": None, "nll": None}
    if n_bins is not None:
        calibration = {
            "top_label": top.view(3, batch, bins),
            "classwise": classwise.view(3, batch, channels, bins),
            "squared_error": image[:batch],
            "nll": image[batch:],
        }
    overlap_sums = None
    if overlap:
        confusion = confusion.view(batch, channels, channels)  # [b, predicted, reference]
        tp = confusion.diagonal(dim1=-2, dim2=-1)
        pred_mass, ref_mass, abs_diff = masses.view(3, batch, channels)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram.view(batch, channels, bands, bands))
        overlap_sums = OverlapSums(
            tp, confusion.sum(-1) - tp, confusion.sum(-2) - tp, pred_mass, ref_mass, abs_diff, thr_tp, thr_pred, thr_ref
        )
    return VoxelSums(**calibration, overlap=overlap_sums)

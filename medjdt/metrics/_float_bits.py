"""Integer arithmetic on the bit patterns of probabilities: bands between levels and the argmax over classes.

For non-negative IEEE floats, ``v > t`` exactly when ``bits(v) > bits(t)`` as integers. On CPUs integer
arithmetic is several times cheaper than float comparisons, whose bool results are slow to produce, so the
one-pass sums of :mod:`medjdt.metrics.fused` compare bit patterns: :class:`Bands` counts the levels below each
value, :func:`argmax_bits` and :func:`argmax_one_hot_bits` find the predicted class. Every function here takes
*clean* bit patterns (:func:`clean_bits`): those of values in [0, 1], without -0.0.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from medjdt.metrics._chunk_work import ChunkWork

# Bands come from a lookup table (one gather and four integer operations) instead of three integer operations per
# level when there are at least this many levels and the table has at most _MAX_TABLE_CELLS entries.
_MIN_TABLE_LEVELS = 4
_MAX_TABLE_CELLS = 1 << 16


def int_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the bit patterns of float32 / float64 values."""
    return torch.int32 if dtype == torch.float32 else torch.int64


@functools.lru_cache(maxsize=256)
def float_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded to ``dtype`` (float32 or float64), as a Python int."""
    return int(torch.tensor(value, dtype=dtype).view(int_dtype(dtype)))


def clean_bits(values: Tensor, out: Tensor) -> Tensor:
    """Bit patterns of ``values`` clamped to those of [0, 1], into the contiguous integer tensor ``out``.

    Viewed as floats they are the values themselves, contiguous, except that -0.0 becomes 0.0 and NaN or values
    outside [0, 1] (only in unchecked inputs) become 0 or 1, so no later step can index out of range.
    """
    return torch.clamp(values.view(out.dtype), 0, float_bits(1.0, values.dtype), out=out)


class Bands:
    """``band(v)``: the number of levels strictly below v, as ``torch.bucketize(v, levels)`` with the levels
    rounded to the dtype of v, computed from the clean bit patterns of v.

    Few levels cost ``clamp(bits(v) - bits(t), 0, 1)`` each. Otherwise a table over the high bits does it with one
    gather: cells of 2**shift consecutive bit patterns, 2**shift at most the smallest gap between levels, hold at
    most one level each; the table holds ``below * 2**shift + (2**shift - 1 - offset of the level inside the
    cell)`` (offset 2**shift - 1 for a cell without one), so that ``(offset of v in its cell + table[cell]) >>
    shift`` is the number of levels below the cell plus one if v lies above the level inside it.
    """

    def __init__(self, levels: tuple[float, ...], dtype: torch.dtype) -> None:
        self.int_dtype = int_dtype(dtype)
        one = float_bits(1.0, dtype)
        self.edges = [float_bits(t, dtype) for t in levels]
        gaps = [b - a for a, b in zip(self.edges, self.edges[1:])]
        self.shift = min(gaps).bit_length() - 1 if gaps else one.bit_length()  # 2**shift <= smallest gap
        self.offset_mask = (1 << self.shift) - 1
        cells = (one >> self.shift) + 1
        self.table = None
        if len(self.edges) >= _MIN_TABLE_LEVELS and cells <= _MAX_TABLE_CELLS:
            low = torch.arange(cells, dtype=torch.int64) << self.shift
            edges = torch.tensor(self.edges, dtype=torch.int64)
            below = torch.searchsorted(edges, low)  # levels < first pattern of the cell
            inside = edges[below.clamp_max(len(self.edges) - 1)] - low
            offset = torch.where((below < len(self.edges)) & (inside <= self.offset_mask), inside, self.offset_mask)
            self.table = ((below << self.shift) + self.offset_mask - offset).to(self.int_dtype)
        self._tables_on: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        # cached per device: copying host values to an accelerator on every chunk would synchronise
        if device not in self._tables_on:
            self._tables_on[device] = self.table.to(device)
        return self._tables_on[device]

    def into(self, bits: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """``out`` = band of the values whose clean bit patterns are ``bits``; all three contiguous, of the bit
        patterns' integer dtype and the same shape. Returns ``out``."""
        if self.table is None:
            out.zero_()
            for edge in self.edges:
                out.add_(torch.sub(bits, edge, out=scratch).clamp_(0, 1))
            return out
        cell = torch.bitwise_right_shift(bits, self.shift, out=scratch)
        torch.index_select(self._table(bits.device), 0, cell.view(-1), out=out.view(-1))
        out.add_(torch.bitwise_and(bits, self.offset_mask, out=scratch))
        return out.bitwise_right_shift_(self.shift)


@functools.lru_cache(maxsize=64)
def bands(levels: tuple[float, ...], dtype: torch.dtype) -> Bands:
    """The :class:`Bands` of ``levels`` for values of ``dtype``, built once per (levels, dtype)."""
    return Bands(levels, dtype)


def argmax_bits(bits: Tensor, work: ChunkWork, tag: str) -> tuple[Tensor, Tensor]:
    """Max over dim 1 of the clean bit patterns ``bits`` ``(B, C, n)``, ``(B, n)``, and its first index, int32
    ``(B, n)``; the work tensors are named after ``tag``.

    A chain over the classes is much faster on CPUs than ``torch.max(dim=1)`` over the strided axis.
    """
    batch, channels, n = bits.shape
    maximum = work.get(f"{tag}_max", bits.dtype, (batch, n)).copy_(bits[:, 0])
    index = work.get(f"{tag}_index", torch.int32, (batch, n)).zero_()
    better = work.get(f"{tag}_better", bits.dtype, (batch, n))
    for c in range(1, channels):
        torch.sub(bits[:, c], maximum, out=better).clamp_(0, 1)  # strict: ties keep the first index
        torch.maximum(maximum, bits[:, c], out=maximum)
        # later classes only raise the index, so max(index, c * better) moves it to c where c is better
        torch.maximum(index, better.mul_(c), out=index)
    return maximum, index


def argmax_one_hot_bits(bits: Tensor, work: ChunkWork) -> Tensor:
    """[c is the first index of the max over dim 1] for clean bit patterns ``bits`` ``(B, C, n)``, as an
    integer ``(B, C, n)`` tensor of 0 and 1 (the one-hot of :func:`argmax_bits`' index, without the index)."""
    batch, channels, n = bits.shape
    maximum = work.get("one_hot_max", bits.dtype, (batch, n)).copy_(bits[:, 0])
    for c in range(1, channels):
        torch.maximum(maximum, bits[:, c], out=maximum)
    # x_c - max <= 0, so 1 + (x_c - max) clamped at 0 is [x_c == max]
    one_hot = torch.sub(bits, maximum[:, None], out=work.get("one_hot_argmax", bits.dtype))
    one_hot.add_(1).clamp_min_(0)
    # ties: only the first maximal class keeps its 1
    seen = work.get("one_hot_seen", bits.dtype, (batch, n)).copy_(one_hot[:, 0])
    unseen = work.get("one_hot_unseen", bits.dtype, (batch, n))
    for c in range(1, channels):
        one_hot[:, c].mul_(torch.sub(1, seen, out=unseen))
        if c < channels - 1:
            seen.add_(one_hot[:, c])
    return one_hot

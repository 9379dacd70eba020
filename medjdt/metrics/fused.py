"""All per-batch metric sums in one pass over the voxels: calibration bins, Brier, NLL and overlap sums.

:class:`~medjdt.metrics.CalibrationMetrics` and :class:`~medjdt.metrics.OverlapMetrics` need, per image, the
top-label and classwise reliability bins, the squared error and cross-entropy sums, the argmax confusion
counts, |x|_1, |y|_1, |x - y|_1 and the joint threshold-level histogram of the thresholded Dice. The functions
of :mod:`medjdt.metrics.calibration` and :mod:`medjdt.metrics.overlap` compute each of them separately over
the whole batch (they stay the reference). :func:`voxel_sums` computes all of them while walking once over the
voxels in chunks:

- every histogram is keyed by a mixed-radix number of small per-voxel digits, so that one key per voxel and
  class (class rows) covers them all: ``bin(x_c)`` joint with the threshold level of x_c and the reference
  digit ([label == c] and [predicted == c] for hard labels, the threshold level of y_c for a soft reference).
  Top-label bins and confusion counts of hard labels are marginals of these (the confidence is x_c of the
  predicted class c); a soft reference adds one key per voxel (top row) for them, since its accuracy is y at
  the predicted class. The marginals are taken on the small histograms afterwards. One ``bincount`` gives every
  count and one weighted ``bincount`` per value every binned sum, in float64;
- threshold levels and the reference digits are integer arithmetic on the bit patterns of the probabilities
  (see :class:`_Levels`), which is cheaper on CPUs than float comparisons producing bool tensors;
- every chunk's work tensors are allocated once and reused, so they stay in the CPU cache and no voxel-sized
  temporary is ever allocated (fresh allocations cost page faults that take longer than the arithmetic);
- dense per-(image, class) sums are float32 sums over a chunk, accumulated in float64.

Nothing in here synchronises with the host, so on an accelerator a batch is queued without waiting for it
(there the counts are float64 ``index_add_`` sums: ``bincount`` reads its largest key on the host).
The results equal those of the reference functions: counts exactly, sums to float rounding (the binned sums
are float64 sums of the float32 values; the dense sums float32 sums over at most one chunk, then float64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medjdt.metrics._checks import MetricInputs
from medjdt.metrics.calibration import _close_last_bin
from medjdt.metrics.overlap import OverlapSums, threshold_counts_from_histogram

__all__ = ["VoxelSums", "voxel_sums"]

# Values (voxels x classes) per chunk on a CPU, per torch thread: the work tensors of a chunk stay in the L2/L3
# cache, and each operation is long enough to amortise its dispatch and the threads' start. Accelerators take
# larger chunks (fewer kernel launches); the buffers stay small next to the input.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_MAX_CPU_CHUNK_ELEMENTS = 1 << 20  # with many threads: the work tensors stay below ~100 MB
_CHUNK_ELEMENTS_OTHER = 1 << 22
# Devices whose counts and binned sums use bincount (fast on CPUs; counts exact in int64). On accelerators bincount
# synchronises with the host (it reads the largest key first), so there they are float64 index_add_ sums (counts
# exact to 2**53).
_BINCOUNT_DEVICES = {"cpu"}
# Every histogram is kept in this many copies and voxel i adds into copy i % _LANES. Neighbouring voxels mostly
# share their key (large uniform regions), and a scatter-add into one address must wait for the previous add to
# it; spreading neighbours over copies removes that serial dependency (about 3x faster on such data).
_LANES = 4
# Class rows whose joint key (bins x levels x reference and predicted digits) would exceed this many keys are split
# into a calibration row and a threshold row (many bins and thresholds, above all with a soft reference).
_MAX_JOINT_KEYS = 4096
# Threshold levels come from a lookup table (one gather and four integer operations) instead of three integer
# operations per threshold when there are at least this many thresholds and the table has at most _MAX_TABLE_CELLS
# entries.
_MIN_TABLE_THRESHOLDS = 4
_MAX_TABLE_CELLS = 1 << 16

# Devices on which voxel_sums hands the inputs to the Triton kernel of medjdt.metrics.fused_triton when it supports
# them (Triton installed; see triton_supports): one kernel launch per batch instead of dozens per chunk.
_TRITON_DEVICES = {"cuda"}

# Slots of the dense per-(image, class) sums.
_X_SUM, _Y_SUM, _ABS_DIFF, _SQUARES, _LOG = range(5)


@dataclass(frozen=True)
class VoxelSums:
    """Per-image sums of one batch, float64; a field is None when it was not requested.

    Attributes:
        top_label: ``(3, B, M)`` top-label bins: count, confidence sum, accuracy sum.
        classwise: ``(3, B, C, M)`` classwise bins: count, probability sum, reference sum.
        squared_error: ``(B,)`` sum over voxels of sum_c (p_c - y_c)^2.
        nll: ``(B,)`` sum over voxels of -sum_c y_c log(max(p_c, eps)).
        overlap: the :class:`~medjdt.metrics.overlap.OverlapSums`.
    """

    top_label: Tensor | None
    classwise: Tensor | None
    squared_error: Tensor | None
    nll: Tensor | None
    overlap: OverlapSums | None


@dataclass(frozen=True)
class _ClassRows:
    """C rows per image keyed by ``bin(x_c) + bins * (level(x_c) + levels * (reference + references * predicted))``.

    Each field is the radix of its digit (1: digit absent). The reference digit is [label == c] (hard labels,
    radix 2) or level(y_c) (soft reference, radix T + 1); the predicted digit [argmax == c] (hard labels).
    """

    predicted: int
    references: int
    levels: int
    bins: int

    @property
    def size(self) -> int:
        return self.predicted * self.references * self.levels * self.bins


class _Layout:
    """The histograms of one image, one row each, and their key ranges.

    Hard labels: one or two groups of C class rows (:class:`_ClassRows`) with the reference digit [label == c]
    and the predicted digit [argmax == c]; x_c is summed over the first group, which holds the bins. The
    top-label bins are its rows restricted to predicted == 1 (the confidence is x_c of the predicted class), the
    confusion counts its marginals over bins, <x, y>_c its x sums over label == c.

    Soft reference: row 0 (top row, one key per voxel) is ``bin(confidence) + top_bins * (predicted * C +
    reference)``, the confusion digits (reference: the majority class of y) only for overlap; confidence and
    accuracy (y at the predicted class) are summed over it. Then the class rows with the reference digit
    level(y_c) (thresholds) and the bins (calibration; x_c and y_c summed).

    A second group of class rows only when one joint key per class would exceed ``_MAX_JOINT_KEYS``. Bins have
    M + 1 keys: key M (value 1.0) is merged into bin M - 1 at the end. Values are summed (weighted bincount) over
    the first ``sum_rows`` rows.
    """

    def __init__(self, channels: int, n_bins: int | None, overlap: bool, n_thresholds: int, soft: bool) -> None:
        self.channels, self.n_bins, self.overlap, self.soft = channels, n_bins, overlap, soft
        self.calibration = n_bins is not None
        self.n_thresholds = n_thresholds if overlap else 0
        bins = n_bins + 1 if self.calibration else 1
        levels = self.n_thresholds + 1
        self.has_top = soft
        self.top_bins = bins
        self.top_size = bins * (channels * channels if overlap else 1) if soft else 0

        if soft:
            references = levels
            joint = _ClassRows(1, references, levels, bins)
            split = [_ClassRows(1, 1, 1, bins), _ClassRows(1, references, levels, 1)]
            needed = self.calibration or self.n_thresholds
        else:
            joint = _ClassRows(2, 2, levels, bins)
            split = [_ClassRows(2, 2, 1, bins), _ClassRows(1, 2, levels, 1)]
            needed = True
        self.groups: list[_ClassRows] = []
        if needed:
            too_large = joint.size > _MAX_JOINT_KEYS and self.calibration and self.n_thresholds
            self.groups = split if too_large else [joint]

        sizes = [self.top_size] * self.has_top + [group.size for group in self.groups for _ in range(channels)]
        self.row_starts = tuple(sum(sizes[:r]) for r in range(len(sizes)))
        self.keys_per_image = sum(sizes)
        self.n_rows = len(sizes)
        if soft:
            self.sum_rows, self.n_values = (1 + channels, 2) if self.calibration else (0, 0)
        else:
            self.sum_rows, self.n_values = channels, 1


@functools.lru_cache(maxsize=256)
def _float_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded to ``dtype`` (float32 or float64), as a Python int."""
    return int(torch.tensor(value, dtype=dtype).view(_int_dtype(dtype)))


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the bit patterns of float32 / float64 values."""
    return torch.int32 if dtype == torch.float32 else torch.int64


class _Levels:
    """``level(v)``: the number of thresholds strictly below v, as ``torch.bucketize(v, thresholds)`` with the
    thresholds rounded to the dtype of v, computed from the bit patterns of v in [0, 1] (see :func:`_clean_bits`).

    For non-negative IEEE floats, v > t exactly when bits(v) > bits(t) as integers, and on CPUs integer arithmetic
    is several times cheaper than float comparisons (whose bool results are slow to produce). Few thresholds cost
    ``clamp(bits(v) - bits(t), 0, 1)`` each. Otherwise a table over the high bits does it with one gather: cells of
    2**shift consecutive bit patterns, 2**shift at most the smallest gap between thresholds, hold at most one
    threshold each; the table holds ``below * 2**shift + (2**shift - 1 - offset of the threshold inside the cell)``
    (offset 2**shift - 1 for a cell without one), so that ``(offset of v in its cell + table[cell]) >> shift`` is
    the number of thresholds below the cell plus one if v lies above the threshold inside it.
    """

    def __init__(self, thresholds: tuple[float, ...], dtype: torch.dtype) -> None:
        self.int_dtype = _int_dtype(dtype)
        one = _float_bits(1.0, dtype)
        self.edges = [_float_bits(t, dtype) for t in thresholds]
        gaps = [b - a for a, b in zip(self.edges, self.edges[1:])]
        self.shift = min(gaps).bit_length() - 1 if gaps else one.bit_length()  # 2**shift <= smallest gap
        self.offset_mask = (1 << self.shift) - 1
        cells = (one >> self.shift) + 1
        self.table = None
        if len(self.edges) >= _MIN_TABLE_THRESHOLDS and cells <= _MAX_TABLE_CELLS:
            low = torch.arange(cells, dtype=torch.int64) << self.shift
            edges = torch.tensor(self.edges, dtype=torch.int64)
            below = torch.searchsorted(edges, low)  # thresholds < first pattern of the cell
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
        """``out`` = level of the values whose clean bit patterns are ``bits``; all three contiguous, of the bit
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


def _clean_bits(values: Tensor, out: Tensor) -> Tensor:
    """Bit patterns of ``values`` clamped to those of [0, 1], into the contiguous integer tensor ``out``.

    Viewed as floats they are the values themselves, contiguous, except that -0.0 becomes 0.0 and NaN or values
    outside [0, 1] (only in unchecked inputs) become 0 or 1, so no later step can index out of range.
    """
    return torch.clamp(values.view(out.dtype), 0, _float_bits(1.0, values.dtype), out=out)


@functools.lru_cache(maxsize=64)
def _levels(thresholds: tuple[float, ...], dtype: torch.dtype) -> _Levels:
    return _Levels(thresholds, dtype)


_OFFSETS: dict[tuple, Tensor] = {}


def _row_offsets(layout: _Layout, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(B, rows, 1)`` offsets ``b * keys_per_image + start of row r``, cached per device: building them from
    host values would copy to the device, a host synchronisation, on every batch."""
    key = (layout.row_starts, layout.keys_per_image, batch, device, dtype)
    if key not in _OFFSETS:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        image_starts = torch.arange(batch) * layout.keys_per_image
        row_starts = torch.tensor(layout.row_starts, dtype=torch.long)
        _OFFSETS[key] = (image_starts[:, None] + row_starts)[..., None].to(dtype).to(device)
    return _OFFSETS[key]


class _Work:
    """Work tensors for chunks of ``n`` voxels, allocated on first use and reused by every chunk."""

    def __init__(self, probs: Tensor, n: int) -> None:
        self._probs, self.n = probs, n
        self._store: dict[str, Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
        """Tensor ``name`` of ``shape`` (default ``(B, C, n)``), contiguous, uninitialised on first use."""
        tensor = self._store.get(name)
        if tensor is None:
            batch, channels, _ = self._probs.shape
            size = (batch, channels, self.n) if shape is None else shape
            tensor = self._store[name] = self._probs.new_empty(size, dtype=dtype)
        return tensor


def _argmax(bits: Tensor, work: _Work, tag: str) -> tuple[Tensor, Tensor]:
    """Max over dim 1 of the clean bit patterns ``bits`` ``(B, C, n)`` (see :func:`_clean_bits`), ``(B, n)``,
    and its first index, int32 ``(B, n)``.

    Integer arithmetic on the bit patterns orders the values as floats do and avoids the bool tensors of float
    comparisons; a chain over the classes is much faster on CPUs than ``torch.max(dim=1)`` over the strided axis.
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


def _argmax_one_hot(bits: Tensor, work: _Work) -> Tensor:
    """[c is the first index of the max over dim 1] for clean bit patterns ``bits`` ``(B, C, n)``, as an
    integer ``(B, C, n)`` tensor of 0 and 1 (the one-hot of :func:`_argmax`'s index, without the index)."""
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


def _compose(out: Tensor, digits: list[tuple[Tensor, int]]) -> Tensor:
    """``out`` = mixed-radix number of ``(digit, radix)`` pairs, most significant first."""
    out.copy_(digits[0][0])
    for digit, radix in digits[1:]:
        torch.add(digit, out, alpha=radix, out=out)
    return out


class _Pass:
    """Accumulators of one :func:`voxel_sums` call and the per-chunk work that fills them."""

    def __init__(
        self,
        inputs: MetricInputs,
        layout: _Layout,
        thresholds: tuple[float, ...],
        eps: float,
        unchecked: bool,
        step: int,
    ) -> None:
        self.inputs, self.layout, self.eps, self.unchecked = inputs, layout, eps, unchecked
        probs = inputs.probs
        batch, channels, n_voxels = probs.shape
        self.device = probs.device
        self.levels = _levels(thresholds, probs.dtype) if layout.n_thresholds else None
        self.n_keys = batch * layout.keys_per_image  # key n_keys of each lane collects the masked voxels
        self.lane_keys = self.n_keys + 1
        total = _LANES * self.lane_keys
        self.index_dtype = torch.int32 if total < 2**31 else torch.int64
        self.bincount = self.device.type in _BINCOUNT_DEVICES
        count_dtype = torch.long if self.bincount else torch.float64
        self.counts = torch.zeros(total, dtype=count_dtype, device=self.device)
        self.binned = torch.zeros(layout.n_values, total, dtype=torch.float64, device=self.device)
        # dense sums of every chunk in the input dtype, added up in float64 at the end
        n_chunks = -(-n_voxels // step)
        self.partials = torch.zeros(n_chunks, 5, batch, channels, dtype=probs.dtype, device=self.device)
        self.offsets = _row_offsets(layout, batch, self.device, self.index_dtype)
        self.classes = torch.arange(channels, device=self.device, dtype=torch.int32).view(1, channels, 1)

    def _bins(self, values: Tensor, work: _Work, tag: str) -> Tensor:
        """int32 ``floor(value * M)`` (truncation; key M for 1.0) of values in [0, 1], as the reference bins."""
        shape = tuple(values.shape)
        scaled = torch.mul(values, self.layout.n_bins, out=work.get(f"{tag}_scaled", values.dtype, shape))
        return work.get(f"{tag}_bins", torch.int32, shape).copy_(scaled)

    def _one_hot(self, index: Tensor, work: _Work, tag: str) -> Tensor:
        """int32 ``(B, C, n)`` [index == c] for an int32 ``(B, n)`` index, as ``1 - |index - c|`` clamped at 0:
        integer arithmetic, cheaper on CPUs than a comparison producing bool."""
        one_hot = torch.sub(index[:, None], self.classes, out=work.get(tag, torch.int32))
        return one_hot.abs_().neg_().add_(1).clamp_min_(0)

    def _scatter(self, totals: Tensor, keys: Tensor, weights: Tensor | None = None) -> None:
        """Add the count (or the ``weights``) of every key to ``totals``."""
        # bincount returns a histogram-sized tensor: with more keys than elements (many classes and images, small
        # chunks) adding into the totals directly is cheaper
        if self.bincount and totals.shape[0] <= keys.shape[0]:
            totals += torch.bincount(keys, weights=weights, minlength=totals.shape[0])
        elif weights is None:
            totals.index_add_(0, keys, torch.ones((), dtype=totals.dtype, device=self.device).expand_as(keys))
        else:
            totals.index_add_(0, keys, weights)

    def new_work(self, n: int) -> _Work:
        """Work tensors for chunks of ``n`` voxels, with the key offsets of every row, image and lane."""
        work = _Work(self.inputs.probs, n)
        lanes = torch.arange(n, device=self.device, dtype=self.index_dtype).remainder_(_LANES).mul_(self.lane_keys)
        torch.add(lanes, self.n_keys, out=work.get("trash", self.index_dtype, (n,)))
        batch, rows = self.inputs.probs.shape[0], self.layout.n_rows
        torch.add(self.offsets, lanes, out=work.get("offsets", self.index_dtype, (batch, rows, n)))
        return work

    def add(self, index: int, chunk: slice, work: _Work) -> None:
        """Add the sums of the voxels ``chunk``, the ``index``-th chunk."""
        layout, inputs = self.layout, self.inputs
        soft, calibration = inputs.soft, layout.calibration
        float_dtype, int_dtype = inputs.probs.dtype, _int_dtype(inputs.probs.dtype)
        # From here on x (and y) are contiguous copies with clean values (see _clean_bits).
        x_bits = _clean_bits(inputs.probs[:, :, chunk], work.get("x_bits", int_dtype))
        x = x_bits.view(float_dtype)
        batch, channels, n = x.shape
        keys = work.get("keys", self.index_dtype, (batch, layout.n_rows, n))
        keep = None if inputs.mask is None else inputs.mask[:, chunk]
        keep_real = None if keep is None else work.get("keep", float_dtype, (batch, 1, n)).copy_(keep[:, None])

        if soft:
            y_bits = _clean_bits(inputs.target[:, :, chunk], work.get("y_bits", int_dtype))
            y = y_bits.view(float_dtype)
            confidence, predicted = _argmax(x_bits, work, "x")
            # top row: bin(confidence) + top_bins * (predicted * C + majority class of y)
            digits = [(predicted, channels), (_argmax(y_bits, work, "y")[1], channels)] if layout.overlap else []
            if calibration:
                confidence = confidence.view(float_dtype)
                digits.append((self._bins(confidence, work, "top"), layout.top_bins))
            _compose(keys[:, 0], digits)
        else:
            labels = work.get("labels", torch.int32, (batch, n)).copy_(inputs.target[:, chunk])
            if self.unchecked:
                labels.clamp_(0, channels - 1)
            label_digit = self._one_hot(labels, work, "label_one_hot")
            predicted_digit = _argmax_one_hot(x_bits, work)

        # class rows: bin(x_c) + bins * (level(x_c) + levels * (reference + references * predicted))
        bins_x = self._bins(x, work, "class") if calibration else None
        level_x = level_y = None
        if layout.n_thresholds:
            scratch = work.get("level_scratch", int_dtype)
            level_x = self.levels.into(x_bits, work.get("level_x", int_dtype), scratch)
            if soft:
                level_y = self.levels.into(y_bits, work.get("level_y", int_dtype), scratch)
        row = int(layout.has_top)
        for group in layout.groups:
            digits = [(predicted_digit, 2)] if group.predicted > 1 else []
            if group.references > 1:
                digits.append((level_y if soft else label_digit, group.references))
            if group.levels > 1:
                digits.append((level_x, group.levels))
            if group.bins > 1:
                digits.append((bins_x, group.bins))
            _compose(keys[:, row : row + channels], digits)
            row += channels

        keys.add_(work.get("offsets", self.index_dtype))
        if keep is not None:  # masked voxels go to key n_keys of their lane
            keep_index = work.get("keep_index", self.index_dtype, (batch, 1, n)).copy_(keep[:, None])
            trash = torch.sub(1, keep_index, out=work.get("drop", self.index_dtype, (batch, 1, n)))
            keys.mul_(keep_index).add_(trash.mul_(work.get("trash", self.index_dtype)))
        self._scatter(self.counts, keys.view(-1))

        if layout.n_values:
            values = work.get("values", torch.float64, (layout.n_values, batch, layout.sum_rows, n))
            if soft:
                values[0, :, 0].copy_(confidence)
                values[0, :, 1:].copy_(x)
                gather_index = work.get("gather_index", torch.int64, (batch, 1, n)).copy_(predicted[:, None])
                accuracy = torch.gather(y, 1, gather_index, out=work.get("accuracy", float_dtype, (batch, 1, n)))
                values[1, :, 0].copy_(accuracy[:, 0])
                values[1, :, 1:].copy_(y)
            else:
                values[0].copy_(x)
            summed_keys = keys[:, : layout.sum_rows]
            summed_keys = summed_keys.view(-1) if summed_keys.is_contiguous() else summed_keys.reshape(-1)
            for v in range(layout.n_values):
                self._scatter(self.binned[v], summed_keys, values[v].view(-1))

        partials = self.partials[index]
        if soft:
            self._soft_dense_sums(x, y, keep_real, work, partials)
        else:
            self._hard_dense_sums(x, label_digit, keep_real, work, partials)

    def _hard_dense_sums(self, x: Tensor, label_digit: Tensor, keep: Tensor | None, work: _Work, out: Tensor) -> None:
        """Per-(image, class) sums over the chunk into ``out`` ``(5, B, C)`` (hard labels)."""
        layout = self.layout
        x_kept = x if keep is None else torch.mul(x, keep, out=work.get("x_kept", x.dtype))
        if layout.overlap:
            torch.sum(x_kept, -1, out=out[_X_SUM])
        if layout.calibration:
            torch.linalg.vecdot(x_kept, x, out=out[_SQUARES])
            # log of the probability of the labelled class, sum_c x_c [label == c] (one non-zero term)
            product = torch.mul(x, label_digit, out=work.get("product", x.dtype))
            batch, channels, n = x.shape
            p_label = torch.add(product[:, 0], product[:, 1], out=work.get("p_label", x.dtype, (batch, n)))
            for c in range(2, channels):
                p_label.add_(product[:, c])
            log = p_label.clamp_min_(self.eps).log_()
            if keep is not None:
                log.mul_(keep[:, 0])
            torch.sum(log, -1, keepdim=True, out=out[_LOG, :, :1])

    def _soft_dense_sums(self, x: Tensor, y: Tensor, keep: Tensor | None, work: _Work, out: Tensor) -> None:
        """Per-(image, class) sums over the chunk into ``out`` ``(5, B, C)`` (soft reference)."""
        layout = self.layout
        x_kept = x if keep is None else torch.mul(x, keep, out=work.get("x_kept", x.dtype))
        y_kept = y if keep is None else torch.mul(y, keep, out=work.get("y_kept", y.dtype))
        if layout.overlap:
            torch.sum(x_kept, -1, out=out[_X_SUM])
            torch.sum(y_kept, -1, out=out[_Y_SUM])
        diff = torch.sub(x_kept, y_kept, out=work.get("diff", x.dtype))
        if layout.calibration:
            torch.linalg.vecdot(diff, diff, out=out[_SQUARES])
            log_x = torch.clamp_min(x, self.eps, out=work.get("log_x", x.dtype)).log_()
            torch.linalg.vecdot(y_kept, log_x, out=out[_LOG])
        if layout.overlap:
            torch.sum(diff.abs_(), -1, out=out[_ABS_DIFF])


def voxel_sums(
    inputs: MetricInputs,
    *,
    n_bins: int | None = None,
    overlap: bool = False,
    thresholds: Sequence[float] = (),
    eps: float = 1e-7,
    unchecked: bool = False,
) -> VoxelSums:
    """Calibration sums (when ``n_bins`` is given) and overlap sums (when ``overlap``) in one pass.

    Args:
        inputs: validated inputs from :func:`~medjdt.metrics._checks.prepare_inputs`: probabilities
            ``(B, C, N)``, hard labels ``(B, N)`` or a soft reference ``(B, C, N)``, optional mask ``(B, N)``.
        n_bins: number of calibration bins M; None skips the calibration sums.
        overlap: compute the overlap sums (Dice, IoU and soft Dice sums).
        thresholds: strictly increasing thresholds of the thresholded Dice (with ``overlap``); empty skips the
            threshold counts (``thr_*`` then have T = 0 entries).
        eps: floor of the probabilities inside the log of the NLL.
        unchecked: the values of ``inputs`` have not been checked yet (``prepare_inputs(defer=True)``); labels are
            then clamped into range (probabilities always are), so that NaN, values outside [0, 1] or bad labels
            give wrong sums (which the pending check reports) but never an out-of-range index.

    Returns:
        :class:`VoxelSums`, equal to :func:`~medjdt.metrics.calibration.top_label_bin_sums`,
        :func:`~medjdt.metrics.calibration.classwise_bin_sums`,
        :func:`~medjdt.metrics.calibration.squared_error_sums`, :func:`~medjdt.metrics.calibration.nll_sums`
        and :func:`~medjdt.metrics.overlap.overlap_sums` on the same inputs. On CUDA tensors the Triton kernel
        :func:`~medjdt.metrics.fused_triton.triton_voxel_sums` computes them when it supports the inputs.
    """
    if n_bins is None and not overlap:
        return VoxelSums(top_label=None, classwise=None, squared_error=None, nll=None, overlap=None)
    probs = inputs.probs
    batch, channels, n_voxels = probs.shape
    thresholds = tuple(thresholds) if overlap else ()
    if probs.device.type in _TRITON_DEVICES:
        from medjdt.metrics.fused_triton import triton_supports, triton_voxel_sums  # imports this module

        if triton_supports(inputs, thresholds):
            options = {"n_bins": n_bins, "overlap": overlap, "thresholds": thresholds, "eps": eps}
            return triton_voxel_sums(inputs, **options, unchecked=unchecked)
    layout = _Layout(channels, n_bins, overlap, len(thresholds), inputs.soft)
    if probs.device.type == "cpu":
        budget = min(_CHUNK_ELEMENTS["cpu"] * torch.get_num_threads(), _MAX_CPU_CHUNK_ELEMENTS)
    else:
        budget = _CHUNK_ELEMENTS.get(probs.device.type, _CHUNK_ELEMENTS_OTHER)
    step = max(1, min(n_voxels, budget // (batch * channels)))
    state = _Pass(inputs, layout, thresholds, eps, unchecked, step)
    work = None
    for index, start in enumerate(range(0, n_voxels, step)):
        chunk = slice(start, min(start + step, n_voxels))
        if work is None or work.n != chunk.stop - chunk.start:
            work = state.new_work(chunk.stop - chunk.start)
        state.add(index, chunk, work)
    return _assemble(state)


def _assemble(state: _Pass) -> VoxelSums:
    """Marginals of the joint histograms: the per-metric sums."""
    layout, dense = state.layout, state.partials.sum(0, dtype=torch.float64)
    batch, channels = dense.shape[1:]
    n_values, keys = layout.n_values, layout.keys_per_image
    per_image = state.counts.view(_LANES, state.lane_keys).sum(0)[:-1].view(batch, keys).double()
    binned = state.binned.view(n_values, _LANES, state.lane_keys).sum(1)[:, :-1].view(n_values, batch, keys)

    # class rows: counts (B, C, predicted, reference, level, bin), sums with a leading value axis
    groups = []
    start = layout.top_size
    for group in layout.groups:
        shape = (batch, channels, group.predicted, group.references, group.levels, group.bins)
        stop = start + channels * group.size
        groups.append((group, per_image[:, start:stop].view(shape), binned[:, :, start:stop].view(n_values, *shape)))
        start = stop
    if layout.soft:
        return _assemble_soft(layout, dense, per_image, binned, groups)
    return _assemble_hard(layout, dense, groups)


def _assemble_hard(layout: _Layout, dense: Tensor, groups: list) -> VoxelSums:
    """Hard labels: top-label bins and confusion counts are the class rows of the predicted classes."""
    _, counts, sums = groups[0]  # the group with the predicted digit and the bins
    counts = counts.sum(4)  # over levels: (B, C, predicted, label, bin)
    x_sums = sums[0].sum(4)
    product = x_sums[:, :, :, 1].sum((2, 3))  # <x, y>_c: x_c summed over the voxels labelled c
    label_counts = counts[:, :, :, 1].sum((2, 3))  # |y|_c

    top_label = classwise = squared_error = nll = None
    if layout.calibration:
        classwise = torch.stack([counts.sum((2, 3)), x_sums.sum((2, 3)), counts[:, :, :, 1].sum(2)])
        classwise = _close_last_bin(classwise)
        predicted = counts[:, :, 1].sum(1)  # predicted classes, summed over classes: (B, label == c, bin)
        top_label = torch.stack([predicted.sum(1), x_sums[:, :, 1].sum((1, 2)), predicted[:, 1]])
        top_label = _close_last_bin(top_label)
        # one-hot y: sum_c (x_c - y_c)^2 = sum_c x_c^2 - 2 <x, y> + |y|
        squared_error = (dense[_SQUARES] - 2 * product + label_counts).sum(-1)
        nll = -dense[_LOG].sum(-1)

    overlap_sums = None
    if layout.overlap:
        confusion = counts.sum(-1)  # (B, C, predicted == c, label == c)
        tp, fp, fn = confusion[..., 1, 1], confusion[..., 1, 0], confusion[..., 0, 1]
        pred_mass = dense[_X_SUM]
        # one-hot y: |x - y|_1 = |x|_1 + |y|_1 - 2 <x, y>
        abs_diff = pred_mass + label_counts - 2 * product
        histogram = _threshold_histogram(layout, groups, tp)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram)
        overlap_sums = OverlapSums(tp, fp, fn, pred_mass, label_counts, abs_diff, thr_tp, thr_pred, thr_ref)
    return VoxelSums(
        top_label=top_label, classwise=classwise, squared_error=squared_error, nll=nll, overlap=overlap_sums
    )


def _assemble_soft(layout: _Layout, dense: Tensor, per_image: Tensor, binned: Tensor, groups: list) -> VoxelSums:
    """Soft reference: top-label bins and confusion counts from the top row."""
    batch, channels = dense.shape[1:]
    pairs = (channels, channels) if layout.overlap else (1, 1)
    top = per_image[:, : layout.top_size].view(batch, *pairs, layout.top_bins)  # (B, predicted, reference, bin)
    top_sums = binned[:, :, : layout.top_size].view(layout.n_values, batch, *pairs, layout.top_bins)

    top_label = classwise = squared_error = nll = None
    if layout.calibration:
        _, counts, sums = groups[0]  # the group with the bins
        counts, sums = counts.sum((2, 3, 4)), sums.sum((3, 4, 5))  # (B, C, bin), (values, B, C, bin)
        classwise = _close_last_bin(torch.stack([counts, sums[0], sums[1]]))
        top_label = _close_last_bin(torch.stack([top.sum((1, 2)), top_sums[0].sum((1, 2)), top_sums[1].sum((1, 2))]))
        squared_error = dense[_SQUARES].sum(-1)
        nll = -dense[_LOG].sum(-1)

    overlap_sums = None
    if layout.overlap:
        confusion = top.sum(-1)  # (B, predicted, reference)
        tp = confusion.diagonal(dim1=-2, dim2=-1)
        histogram = _threshold_histogram(layout, groups, tp)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram)
        overlap_sums = OverlapSums(
            tp,
            confusion.sum(-1) - tp,
            confusion.sum(-2) - tp,
            dense[_X_SUM],
            dense[_Y_SUM],
            dense[_ABS_DIFF],
            thr_tp,
            thr_pred,
            thr_ref,
        )
    return VoxelSums(
        top_label=top_label, classwise=classwise, squared_error=squared_error, nll=nll, overlap=overlap_sums
    )


def _threshold_histogram(layout: _Layout, groups: list, like: Tensor) -> Tensor:
    """Joint histogram ``(B, C, L, L)`` of (level of x, level of y) for :func:`threshold_counts_from_histogram`;
    ``(B, C, 1, 1)`` zeros without thresholds."""
    batch, channels = like.shape
    if not layout.n_thresholds:
        return like.new_zeros(batch, channels, 1, 1)
    group, counts, _ = next(g for g in groups if g[0].levels > 1)
    counts = counts.sum((2, 5))  # (B, C, reference digit, level of x)
    if layout.soft:
        return counts.transpose(-1, -2)
    # a one-hot 1 lies above every threshold: level T where label == c, else 0
    levels = group.levels
    histogram = like.new_zeros(batch, channels, levels, levels)
    histogram[..., 0] = counts[:, :, 0]
    histogram[..., levels - 1] = counts[:, :, 1]
    return histogram

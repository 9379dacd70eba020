"""The chunked torch pass of :func:`medjdt.metrics.fused.voxel_sums`: every histogram and sum of a batch while
walking once over its voxels.

- each chunk computes one key per voxel and histogram row (:mod:`._voxel_layout`), from band and argmax digits
  found by integer arithmetic on the probabilities' bit patterns (:mod:`._float_bits`); one ``bincount`` gives
  every count and one weighted ``bincount`` per value every binned sum, in float64;
- every chunk's work tensors are allocated once and reused (:class:`~._chunk_work.ChunkWork`), so they stay in
  the CPU cache and no voxel-sized temporary is ever allocated;
- dense per-(image, class) sums are float32 sums over a chunk, accumulated in float64.

Nothing in here synchronises with the host, so on an accelerator a batch is queued without waiting for it
(there the counts are float64 ``index_add_`` sums: ``bincount`` reads its largest key on the host).
The results equal those of the reference functions: counts exactly, sums to float rounding (the binned sums
are float64 sums of the float32 values; the dense sums float32 sums over at most one chunk, then float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from medjdt.metrics._checks import MetricInputs
from medjdt.metrics._chunk_work import ChunkWork
from medjdt.metrics._float_bits import argmax_bits, argmax_one_hot_bits, bands, clean_bits, int_dtype
from medjdt.metrics._sums import VoxelSums
from medjdt.metrics._voxel_assembly import assemble
from medjdt.metrics._voxel_layout import ABS_DIFF, LOG, SQUARES, X_SUM, Y_SUM, KeyLayout, compose, row_offsets

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


class VoxelPass:
    """Accumulators of one :func:`chunked_voxel_sums` call and the per-chunk work that fills them."""

    def __init__(
        self,
        inputs: MetricInputs,
        layout: KeyLayout,
        levels: tuple[float, ...],
        eps: float,
        unchecked: bool,
        step: int,
    ) -> None:
        self.inputs, self.layout, self.eps, self.unchecked = inputs, layout, eps, unchecked
        probs = inputs.probs
        batch, channels, n_voxels = probs.shape
        self.device = probs.device
        self.bands = bands(levels, probs.dtype) if layout.n_levels else None
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
        self.offsets = row_offsets(layout, batch, self.device, self.index_dtype)
        self.classes = torch.arange(channels, device=self.device, dtype=torch.int32).view(1, channels, 1)

    def totals(self) -> tuple[Tensor, Tensor, Tensor]:
        """The sums so far, float64: dense ``(5, B, C)``, counts ``(B, keys)`` and binned sums ``(values, B,
        keys)``, the lanes added up and the masked voxels' keys dropped."""
        batch, keys, n_values = self.inputs.probs.shape[0], self.layout.keys_per_image, self.layout.n_values
        dense = self.partials.sum(0, dtype=torch.float64)
        counts = self.counts.view(_LANES, self.lane_keys).sum(0)[:-1].view(batch, keys).double()
        binned = self.binned.view(n_values, _LANES, self.lane_keys).sum(1)[:, :-1].view(n_values, batch, keys)
        return dense, counts, binned

    def _bins(self, values: Tensor, work: ChunkWork, tag: str) -> Tensor:
        """int32 ``floor(value * M)`` (truncation; key M for 1.0) of values in [0, 1], as the reference bins."""
        shape = tuple(values.shape)
        scaled = torch.mul(values, self.layout.n_bins, out=work.get(f"{tag}_scaled", values.dtype, shape))
        return work.get(f"{tag}_bins", torch.int32, shape).copy_(scaled)

    def _one_hot(self, index: Tensor, work: ChunkWork, tag: str) -> Tensor:
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

    def new_work(self, n: int) -> ChunkWork:
        """Work tensors for chunks of ``n`` voxels, with the key offsets of every row, image and lane."""
        work = ChunkWork(self.inputs.probs, n)
        lanes = torch.arange(n, device=self.device, dtype=self.index_dtype).remainder_(_LANES).mul_(self.lane_keys)
        torch.add(lanes, self.n_keys, out=work.get("trash", self.index_dtype, (n,)))
        batch, rows = self.inputs.probs.shape[0], self.layout.n_rows
        torch.add(self.offsets, lanes, out=work.get("offsets", self.index_dtype, (batch, rows, n)))
        return work

    def add(self, index: int, chunk: slice, work: ChunkWork) -> None:
        """Add the sums of the voxels ``chunk``, the ``index``-th chunk."""
        layout, inputs = self.layout, self.inputs
        soft, calibration = inputs.soft, layout.calibration
        float_dtype, bits_dtype = inputs.probs.dtype, int_dtype(inputs.probs.dtype)
        # From here on x (and y) are contiguous copies with clean values (see clean_bits).
        x_bits = clean_bits(inputs.probs[:, :, chunk], work.get("x_bits", bits_dtype))
        x = x_bits.view(float_dtype)
        batch, channels, n = x.shape
        keys = work.get("keys", self.index_dtype, (batch, layout.n_rows, n))
        keep = None if inputs.mask is None else inputs.mask[:, chunk]
        keep_real = None if keep is None else work.get("keep", float_dtype, (batch, 1, n)).copy_(keep[:, None])

        if soft:
            y_bits = clean_bits(inputs.target[:, :, chunk], work.get("y_bits", bits_dtype))
            y = y_bits.view(float_dtype)
            confidence, predicted = argmax_bits(x_bits, work, "x")
            # top row: bin(confidence) + top_bins * (predicted * C + majority class of y)
            digits = [(predicted, channels), (argmax_bits(y_bits, work, "y")[1], channels)] if layout.overlap else []
            if calibration:
                confidence = confidence.view(float_dtype)
                digits.append((self._bins(confidence, work, "top"), layout.top_bins))
            compose(keys[:, 0], digits)
        else:
            labels = work.get("labels", torch.int32, (batch, n)).copy_(inputs.target[:, chunk])
            if self.unchecked:
                labels.clamp_(0, channels - 1)
            label_digit = self._one_hot(labels, work, "label_one_hot")
            predicted_digit = argmax_one_hot_bits(x_bits, work)

        # class rows: bin(x_c) + bins * (band(x_c) + bands * (reference + references * predicted))
        bins_x = self._bins(x, work, "class") if calibration else None
        band_x = band_y = None
        if layout.n_levels:
            scratch = work.get("band_scratch", bits_dtype)
            band_x = self.bands.into(x_bits, work.get("band_x", bits_dtype), scratch)
            if soft:
                band_y = self.bands.into(y_bits, work.get("band_y", bits_dtype), scratch)
        row = int(layout.has_top)
        for group in layout.groups:
            digits = [(predicted_digit, 2)] if group.predicted > 1 else []
            if group.references > 1:
                digits.append((band_y if soft else label_digit, group.references))
            if group.bands > 1:
                digits.append((band_x, group.bands))
            if group.bins > 1:
                digits.append((bins_x, group.bins))
            compose(keys[:, row : row + channels], digits)
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

    def _hard_dense_sums(
        self, x: Tensor, label_digit: Tensor, keep: Tensor | None, work: ChunkWork, out: Tensor
    ) -> None:
        """Per-(image, class) sums over the chunk into ``out`` ``(5, B, C)`` (hard labels)."""
        layout = self.layout
        x_kept = x if keep is None else torch.mul(x, keep, out=work.get("x_kept", x.dtype))
        if layout.overlap:
            torch.sum(x_kept, -1, out=out[X_SUM])
        if layout.calibration:
            torch.linalg.vecdot(x_kept, x, out=out[SQUARES])
            # log of the probability of the labelled class, sum_c x_c [label == c] (one non-zero term)
            product = torch.mul(x, label_digit, out=work.get("product", x.dtype))
            batch, channels, n = x.shape
            p_label = torch.add(product[:, 0], product[:, 1], out=work.get("p_label", x.dtype, (batch, n)))
            for c in range(2, channels):
                p_label.add_(product[:, c])
            log = p_label.clamp_min_(self.eps).log_()
            if keep is not None:
                log.mul_(keep[:, 0])
            torch.sum(log, -1, keepdim=True, out=out[LOG, :, :1])

    def _soft_dense_sums(self, x: Tensor, y: Tensor, keep: Tensor | None, work: ChunkWork, out: Tensor) -> None:
        """Per-(image, class) sums over the chunk into ``out`` ``(5, B, C)`` (soft reference)."""
        layout = self.layout
        x_kept = x if keep is None else torch.mul(x, keep, out=work.get("x_kept", x.dtype))
        y_kept = y if keep is None else torch.mul(y, keep, out=work.get("y_kept", y.dtype))
        if layout.overlap:
            torch.sum(x_kept, -1, out=out[X_SUM])
            torch.sum(y_kept, -1, out=out[Y_SUM])
        diff = torch.sub(x_kept, y_kept, out=work.get("diff", x.dtype))
        if layout.calibration:
            torch.linalg.vecdot(diff, diff, out=out[SQUARES])
            log_x = torch.clamp_min(x, self.eps, out=work.get("log_x", x.dtype)).log_()
            torch.linalg.vecdot(y_kept, log_x, out=out[LOG])
        if layout.overlap:
            torch.sum(diff.abs_(), -1, out=out[ABS_DIFF])


def _chunk_step(probs: Tensor) -> int:
    """Voxels per chunk for ``probs`` ``(B, C, N)`` on its device."""
    batch, channels, n_voxels = probs.shape
    if probs.device.type == "cpu":
        budget = min(_CHUNK_ELEMENTS["cpu"] * torch.get_num_threads(), _MAX_CPU_CHUNK_ELEMENTS)
    else:
        budget = _CHUNK_ELEMENTS.get(probs.device.type, _CHUNK_ELEMENTS_OTHER)
    return max(1, min(n_voxels, budget // (batch * channels)))


def chunked_voxel_sums(
    inputs: MetricInputs,
    *,
    n_bins: int | None,
    overlap: bool,
    levels: tuple[float, ...],
    eps: float,
    unchecked: bool,
) -> VoxelSums:
    """The sums of :func:`medjdt.metrics.fused.voxel_sums` by the chunked torch pass, on any device.

    Arguments as there, already checked (``levels`` empty without ``overlap``; at least one part requested).
    """
    layout = KeyLayout(inputs.num_classes, n_bins, overlap, len(levels), inputs.soft)
    n_voxels = inputs.probs.shape[-1]
    step = _chunk_step(inputs.probs)
    state = VoxelPass(inputs, layout, levels, eps, unchecked, step)
    work = None
    for index, start in enumerate(range(0, n_voxels, step)):
        chunk = slice(start, min(start + step, n_voxels))
        if work is None or work.n != chunk.stop - chunk.start:
            work = state.new_work(chunk.stop - chunk.start)
        state.add(index, chunk, work)
    return assemble(layout, *state.totals())

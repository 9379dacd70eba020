"""All per-batch metric sums in one pass over the voxels: calibration bins, Brier, NLL and overlap sums.

:class:`~medjdt.metrics.CalibrationMetrics` and :class:`~medjdt.metrics.OverlapMetrics` need, per image, the
top-label and classwise reliability bins, the squared error and cross-entropy sums, the argmax confusion
counts, |x|_1, |y|_1, |x - y|_1 and the joint threshold-level histogram of the thresholded Dice. The functions
of :mod:`medjdt.metrics.calibration` and :mod:`medjdt.metrics.overlap` compute each of them separately over
the whole batch (they stay the reference). :func:`voxel_sums` computes all of them while walking once over the
voxels in chunks:

- every chunk's per-voxel quantities (the argmax and its confidence, bin keys, the one-hot reference...) are
  written into a few buffers that are reused from chunk to chunk, so they stay in the CPU cache and no
  voxel-sized temporary is ever allocated (fresh allocations cost page faults that take longer than the
  arithmetic);
- all histograms of a chunk share one key tensor (one row per histogram, disjoint key ranges per image): one
  ``bincount`` gives every count and one ``index_add_`` every binned sum (float64, so the sums stay exact to
  float64 rounding however many voxels they collect);
- dense per-(image, class) sums are float32 sums over a chunk, accumulated in float64.

Nothing in here synchronises with the host, so on an accelerator a batch is queued without waiting for it.
The results equal those of the reference functions (counts exactly, sums to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medjdt.metrics._checks import MetricInputs
from medjdt.metrics.calibration import _close_last_bin, _split_by_correctness
from medjdt.metrics.overlap import OverlapSums, threshold_counts_from_histogram

__all__ = ["VoxelSums", "voxel_sums"]

# Values (voxels x classes) per chunk on a CPU: buffers of about 512 KiB stay in the L2/L3 cache. Accelerators
# take larger chunks (fewer kernel launches); the buffers stay small next to the input.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_CHUNK_ELEMENTS_OTHER = 1 << 22
# Devices whose counts use bincount (fast on CPUs, exact int64). On accelerators bincount synchronises with the
# host (it reads the largest key first), so counts are float64 index_add_ sums of ones there (exact to 2**53).
_BINCOUNT_DEVICES = {"cpu"}


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


class _Layout:
    """Key ranges of the histograms of one image, in the order of the rows of the key tensor.

    Rows: top-label (1 row, 2(M+1) keys: bin + (M+1) * correct), classwise (C rows, 2(M+1) keys each: bin +
    (M+1) * [label == c]; a soft reference uses the first M+1), confusion (1 row, C*C keys: predicted * C +
    reference), threshold levels (C rows, L*L keys each: level(x) * L + level(y), L = T + 1; none without
    thresholds). One extra key after the last image collects the masked voxels.
    """

    def __init__(self, channels: int, n_bins: int | None, overlap: bool, n_thresholds: int) -> None:
        self.bin_keys = 0 if n_bins is None else 2 * (n_bins + 1)
        self.levels = n_thresholds + 1
        row_sizes = []
        if n_bins is not None:
            row_sizes += [self.bin_keys] * (1 + channels)
        if overlap:
            row_sizes += [channels * channels]
        if overlap and n_thresholds:
            row_sizes += [self.levels * self.levels] * channels
        self.row_starts = tuple(sum(row_sizes[:r]) for r in range(len(row_sizes)))
        self.keys_per_image = sum(row_sizes)
        self.n_rows = len(row_sizes)
        self.calibration_rows = 1 + channels if n_bins is not None else 0


def _class_argmax(values: Tensor, out_max: Tensor, out_index: Tensor, better: Tensor, follow=None, out_follow=None):
    """Max over dim 1 of ``values`` ``(B, C, n)`` and its first index, into ``(B, n)`` buffers.

    With ``follow`` ``(B, C, n)``, ``out_follow`` receives ``follow`` at the argmax (e.g. the soft reference of
    the predicted class). The chain of elementwise maxima is much faster on CPUs than ``torch.max(dim=1)``.
    """
    out_max.copy_(values[:, 0])
    out_index.zero_()
    if follow is not None:
        out_follow.copy_(follow[:, 0])
    for c in range(1, values.shape[1]):
        torch.gt(values[:, c], out_max, out=better)  # strict: ties keep the first index
        torch.maximum(out_max, values[:, c], out=out_max)
        out_index.masked_fill_(better, c)
        if follow is not None:
            torch.where(better, follow[:, c], out_follow, out=out_follow)


def _levels(values: Tensor, thresholds: Sequence[float], out: Tensor, scratch: Tensor) -> Tensor:
    """Number of thresholds strictly below each value (``torch.bucketize(right=False)``) into uint8 ``out``.

    Comparisons against the (few) thresholds are several times faster on CPUs than the binary search of
    ``bucketize``; the Python floats compare in the dtype of ``values``, as bucketize's edges do.
    """
    out.zero_()
    for threshold in thresholds:
        out.add_(torch.gt(values, threshold, out=scratch))  # scratch has out's dtype: no conversion
    return out


def _truncate_into(out: Tensor, values: Tensor, scale: float, scratch: Tensor, narrow: Tensor) -> None:
    """``out = int(values * scale)`` (truncation, i.e. floor for values >= 0), via int32: a float to int64
    conversion is twice as slow."""
    torch.mul(values, scale, out=scratch)
    out.copy_(narrow.copy_(scratch))


_OFFSETS: dict[tuple, Tensor] = {}


def _offsets(layout: _Layout, batch: int, device: torch.device) -> Tensor:
    """``(rows, B, 1)`` offsets ``b * keys_per_image + start of row r``, cached per device: building them from
    host values would copy to the device, a host synchronisation, on every batch."""
    key = (layout.row_starts, layout.keys_per_image, batch, device)
    if key not in _OFFSETS:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        image_starts = torch.arange(batch) * layout.keys_per_image
        row_starts = torch.tensor(layout.row_starts, dtype=torch.long)
        _OFFSETS[key] = (row_starts[:, None] + image_starts)[..., None].to(device)
    return _OFFSETS[key]


class _Buffers:
    """Chunk-sized buffers, allocated on first use and reused by every chunk."""

    def __init__(self, like: Tensor, n_max: int) -> None:
        self._like, self._n_max = like, n_max
        self._store: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A contiguous tensor of ``shape`` whose last dim is the chunk length (at most ``n_max``)."""
        full = (*shape[:-1], self._n_max)
        buffer = self._store.get(name)
        if buffer is None:
            buffer = self._store[name] = self._like.new_empty(torch.Size(full).numel(), dtype=dtype)
        return buffer[: torch.Size(shape).numel()].view(shape)


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
        unchecked: the values of ``inputs`` have not been checked yet (``prepare_inputs(defer=True)``); keys are
            then clamped into range, so that NaN, values outside [0, 1] or bad labels give wrong sums (which the
            pending check reports) but never an out-of-range index.

    Returns:
        :class:`VoxelSums`, equal to :func:`~medjdt.metrics.calibration.top_label_bin_sums`,
        :func:`~medjdt.metrics.calibration.classwise_bin_sums`,
        :func:`~medjdt.metrics.calibration.squared_error_sums`, :func:`~medjdt.metrics.calibration.nll_sums`
        and :func:`~medjdt.metrics.overlap.overlap_sums` on the same inputs.
    """
    probs, target, mask, soft = inputs.probs, inputs.target, inputs.mask, inputs.soft
    batch, channels, n_voxels = probs.shape
    device, dtype = probs.device, probs.dtype
    calibration = n_bins is not None
    thresholds = tuple(thresholds)
    layout = _Layout(channels, n_bins, overlap, len(thresholds))
    n_keys = batch * layout.keys_per_image
    offsets = _offsets(layout, batch, device)
    exact_counts = device.type in _BINCOUNT_DEVICES
    counts = torch.zeros(n_keys + 1, dtype=torch.long if exact_counts else torch.float64, device=device)
    binned = torch.zeros(2, n_keys + 1, dtype=torch.float64, device=device) if calibration else None
    dense = torch.zeros(6, batch, channels, dtype=torch.float64, device=device)  # |x|, |y|, |x-y|, sq, nll, <x,y>
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_OTHER)
    step = max(1, min(n_voxels, budget // (batch * channels)))
    buffers = _Buffers(probs, step)
    classes = torch.arange(channels, device=device).view(1, channels, 1)

    for start in range(0, n_voxels, step):
        chunk = slice(start, min(start + step, n_voxels))
        n = chunk.stop - chunk.start
        x = probs[:, :, chunk]
        keep = None if mask is None else buffers.get("keep", (batch, 1, n), dtype).copy_(mask[:, None, chunk])
        keys = buffers.get("keys", (layout.n_rows, batch, n), torch.long)
        scratch = buffers.get("scratch", (batch, channels, n), dtype)

        row = 0

        # The reference: one-hot (hard) or the soft values, and the reference label for the confusion counts.
        if soft:
            y = target[:, :, chunk]
            one_hot = None
        else:
            labels = target[:, chunk]
            one_hot = torch.eq(labels[:, None], classes, out=buffers.get("one_hot", (batch, channels, n), torch.bool))
            y = buffers.get("y", (batch, channels, n), dtype).copy_(one_hot)
        y_kept = y if keep is None else torch.mul(y, keep, out=buffers.get("y_kept", (batch, channels, n), dtype))
        x_kept = x if keep is None else torch.mul(x, keep, out=buffers.get("x_kept", (batch, channels, n), dtype))

        confidence = buffers.get("confidence", (batch, n), dtype)
        predicted = buffers.get("predicted", (batch, n), torch.long)
        better = buffers.get("better", (batch, n), torch.bool)
        accuracy = buffers.get("accuracy", (batch, n), dtype) if soft else None
        _class_argmax(x, confidence, predicted, better, follow=y if soft else None, out_follow=accuracy)

        if calibration:
            # top-label key: bin of the confidence, + (M+1) for a correct voxel (hard reference)
            top = keys[row]
            narrow = buffers.get("narrow", (batch, channels, n), torch.int32)
            _truncate_into(top, confidence, n_bins, scratch[:, 0], narrow[:, 0])
            if not soft:
                top.add_(torch.eq(predicted, labels, out=better), alpha=n_bins + 1)
            classwise = keys[row + 1 : row + 1 + channels].view(channels, batch, n).transpose(0, 1)
            _truncate_into(classwise, x, n_bins, scratch, narrow)
            if not soft:
                classwise.add_(one_hot, alpha=n_bins + 1)
            row += 1 + channels
        if overlap:
            if soft:  # the majority class of the raters; ties go to the lower class index
                reference = buffers.get("reference", (batch, n), torch.long)
                _class_argmax(y, buffers.get("reference_max", (batch, n), dtype), reference, better)
            else:
                reference = labels
            torch.add(reference, predicted, alpha=channels, out=keys[row])
            row += 1
        if overlap and thresholds:
            level_keys = keys[row : row + channels].view(channels, batch, n).transpose(0, 1)
            # level(x) * L + level(y) < L * L <= 256 for up to 15 thresholds; wider keys need int64 arithmetic
            small = layout.levels * layout.levels <= 256
            level_dtype = torch.uint8 if small else torch.long
            level = buffers.get("level", (batch, channels, n), level_dtype)
            flags = buffers.get("flags", (batch, channels, n), level_dtype)
            _levels(x, thresholds, level, flags).mul_(layout.levels)
            if soft:
                level_y = buffers.get("level_y", (batch, channels, n), level_dtype)
                level.add_(_levels(y, thresholds, level_y, flags))
            else:
                level.add_(one_hot, alpha=len(thresholds))  # a one-hot 1 lies above every threshold
            level_keys.copy_(level)
            row += channels

        keys.add_(offsets)
        if unchecked:
            keys.clamp_(0, n_keys)
        if mask is not None:
            keys.masked_fill_(~mask[None, :, chunk], n_keys)  # the extra key collects the excluded voxels
        flat_keys = keys.view(-1)
        if exact_counts:
            counts.add_(torch.bincount(flat_keys, minlength=n_keys + 1))
        else:
            counts.index_add_(0, flat_keys, torch.ones((), dtype=counts.dtype, device=device).expand_as(flat_keys))
        if calibration:
            n_rows = layout.calibration_rows
            calibration_keys = flat_keys[: n_rows * batch * n]
            values = buffers.get("values", (n_rows, batch, n), torch.float64)
            values[0].copy_(confidence)
            values[1:].copy_(x.transpose(0, 1))
            binned[0].index_add_(0, calibration_keys, values.view(-1))
            if soft:
                values[0].copy_(accuracy)
                values[1:].copy_(y.transpose(0, 1))
                binned[1].index_add_(0, calibration_keys, values.view(-1))

        # dense sums per image and class
        dense[0] += x_kept.sum(-1)
        dense[1] += y_kept.sum(-1)
        dense[5] += torch.linalg.vecdot(x_kept, y)
        if soft:
            diff = torch.sub(x, y, out=scratch)
            if keep is not None:
                diff.mul_(keep)
            dense[3] += torch.linalg.vecdot(diff, diff)
            dense[2] += diff.abs_().sum(-1)
            if calibration:
                # float64 from here: the log and its weighted sum are the least forgiving of rounding
                wide = buffers.get("wide", (2, batch, channels, n), torch.float64)
                log_x = wide[0].copy_(x).clamp_min_(eps).log_()
                dense[4] -= torch.linalg.vecdot(wide[1].copy_(y_kept), log_x)
        else:
            dense[3] += torch.linalg.vecdot(x_kept, x)
            if calibration:
                # probability of the labelled class: sum_c x_c [label == c]
                own = buffers.get("own", (batch, n), dtype)
                torch.sum(torch.mul(x, y, out=scratch), 1, out=own)  # exact: one term is non-zero
                own = buffers.get("own_wide", (batch, n), torch.float64).copy_(own)
                own.clamp_min_(eps).log_()
                if keep is not None:
                    own.mul_(keep[:, 0])
                dense[4, :, 0] -= own.sum(-1)

    return _assemble(counts, binned, dense, layout, inputs, n_bins, overlap, thresholds)


def _assemble(counts, binned, dense, layout, inputs, n_bins, overlap, thresholds) -> VoxelSums:
    """Split the flat histograms into the per-metric sums."""
    batch, channels, _ = inputs.probs.shape
    per_image = counts[:-1].view(batch, layout.keys_per_image).double()
    x_mass, y_mass, _, _, _, product = dense
    if inputs.soft:
        abs_diff, squared_error = dense[2], dense[3].sum(-1)
    else:  # one-hot y: |x - y|_1 = |x|_1 + |y|_1 - 2 <x, y> and (x - y)^2 = x^2 - 2 x y + y
        abs_diff = x_mass + y_mass - 2 * product
        squared_error = (dense[3] - 2 * product + y_mass).sum(-1)

    top_label = classwise = nll = None
    start = 0
    if n_bins is not None:
        width = layout.bin_keys
        n_keys = n_bins + 1
        sums = binned[:, :-1].view(2, batch, layout.keys_per_image)
        rows = torch.stack([per_image, sums[0], sums[1]])[..., : width * (1 + channels)]
        rows = rows.unflatten(-1, (1 + channels, width))  # (3, B, 1 + C, 2(M+1))
        if inputs.soft:
            rows = rows[..., :n_keys]
        else:
            # hard: count and probability sums over both halves, accuracy = count of the "correct" half
            rows = _split_by_correctness(rows[:2], n_keys)
        rows = _close_last_bin(rows)
        top_label, classwise = rows[:, :, 0], rows[:, :, 1:]
        nll = dense[4].sum(-1)
        start = width * (1 + channels)

    overlap_sums = None
    if overlap:
        confusion = per_image[:, start : start + channels * channels].view(batch, channels, channels)
        tp = confusion.diagonal(dim1=-2, dim2=-1)  # confusion[b, predicted, reference]
        start += channels * channels
        levels = layout.levels
        if thresholds:
            histogram = per_image[:, start : start + channels * levels * levels]
            histogram = histogram.view(batch, channels, levels, levels)
        else:
            histogram = per_image.new_zeros(batch, channels, 1, 1)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram)
        overlap_sums = OverlapSums(
            tp, confusion.sum(-1) - tp, confusion.sum(-2) - tp, x_mass, y_mass, abs_diff, thr_tp, thr_pred, thr_ref
        )
    return VoxelSums(
        top_label=top_label,
        classwise=classwise,
        squared_error=squared_error if n_bins is not None else None,
        nll=nll,
        overlap=overlap_sums,
    )

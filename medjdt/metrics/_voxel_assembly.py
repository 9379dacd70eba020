"""From the joint histograms of the one-pass sums to the sums of each metric: marginals of small tensors.

The chunked pass (:mod:`._voxel_pass`) leaves per image one count histogram and the binned value sums over the
rows of a :class:`~._voxel_layout.KeyLayout`, and the dense per-(image, class) sums. Here they become the
:class:`~._sums.VoxelSums` the reference functions of :mod:`medjdt.metrics.calibration` and
:mod:`medjdt.metrics.overlap` compute one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medjdt.metrics._sums import VoxelSums
from medjdt.metrics._voxel_layout import ABS_DIFF, LOG, SQUARES, X_SUM, Y_SUM, ClassRows, KeyLayout
from medjdt.metrics.calibration import close_last_bin
from medjdt.metrics.overlap import OverlapSums, threshold_counts_from_histogram

# One group of class rows: its radices, counts (B, C, predicted, reference, band, bin) and value sums with a
# leading value axis.
_Group = tuple[ClassRows, Tensor, Tensor]


def assemble(layout: KeyLayout, dense: Tensor, counts: Tensor, binned: Tensor) -> VoxelSums:
    """The per-metric sums from the totals of a pass.

    Args:
        layout: the rows the keys were laid out in.
        dense: ``(5, B, C)`` float64 dense sums (slots of :mod:`._voxel_layout`).
        counts: ``(B, keys_per_image)`` float64 counts.
        binned: ``(n_values, B, keys_per_image)`` float64 binned value sums.
    """
    batch, channels = dense.shape[1:]
    groups: list[_Group] = []
    start = layout.top_size
    for group in layout.groups:
        shape = (batch, channels, group.predicted, group.references, group.bands, group.bins)
        stop = start + channels * group.size
        groups.append(
            (group, counts[:, start:stop].view(shape), binned[:, :, start:stop].view(layout.n_values, *shape))
        )
        start = stop
    if layout.soft:
        return _assemble_soft(layout, dense, counts, binned, groups)
    return _assemble_hard(layout, dense, groups)


def _assemble_hard(layout: KeyLayout, dense: Tensor, groups: list[_Group]) -> VoxelSums:
    """Hard labels: top-label bins and confusion counts are the class rows of the predicted classes."""
    _, counts, sums = groups[0]  # the group with the predicted digit and the bins
    counts = counts.sum(4)  # over bands: (B, C, predicted, label, bin)
    x_sums = sums[0].sum(4)
    product = x_sums[:, :, :, 1].sum((2, 3))  # <x, y>_c: x_c summed over the voxels labelled c
    label_counts = counts[:, :, :, 1].sum((2, 3))  # |y|_c

    top_label = classwise = squared_error = nll = None
    if layout.calibration:
        classwise = torch.stack([counts.sum((2, 3)), x_sums.sum((2, 3)), counts[:, :, :, 1].sum(2)])
        classwise = close_last_bin(classwise)
        predicted = counts[:, :, 1].sum(1)  # predicted classes, summed over classes: (B, label == c, bin)
        top_label = torch.stack([predicted.sum(1), x_sums[:, :, 1].sum((1, 2)), predicted[:, 1]])
        top_label = close_last_bin(top_label)
        # one-hot y: sum_c (x_c - y_c)^2 = sum_c x_c^2 - 2 <x, y> + |y|
        squared_error = (dense[SQUARES] - 2 * product + label_counts).sum(-1)
        nll = -dense[LOG].sum(-1)

    overlap_sums = None
    if layout.overlap:
        confusion = counts.sum(-1)  # (B, C, predicted == c, label == c)
        tp, fp, fn = confusion[..., 1, 1], confusion[..., 1, 0], confusion[..., 0, 1]
        pred_mass = dense[X_SUM]
        # one-hot y: |x - y|_1 = |x|_1 + |y|_1 - 2 <x, y>
        abs_diff = pred_mass + label_counts - 2 * product
        histogram = _band_histogram(layout, groups, tp)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram)
        overlap_sums = OverlapSums(tp, fp, fn, pred_mass, label_counts, abs_diff, thr_tp, thr_pred, thr_ref)
    return VoxelSums(
        top_label=top_label, classwise=classwise, squared_error=squared_error, nll=nll, overlap=overlap_sums
    )


def _assemble_soft(layout: KeyLayout, dense: Tensor, counts: Tensor, binned: Tensor, groups: list[_Group]) -> VoxelSums:
    """Soft reference: top-label bins and confusion counts from the top row."""
    batch, channels = dense.shape[1:]
    pairs = (channels, channels) if layout.overlap else (1, 1)
    top = counts[:, : layout.top_size].view(batch, *pairs, layout.top_bins)  # (B, predicted, reference, bin)
    top_sums = binned[:, :, : layout.top_size].view(layout.n_values, batch, *pairs, layout.top_bins)

    top_label = classwise = squared_error = nll = None
    if layout.calibration:
        _, class_counts, sums = groups[0]  # the group with the bins
        class_counts, sums = class_counts.sum((2, 3, 4)), sums.sum((3, 4, 5))  # (B, C, bin), (values, B, C, bin)
        classwise = close_last_bin(torch.stack([class_counts, sums[0], sums[1]]))
        top_label = close_last_bin(torch.stack([top.sum((1, 2)), top_sums[0].sum((1, 2)), top_sums[1].sum((1, 2))]))
        squared_error = dense[SQUARES].sum(-1)
        nll = -dense[LOG].sum(-1)

    overlap_sums = None
    if layout.overlap:
        confusion = top.sum(-1)  # (B, predicted, reference)
        tp = confusion.diagonal(dim1=-2, dim2=-1)
        histogram = _band_histogram(layout, groups, tp)
        thr_tp, thr_pred, thr_ref = threshold_counts_from_histogram(histogram)
        overlap_sums = OverlapSums(
            tp,
            confusion.sum(-1) - tp,
            confusion.sum(-2) - tp,
            dense[X_SUM],
            dense[Y_SUM],
            dense[ABS_DIFF],
            thr_tp,
            thr_pred,
            thr_ref,
        )
    return VoxelSums(
        top_label=top_label, classwise=classwise, squared_error=squared_error, nll=nll, overlap=overlap_sums
    )


def _band_histogram(layout: KeyLayout, groups: list[_Group], like: Tensor) -> Tensor:
    """Joint histogram ``(B, C, L, L)`` of (band of x, band of y) for :func:`threshold_counts_from_histogram`;
    ``(B, C, 1, 1)`` zeros without levels."""
    batch, channels = like.shape
    if not layout.n_levels:
        return like.new_zeros(batch, channels, 1, 1)
    group, counts, _ = next(g for g in groups if g[0].bands > 1)
    counts = counts.sum((2, 5))  # (B, C, reference digit, band of x)
    if layout.soft:
        return counts.transpose(-1, -2)
    # a one-hot 1 lies above every level: band T where label == c, else 0
    n_bands = group.bands
    histogram = like.new_zeros(batch, channels, n_bands, n_bands)
    histogram[..., 0] = counts[:, :, 0]
    histogram[..., n_bands - 1] = counts[:, :, 1]
    return histogram

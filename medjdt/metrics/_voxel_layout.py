"""Where each voxel counts in the one-pass histograms: mixed-radix keys of small per-voxel digits.

Every histogram of :func:`medjdt.metrics.fused.voxel_sums` is keyed by a mixed-radix number of small per-voxel
digits, so that one key per voxel and class (a *class row*) covers them all: ``bin(x_c)`` joint with the band of
x_c (the number of levels below it) and the reference digit ([label == c] and [predicted == c] for hard labels,
the band of y_c for a soft reference). Top-label bins and confusion counts of hard labels are marginals of these
(the confidence is x_c of the predicted class c); a soft reference adds one key per voxel (the *top row*) for
them, since its accuracy is y at the predicted class. :class:`KeyLayout` says which rows an image has and where
their keys start; the marginals are taken on the small histograms afterwards (:mod:`._voxel_assembly`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Class rows whose joint key (bins x bands x reference and predicted digits) would exceed this many keys are split
# into a calibration row and a band row (many bins and levels, above all with a soft reference).
MAX_JOINT_KEYS = 4096

# Slots of the dense per-(image, class) sums (5, B, C): |x|_1, |y|_1, |x - y|_1, the squared errors, the log terms.
X_SUM, Y_SUM, ABS_DIFF, SQUARES, LOG = range(5)


@dataclass(frozen=True)
class ClassRows:
    """C rows per image keyed by ``bin(x_c) + bins * (band(x_c) + bands * (reference + references * predicted))``.

    Each field is the radix of its digit (1: digit absent). The reference digit is [label == c] (hard labels,
    radix 2) or band(y_c) (soft reference, radix T + 1 for T levels); the predicted digit [argmax == c] (hard
    labels).
    """

    predicted: int
    references: int
    bands: int
    bins: int

    @property
    def size(self) -> int:
        return self.predicted * self.references * self.bands * self.bins


class KeyLayout:
    """The histograms of one image, one row each, and their key ranges.

    Hard labels: one or two groups of C class rows (:class:`ClassRows`) with the reference digit [label == c]
    and the predicted digit [argmax == c]; x_c is summed over the first group, which holds the bins. The
    top-label bins are its rows restricted to predicted == 1 (the confidence is x_c of the predicted class), the
    confusion counts its marginals over bins, <x, y>_c its x sums over label == c.

    Soft reference: row 0 (top row, one key per voxel) is ``bin(confidence) + top_bins * (predicted * C +
    reference)``, the confusion digits (reference: the majority class of y) only for overlap; confidence and
    accuracy (y at the predicted class) are summed over it. Then the class rows with the reference digit
    band(y_c) (levels) and the bins (calibration; x_c and y_c summed).

    A second group of class rows only when one joint key per class would exceed ``MAX_JOINT_KEYS``. Bins have
    M + 1 keys: key M (value 1.0) is merged into bin M - 1 at the end. Values are summed (weighted bincount) over
    the first ``sum_rows`` rows.
    """

    def __init__(self, channels: int, n_bins: int | None, overlap: bool, n_levels: int, soft: bool) -> None:
        self.channels, self.n_bins, self.overlap, self.soft = channels, n_bins, overlap, soft
        self.calibration = n_bins is not None
        self.n_levels = n_levels if overlap else 0
        bins = n_bins + 1 if self.calibration else 1
        bands = self.n_levels + 1
        self.has_top = soft
        self.top_bins = bins
        self.top_size = bins * (channels * channels if overlap else 1) if soft else 0

        if soft:
            joint = ClassRows(1, bands, bands, bins)
            split = [ClassRows(1, 1, 1, bins), ClassRows(1, bands, bands, 1)]
            needed = self.calibration or self.n_levels
        else:
            joint = ClassRows(2, 2, bands, bins)
            split = [ClassRows(2, 2, 1, bins), ClassRows(1, 2, bands, 1)]
            needed = True
        self.groups: list[ClassRows] = []
        if needed:
            too_large = joint.size > MAX_JOINT_KEYS and self.calibration and self.n_levels
            self.groups = split if too_large else [joint]

        sizes = [self.top_size] * self.has_top + [group.size for group in self.groups for _ in range(channels)]
        self.row_starts = tuple(sum(sizes[:r]) for r in range(len(sizes)))
        self.keys_per_image = sum(sizes)
        self.n_rows = len(sizes)
        if soft:
            self.sum_rows, self.n_values = (1 + channels, 2) if self.calibration else (0, 0)
        else:
            self.sum_rows, self.n_values = channels, 1


def compose(out: Tensor, digits: list[tuple[Tensor, int]]) -> Tensor:
    """``out`` = mixed-radix number of ``(digit, radix)`` pairs, most significant first."""
    out.copy_(digits[0][0])
    for digit, radix in digits[1:]:
        torch.add(digit, out, alpha=radix, out=out)
    return out


_OFFSETS: dict[tuple, Tensor] = {}


def row_offsets(layout: KeyLayout, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
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

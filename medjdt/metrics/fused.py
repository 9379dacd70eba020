"""All per-batch metric sums in one pass over the voxels: calibration bins, Brier, NLL and overlap sums.

:class:`~medjdt.metrics.CalibrationMetrics` and :class:`~medjdt.metrics.OverlapMetrics` need, per image, the
top-label and classwise reliability bins, the squared error and cross-entropy sums, the argmax confusion
counts, |x|_1, |y|_1, |x - y|_1 and the joint histogram of the thresholded Dice. The functions of
:mod:`medjdt.metrics.calibration` and :mod:`medjdt.metrics.overlap` compute each of them separately over the
whole batch (they stay the reference); :func:`voxel_sums` computes all of them while reading the voxels once and
returns a :class:`VoxelSums`. It picks one of two backends:

- on CUDA, the Triton kernel of :mod:`medjdt.metrics.fused_triton`, where it supports the inputs (one kernel
  launch per batch);
- everywhere else, the chunked torch pass of :mod:`medjdt.metrics._voxel_pass` (mixed-radix histogram keys,
  :mod:`._voxel_layout`; integer arithmetic on the probabilities' bit patterns, :mod:`._float_bits`; marginals
  of the histograms, :mod:`._voxel_assembly`).

Neither synchronises with the host, so on an accelerator a batch is queued without waiting for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import medjdt.metrics.fused_triton as fused_triton
from medjdt.metrics._checks import MetricInputs, check_levels
from medjdt.metrics._sums import VoxelSums
from medjdt.metrics._voxel_pass import chunked_voxel_sums
from medjdt.metrics.overlap import resolve_levels
from medjdt.validation import check_number

__all__ = ["VoxelSums", "voxel_sums"]

# Devices on which voxel_sums hands the inputs to the Triton kernel when it supports them (Triton installed; see
# fused_triton.triton_supports).
_TRITON_DEVICES = {"cuda"}


def voxel_sums(
    inputs: MetricInputs,
    *,
    n_bins: int | None = None,
    overlap: bool = False,
    levels: Sequence[float] = (),
    eps: float = 1e-7,
    unchecked: bool = False,
    thresholds: Sequence[float] | None = None,
) -> VoxelSums:
    """Calibration sums (when ``n_bins`` is given) and overlap sums (when ``overlap``) in one pass.

    Args:
        inputs: validated inputs from :func:`~medjdt.metrics._checks.prepare_inputs`: probabilities
            ``(B, C, N)``, hard labels ``(B, N)`` or a soft reference ``(B, C, N)``, optional mask ``(B, N)``.
        n_bins: number of calibration bins M; None skips the calibration sums.
        overlap: compute the overlap sums (Dice, IoU and soft Dice sums).
        levels: strictly increasing levels in (0, 1) of the thresholded Dice (with ``overlap``); empty skips
            the thresholded counts (``thr_*`` then have T = 0 entries).
        eps: floor of the probabilities inside the log of the NLL, in (0, 1).
        unchecked: the values of ``inputs`` have not been checked yet (``prepare_inputs(defer=True)``); labels are
            then clamped into range (probabilities always are), so that NaN, values outside [0, 1] or bad labels
            give wrong sums (which the pending check reports) but never an out-of-range index.
        thresholds: deprecated name of ``levels``.

    Returns:
        :class:`VoxelSums`, equal to :func:`~medjdt.metrics.calibration.top_label_bin_sums`,
        :func:`~medjdt.metrics.calibration.classwise_bin_sums`,
        :func:`~medjdt.metrics.calibration.squared_error_sums`, :func:`~medjdt.metrics.calibration.nll_sums`
        and :func:`~medjdt.metrics.overlap.overlap_sums` on the same inputs: counts exactly, sums to float
        rounding. On CUDA tensors the Triton kernel :func:`~medjdt.metrics.fused_triton.triton_voxel_sums`
        computes them when it supports the inputs.

    Raises:
        ValueError: ``n_bins < 1``, bad levels, ``eps`` outside (0, 1), or both ``levels`` and ``thresholds``.
    """
    where = "voxel_sums"
    levels = resolve_levels(where, levels, thresholds, default=())
    if n_bins is not None:
        n_bins = check_number("n_bins", n_bins, low=1, integer=True, where=where)
    eps = check_number("eps", eps, low=0, high=1, low_inclusive=False, high_inclusive=False, where=where)
    levels = check_levels(levels, where=where) if overlap and len(levels) else ()
    if n_bins is None and not overlap:
        return VoxelSums.nothing()
    options = {"n_bins": n_bins, "overlap": overlap, "levels": levels, "eps": eps, "unchecked": unchecked}
    if inputs.probs.device.type in _TRITON_DEVICES and fused_triton.triton_supports(inputs, levels):
        return fused_triton.triton_voxel_sums(inputs, **options)
    return chunked_voxel_sums(inputs, **options)

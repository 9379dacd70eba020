"""Overlap and calibration metrics for hard and soft references, per case and in aggregate.

Functional forms (per image and class, on tensors): :func:`dice`, :func:`iou`, :func:`soft_dice`,
:func:`thresholded_dice`, :func:`expected_calibration_error`, :func:`brier_score`, :func:`nll` and
:func:`reliability_bins`. Streaming ``torchmetrics`` objects that accumulate over chunks, cases and DDP ranks:
:class:`CalibrationMetrics` and :class:`OverlapMetrics`, and :class:`SegmentationMetrics`, which feeds one of each
from a single pass over every batch.

The streaming objects sum each batch in one pass over the voxels (:func:`medjdt.metrics.fused.voxel_sums`); the
functional forms compute one metric at a time and serve as its reference.

Shapes: probabilities ``(B, C, *spatial)`` with 2 or 3 spatial dims; references hard ``(B, *spatial)`` integer
labels or soft ``(B, C, *spatial)`` class distributions; optional ``mask`` ``(B, *spatial)`` bool.
"""

from medjdt.metrics.calibration import (
    ReliabilityBins,
    brier_score,
    expected_calibration_error,
    nll,
    reliability_bins,
)
from medjdt.metrics.overlap import QUBIQ_THRESHOLDS, dice, iou, soft_dice, thresholded_dice
from medjdt.metrics.streaming import CalibrationMetrics, OverlapMetrics, SegmentationMetrics

__all__ = [
    "QUBIQ_THRESHOLDS",
    "CalibrationMetrics",
    "OverlapMetrics",
    "ReliabilityBins",
    "SegmentationMetrics",
    "brier_score",
    "dice",
    "expected_calibration_error",
    "iou",
    "nll",
    "reliability_bins",
    "soft_dice",
    "thresholded_dice",
]

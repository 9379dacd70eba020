"""Overlap and calibration metrics for hard and soft references, per case and in aggregate.

Functional forms (per image and class, on tensors): :func:`dice`, :func:`iou`, :func:`soft_dice`,
:func:`thresholded_dice`, :func:`expected_calibration_error`, :func:`brier_score`, :func:`nll` and
:func:`reliability_bins`. Streaming ``torchmetrics`` objects that accumulate over chunks, cases and DDP ranks:
:class:`CalibrationMetrics` and :class:`OverlapMetrics`, and :class:`SegmentationMetrics`, which feeds one of each
from a single pass over every batch.

The streaming objects sum each batch in one pass over the voxels (:func:`medjdt.metrics.fused.voxel_sums`); the
functional forms compute one metric at a time and serve as its reference. Each functional metric and its
streaming counterpart share their defaults: 15 calibration bins, ``include_background=False`` for overlap (class 0
is background) and True for calibration (the whole distribution is judged), the QUBIQ levels
:data:`QUBIQ_LEVELS` for the thresholded Dice.

Shapes: probabilities ``(B, C, *spatial)`` with 2 or 3 spatial dims; references hard ``(B, *spatial)`` integer
labels or soft ``(B, C, *spatial)`` class distributions; optional ``mask`` ``(B, *spatial)`` bool.
"""

import warnings

from medjdt.metrics.calibration import (
    ReliabilityBins,
    brier_score,
    expected_calibration_error,
    nll,
    reliability_bins,
)
from medjdt.metrics.calibration_metrics import CalibrationMetrics
from medjdt.metrics.overlap import QUBIQ_LEVELS, dice, iou, soft_dice, thresholded_dice
from medjdt.metrics.overlap_metrics import OverlapMetrics
from medjdt.metrics.segmentation_metrics import SegmentationMetrics

__all__ = [
    "QUBIQ_LEVELS",
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


def __getattr__(name: str) -> object:
    if name == "QUBIQ_THRESHOLDS":  # the old name of QUBIQ_LEVELS, kept for one release
        warnings.warn("QUBIQ_THRESHOLDS is deprecated; use QUBIQ_LEVELS", FutureWarning, stacklevel=2)
        return QUBIQ_LEVELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Soft-label segmentation losses.

- :class:`JDTLoss` (and :class:`JaccardMetricLoss`, :class:`DiceSemimetricLoss`): Jaccard/Dice/Tversky losses
  that are correct for soft labels, with dataset/image/class aggregations and cross-rank cardinalities.
- :class:`SoftTargetCrossEntropy`: cross-entropy for hard or soft targets with masks.
- :class:`SegmentationLoss`: the weighted mix of the two used in training.
- Functional core for probabilities (e.g. distillation from a teacher): :func:`jdt_loss`,
  :func:`soft_cardinalities`, :func:`hard_cardinalities`, :func:`tversky_loss`.
- :func:`fused_cardinalities`: the same cardinalities straight from logits, with the activation fused into one
  memory-lean autograd function (the default path of :class:`JDTLoss`).
"""

from medjdt.losses.cardinalities import hard_cardinalities, soft_cardinalities
from medjdt.losses.cross_entropy import SoftTargetCrossEntropy
from medjdt.losses.fused import fused_cardinalities
from medjdt.losses.jdt import DiceSemimetricLoss, JaccardMetricLoss, JDTLoss, activate, jdt_loss
from medjdt.losses.segmentation import SegmentationLoss
from medjdt.losses.tversky import tversky_loss

__all__ = [
    "DiceSemimetricLoss",
    "JDTLoss",
    "JaccardMetricLoss",
    "SegmentationLoss",
    "SoftTargetCrossEntropy",
    "activate",
    "fused_cardinalities",
    "hard_cardinalities",
    "jdt_loss",
    "soft_cardinalities",
    "tversky_loss",
]

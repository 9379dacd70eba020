"""Soft-label sources: multi-rater fusion, label smoothing and distillation targets.

Everything here returns float32 targets ``(C, *spatial)`` (fusion) or ``(B, C, *spatial)`` (smoothing,
distillation) that lie in [0, 1] and sum to 1 over the class dimension.
"""

from medjdt.labels.distillation import teacher_targets
from medjdt.labels.fusion import FUSION_METHODS, fuse
from medjdt.labels.smoothing import smooth_labels
from medjdt.labels.transforms import FuseRatersd, SmoothLabelsd

__all__ = ["FUSION_METHODS", "FuseRatersd", "SmoothLabelsd", "fuse", "smooth_labels", "teacher_targets"]

"""Soft-label sources: multi-rater fusion, label smoothing and distillation from a teacher.

The targets are float32 ``(C, *spatial)`` (fusion) or ``(B, C, *spatial)`` (smoothing, distillation) that lie in
[0, 1] and sum to 1 over the class dimension; :func:`distillation_loss` trains a student on a teacher's targets.
"""

from medjdt.labels.distillation import distillation_loss, teacher_targets
from medjdt.labels.fusion import FUSION_METHODS, fuse
from medjdt.labels.smoothing import smooth_labels
from medjdt.labels.transforms import FuseRatersd, SmoothLabelsd

__all__ = [
    "FUSION_METHODS",
    "FuseRatersd",
    "SmoothLabelsd",
    "distillation_loss",
    "fuse",
    "smooth_labels",
    "teacher_targets",
]

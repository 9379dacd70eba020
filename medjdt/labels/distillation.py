"""Knowledge distillation: soft targets from a teacher's logits, and the loss of a student against them.

:func:`distillation_loss` is the one student-vs-teacher loss of the project: distillation from a frozen teacher
(``SegmentationModule(teacher=...)``) and the mean teacher's unlabelled loss (``SemiSupervisedModule(semi=...)``)
both call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from medjdt.labels._checks import SPATIAL_DIMS, as_tensor
from medjdt.validation import check_number

__all__ = ["distillation_loss", "teacher_targets"]


def teacher_targets(teacher_logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Soft target ``softmax(z / T)`` over the class dimension, detached from the teacher's graph.

    Args:
        teacher_logits: floating logits ``(B, C, *spatial)`` with ``C >= 2`` and 2 or 3 spatial dims.
        temperature: softening temperature ``T > 0``; larger values give flatter targets.

    Returns:
        float32 ``(B, C, *spatial)`` on the logits' device, summing to 1 over ``C``; ``requires_grad`` is False.

    Raises:
        ValueError: non-floating or non-finite logits, wrong number of dims, ``C < 2`` (softmax over one channel
            is constant), temperature not a finite number > 0.
    """
    temperature = check_number("temperature", temperature, low=0, low_inclusive=False, where="teacher_targets")
    z = as_tensor(teacher_logits, "teacher_logits").detach()
    if not z.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point, got dtype {z.dtype}")
    if z.ndim - 2 not in SPATIAL_DIMS:
        raise ValueError(
            f"teacher_logits must have shape (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(z.shape)}"
        )
    if z.shape[1] < 2:
        raise ValueError(f"teacher_logits need C >= 2 channels for a softmax target, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("teacher_logits contain NaN or infinite values")
    return torch.softmax(z.to(torch.float32) / temperature, dim=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    jdt: Callable[..., torch.Tensor],
    temperature: float = 1.0,
    confidence_threshold: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the student against the teacher's soft prediction::

        T**2 * KL(p || q) + jdt(student_logits / T, p)
        p = softmax(teacher_logits / T),  q = softmax(student_logits / T)

    ``p`` carries no gradient to the teacher. The KL is the mean over the counted voxels of the per-voxel
    divergence; ``T**2`` keeps its gradient on the scale of ``T = 1`` (Hinton et al., 2015). With
    ``confidence_threshold > 0`` only the voxels where the teacher's largest class probability at ``T = 1``
    reaches the threshold count, in both terms (a 0/1 weight); where none does, both terms are 0. Both terms are
    0 exactly when the student's logits give the teacher's probabilities.

    The logits are not read on the host here: ``jdt`` checks both inputs' values (NaN, infinite; on an accelerator
    deferred, see :meth:`medjdt.losses.JDTLoss.flush_checks`).

    Args:
        student_logits: ``(B, C, *spatial)`` logits of the student (any floating dtype; computed in float32).
        teacher_logits: ``(B, C, *spatial)`` logits of the teacher on the same voxels.
        jdt: the JDT loss (a :class:`medjdt.losses.JDTLoss`, JML or DML) with softmax activation, called as
            ``jdt(logits, target, mask)``.
        temperature: softening temperature ``T > 0``.
        confidence_threshold: in [0, 1); 0 counts every voxel.

    Returns:
        ``(total, parts)``: the scalar loss and detached ``{"kl", "jdt", "confident_fraction"}`` (the fraction of
        voxels counted; 1 without a threshold).

    Raises:
        ValueError: logits of different shapes, a JDT loss without softmax activation, a temperature or threshold
            out of range.
    """
    temperature = check_number("temperature", temperature, low=0, low_inclusive=False, where="distillation_loss")
    confidence_threshold = check_number(
        "confidence_threshold", confidence_threshold, low=0, high=1, high_inclusive=False, where="distillation_loss"
    )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    activation = getattr(jdt, "activation", None)
    if activation != "softmax":
        raise ValueError(f"distillation_loss needs a JDT loss with softmax activation, got {activation!r}")
    teacher = teacher_logits.detach().float()
    target = torch.softmax(teacher / temperature, dim=1)
    student = student_logits.float() / temperature
    kl_map = F.kl_div(torch.log_softmax(student, dim=1), target, reduction="none").sum(1)
    mask = None
    if confidence_threshold > 0:
        mask = torch.softmax(teacher, dim=1).amax(1) >= confidence_threshold
        kl = (kl_map * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl_map.mean()
    jdt_value = jdt(student, target, mask)
    total = temperature**2 * kl + jdt_value
    confident = torch.ones((), device=kl.device) if mask is None else mask.float().mean()
    return total, {"kl": kl.detach(), "jdt": jdt_value.detach(), "confident_fraction": confident}

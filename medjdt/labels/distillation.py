"""Knowledge-distillation targets from a teacher network's logits."""

from __future__ import annotations

from typing import Any

import torch

from medjdt.labels._checks import SPATIAL_DIMS, as_tensor, check_positive_finite


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
    temperature = check_positive_finite(temperature, "temperature")
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

"""Learning-rate schedules: linear warm-up followed by poly or cosine decay (per optimiser step)."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["poly", "cosine", "constant"]

__all__ = ["Schedule", "lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Schedule, poly_power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then ``schedule`` over the
    remaining steps: ``poly`` is ``(1 - t) ** poly_power`` (nnU-Net), ``cosine`` is ``0.5 (1 + cos(pi t))``,
    ``constant`` is 1, with ``t`` the fraction of the decay phase done.
    """
    if schedule not in ("poly", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'poly', 'cosine' or 'constant'")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "poly":
        return (1.0 - t) ** poly_power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0

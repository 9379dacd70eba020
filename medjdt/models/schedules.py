"""The optimiser and its learning-rate schedule: AdamW, linear warm-up, then poly, cosine or constant (per step)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch

from medjdt.validation import check_choice, check_number

Schedule = Literal["poly", "cosine", "constant"]
SCHEDULES = ("poly", "cosine", "constant")

__all__ = ["SCHEDULES", "Schedule", "adamw_with_schedule", "lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Schedule, poly_power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then ``schedule`` over the
    remaining steps: ``poly`` is ``(1 - t) ** poly_power`` (nnU-Net), ``cosine`` is ``0.5 (1 + cos(pi t))``,
    ``constant`` is 1, with ``t`` the fraction of the decay phase done.
    """
    check_choice("schedule", schedule, SCHEDULES, where="lr_factor")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "poly":
        return (1.0 - t) ** poly_power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def adamw_with_schedule(
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
    schedule: Schedule,
    total_steps: float,
) -> dict[str, Any]:
    """AdamW and its per-step :func:`lr_factor` schedule, in the form ``configure_optimizers`` returns.

    Args:
        parameters: what AdamW optimises.
        lr: peak learning rate; weight_decay: AdamW's decoupled weight decay.
        warmup_fraction: fraction of ``total_steps`` spent in linear warm-up, in [0, 1).
        schedule: ``poly``, ``cosine`` or ``constant`` after warm-up.
        total_steps: optimiser steps of the whole run (Lightning's ``trainer.estimated_stepping_batches``); may be
            infinite only for a constant schedule without warm-up.

    Raises:
        ValueError: an infinite ``total_steps`` where the schedule needs the run's length.
    """
    check_choice("model.schedule", schedule, SCHEDULES)
    if not math.isfinite(total_steps) and (schedule != "constant" or warmup_fraction > 0):
        raise ValueError(
            f"model.schedule {schedule!r} and model.warmup_fraction {warmup_fraction} need a finite training length; "
            "set trainer.max_epochs or trainer.max_steps (or use a constant schedule without warm-up)"
        )
    total = max(1, int(total_steps)) if math.isfinite(total_steps) else 1
    warmup = int(check_number("model.warmup_fraction", warmup_fraction, low=0, high=1, high_inclusive=False) * total)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

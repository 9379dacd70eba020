"""Post-hoc temperature scaling: one temperature ``T`` per trained model, fitted on its validation fold.

``softmax(z / T)`` keeps the argmax (so Dice) unchanged and only sharpens (``T < 1``) or softens (``T > 1``) the
probabilities. ``T`` minimises the mean negative log-likelihood of the validation voxels against the run's fused
target (one-hot for majority voting, soft for the mean of the raters):

    NLL(T) = -mean_v sum_c y_vc log softmax(z_v / T)_c

which is convex in ``1 / T``, so a bounded scalar search over ``log T`` finds the global minimum. The validation
volumes are streamed case by case (:func:`collect_validation_logits`), keeping a seeded random subset of at most
``max_voxels`` voxels, so memory does not grow with the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from medjdt.labels import fuse

__all__ = ["TemperatureFit", "collect_validation_logits", "fit_temperature", "nll_at_temperature", "nll_curve"]

# Bounds of the search over T: a model needing more than 100x sharpening or softening is not calibrated by one
# scalar anyway.
T_BOUNDS = (0.01, 100.0)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it did on the voxels it was fitted on.

    Attributes:
        temperature: ``T`` minimising the NLL.
        nll_before: mean NLL at ``T = 1``; nll_after: at ``T``.
        n_voxels: voxels used; n_cases: validation cases they came from.
    """

    temperature: float
    nll_before: float
    nll_after: float
    n_voxels: int
    n_cases: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _soft_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    if target.dim() == 1:
        if target.dtype.is_floating_point:
            raise ValueError(f"hard targets must be integer labels, got {target.dtype}")
        return F.one_hot(target.long(), num_classes).double()
    return target.double()


def nll_at_temperature(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` against ``target``.

    Args:
        logits: ``(N, C)`` float.
        target: ``(N, C)`` soft target (rows summing to 1) or ``(N,)`` integer labels.
        temperature: ``T > 0``.
    """
    soft = _soft_target(target, logits.shape[1])
    log_probs = torch.log_softmax(logits.double() / temperature, dim=1)
    return float(-(soft * log_probs).sum(1).mean())


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, *, n_cases: int = 0) -> TemperatureFit:
    """The temperature minimising the mean NLL of ``softmax(logits / T)`` against ``target``.

    Args:
        logits: ``(N, C)`` unscaled logits of N validation voxels.
        target: ``(N, C)`` fused soft target or ``(N,)`` integer labels.
        n_cases: how many cases the voxels come from (recorded only).

    Returns:
        The :class:`TemperatureFit`.

    Raises:
        ValueError: empty or mismatched inputs, non-finite logits, targets outside the simplex.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with N >= 1 and C >= 2, got {tuple(logits.shape)}")
    if target.shape[0] != logits.shape[0] or (target.dim() == 2 and target.shape[1] != logits.shape[1]):
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold NaN or infinite values")
    soft = _soft_target(target, logits.shape[1])
    if soft.min() < 0 or (soft.sum(1) - 1).abs().max() > 1e-4:
        raise ValueError("target rows must be probability vectors (non-negative, summing to 1)")
    z = logits.double()

    def objective(log_t: float) -> float:
        return float(-(soft * torch.log_softmax(z / math.exp(log_t), dim=1)).sum(1).mean())

    low, high = (math.log(b) for b in T_BOUNDS)
    result = minimize_scalar(objective, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    temperature = math.exp(float(result.x))
    return TemperatureFit(
        temperature=temperature,
        nll_before=objective(0.0),
        nll_after=float(result.fun),
        n_voxels=int(logits.shape[0]),
        n_cases=n_cases,
    )


@torch.no_grad()
def collect_validation_logits(
    module: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    fusion: str,
    num_classes: int,
    max_voxels: int = 2_000_000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stream validation cases through ``module.infer_logits`` and keep a random subset of voxels.

    Args:
        module: a :class:`~medjdt.models.SegmentationModule` (its network in eval mode is used).
        batches: validation batches ``{"image": (1, K, *spatial), "raters": (1, R, *spatial), ...}``.
        fusion: the fusion method of the run (the target the temperature is fitted against).
        num_classes: C.
        max_voxels: at most this many voxels are kept (reservoir-free: each case keeps a share proportional to
            its size, drawn with a generator seeded by ``seed``).
        seed: seeds the voxel subset and the ``random`` fusion draw.

    Returns:
        ``(logits (N, C) float32, target (N, C) float32, number of cases)``.
    """
    generator = torch.Generator().manual_seed(seed)
    cases: list[tuple[torch.Tensor, torch.Tensor]] = []
    total = 0
    module.eval()
    for batch in batches:
        image = batch["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        raters = batch["raters"]
        raters = (raters.as_tensor() if hasattr(raters, "as_tensor") else raters)[0].long()
        logits = module.infer_logits(image.to(module.device))[0].cpu()  # (C, *spatial)
        target = fuse(raters.cpu(), fusion, num_classes, generator=generator)  # (C, *spatial)
        cases.append((logits.flatten(1).T.contiguous(), target.flatten(1).T.contiguous()))
        total += cases[-1][0].shape[0]
    if not cases:
        raise ValueError("no validation case to fit the temperature on")
    keep = min(1.0, max_voxels / total)
    logits_out, target_out = [], []
    for logits, target in cases:
        if keep < 1.0:
            n = max(1, int(round(keep * logits.shape[0])))
            index = torch.randperm(logits.shape[0], generator=generator)[:n]
            logits, target = logits[index], target[index]
        logits_out.append(logits)
        target_out.append(target)
    return torch.cat(logits_out), torch.cat(target_out), len(cases)


def nll_curve(logits: torch.Tensor, target: torch.Tensor, temperatures: Iterable[float]) -> np.ndarray:
    """NLL at each of ``temperatures`` (for plots and checks)."""
    return np.array([nll_at_temperature(logits, target, t) for t in temperatures])

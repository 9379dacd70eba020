"""Test-time augmentation by flips: the class probabilities averaged over every flip of the spatial axes.

As in nnU-Net, the whole volume is flipped along each of the ``2**D`` subsets of its ``D`` spatial axes (the
empty subset is the plain prediction), predicted, flipped back and the ``2**D`` probability maps averaged. A
mean of probability vectors is a probability vector, so the result still sums to 1 over the classes; a
prediction that commutes with flips (a network whose output does not depend on position) is unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from medjdt.validation import check_choice

__all__ = ["TTA_CHOICES", "flip_averaged", "flip_combinations", "tta_prediction"]

# ``None`` and ``"none"`` both mean one plain prediction.
TTA_CHOICES = (None, "none", "flips")


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """The ``2**spatial_dims`` subsets of the spatial axes ``(2, ..., spatial_dims + 1)`` of a ``(B, C, *spatial)``
    tensor, the empty one (no flip) first."""
    axes = range(2, 2 + check_choice("spatial_dims", spatial_dims, (1, 2, 3), where="flip_combinations"))
    return [combo for size in range(len(axes) + 1) for combo in itertools.combinations(axes, size)]


def flip_averaged(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Mean of ``flip(predict(flip(image)))`` over the ``2**D`` flips of the spatial axes.

    Args:
        predict: maps an image ``(B, K, *spatial)`` to probabilities ``(B, C, *spatial)`` on the same grid (e.g.
            sliding-window inference followed by the temperature-scaled softmax).
        image: ``(B, K, *spatial)`` with ``D = image.dim() - 2`` spatial axes.

    Returns:
        ``(B, C, *spatial)``, the mean of the ``2**D`` predictions, each flipped back onto the image's grid.

    Raises:
        ValueError: ``image`` has no spatial axis or more than 3, or ``predict`` changes the spatial shape.
    """
    combos = flip_combinations(image.dim() - 2)
    total: torch.Tensor | None = None
    for axes in combos:
        probs = predict(image.flip(axes) if axes else image)
        if probs.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"flip_averaged: the prediction's spatial shape {tuple(probs.shape[2:])} differs from the image's "
                f"{tuple(image.shape[2:])}"
            )
        probs = probs.flip(axes) if axes else probs
        total = probs.clone() if total is None else total.add_(probs)
    return total / len(combos)


def tta_prediction(
    predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tta: str | None
) -> torch.Tensor:
    """``predict(image)`` (``tta`` None or ``"none"``) or its flip average (``tta="flips"``, :func:`flip_averaged`);
    shapes as for :func:`flip_averaged`."""
    if check_choice("tta", tta, TTA_CHOICES) == "flips":
        return flip_averaged(predict, image)
    return predict(image)

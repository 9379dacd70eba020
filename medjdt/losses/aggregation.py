"""How per-image, per-class losses become one value: the dataset, image and class aggregations.

- ``"dataset"``: cardinalities summed over the batch per class, one loss per class, weighted mean over classes
  (:func:`dataset_mean`);
- ``"image"``: per image, the weighted mean over its active classes, then the mean over images
  (:func:`image_mean`);
- ``"class"``: per class, the mean over the images where it is active, then the weighted mean over classes
  (:func:`class_mean`).

A loss may mix them with weights (:func:`parse_aggregation`). The word is "aggregation", not "reduction": these
are not torch's ``reduction="mean"/"sum"/"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from medjdt.validation import check_choice, check_number

__all__ = ["AGGREGATIONS", "class_mean", "dataset_mean", "image_mean", "parse_aggregation"]

AGGREGATIONS = ("dataset", "image", "class")


def parse_aggregation(aggregation: str | Mapping[str, float], *, where: str | None = None) -> dict[str, float]:
    """Normalise ``aggregation`` to a dict ``{name: weight}`` over ``AGGREGATIONS``.

    A string selects one aggregation with weight 1; a mapping such as ``{"image": 0.5, "class": 0.5}`` mixes
    several. Weights must be finite and >= 0 with a positive sum; entries with weight 0 are dropped.

    Raises:
        ValueError: unknown name, bad weight, or no positive weight.
    """
    if isinstance(aggregation, str):
        aggregation = {aggregation: 1.0}
    if not isinstance(aggregation, Mapping) or not aggregation:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}aggregation must be one of {AGGREGATIONS} or a non-empty dict of weights, got {aggregation!r}"
        )
    parsed = {}
    for name, weight in aggregation.items():
        check_choice("aggregation", name, AGGREGATIONS, where=where)
        weight = check_number(f"aggregation weight for {name!r}", weight, low=0, where=where)
        if weight > 0:
            parsed[name] = weight
    if not parsed:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}aggregation {dict(aggregation)!r} has no positive weight")
    return parsed


def _weighted_sum_and_total(values: torch.Tensor, weights: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (values * weights).sum(dim), weights.sum(dim)


def _safe_divide(numerator: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """numerator / total, and 0 where total is 0 (there numerator is 0 too, so the graph stays intact)."""
    return numerator / torch.where(total > 0, total, 1.0)


def dataset_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-class losses ``(C,)`` with weights ``(C,)`` (0 for inactive classes); 0 if none."""
    weighted, total = _weighted_sum_and_total(losses, weights, 0)
    return _safe_divide(weighted, total)


def image_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's weighted class mean.

    ``losses``, ``weights``: ``(B, C)``; weight 0 marks a class inactive in that image. Images without an
    active class are left out of the mean over images; with none at all the result is 0.
    """
    weighted, total = _weighted_sum_and_total(losses, weights, 1)
    per_image = _safe_divide(weighted, total)
    has_class = (total > 0).to(losses.dtype)
    return _safe_divide(per_image.sum(), has_class.sum())


def class_mean(losses: torch.Tensor, active: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over classes of each class's mean over the images where it is active.

    ``losses``: ``(B, C)``; ``active``: ``(B, C)`` bool; ``class_weights``: ``(C,)``. Classes active in no image
    are left out; with none at all the result is 0.
    """
    active = active.to(losses.dtype)
    summed, count = _weighted_sum_and_total(losses, active, 0)
    per_class = _safe_divide(summed, count)
    weights = class_weights * (count > 0).to(losses.dtype)
    return dataset_mean(per_class, weights)

"""Multi-rater fusion: turn the label maps of several raters into one soft target ``(C, *spatial)``.

All methods work on a validated ``(R, *spatial)`` stack of small integers. They loop over raters and
classes (never over voxels) and write into preallocated buffers, because fusion runs in the data
loader on every sample and a 7 x 256^3 stack must fuse well under a second.
"""

from __future__ import annotations

from typing import Any

import torch

from medjdt.labels._checks import as_label_stack, check_num_classes, check_weights
from medjdt.labels.staple import staple_probabilities
from medjdt.validation import check_choice

FUSION_METHODS = ("mean", "weighted", "majority", "random", "staple")


def fuse(
    raters: Any,
    method: str,
    num_classes: int,
    *,
    weights: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fuse the label maps of ``R`` raters into one soft target.

    Args:
        raters: integer label maps ``(R, *spatial)`` with 2 or 3 spatial dims (numpy array, torch tensor or
            MONAI ``MetaTensor``), or a list/tuple of ``R`` maps ``(*spatial)`` of equal shape. Floating-point
            maps are accepted when every value is an integer. Labels must lie in ``[0, num_classes)``.
        method: one of ``FUSION_METHODS``:

            - ``"mean"``: average of the raters' one-hot maps (the QUBIQ ground-truth convention).
            - ``"weighted"``: weighted average of the raters' one-hot maps. Rater ``r`` gets the weight
              ``mean over foreground classes c >= 1 of Dice(rater_r == c, majority == c)``, where ``majority``
              is the ``"majority"`` label map and ``Dice = 1`` when both masks are empty; the weights are then
              normalised to sum 1. If every rater has weight 0 (e.g. two raters with disjoint masks and an
              empty majority) the weights are undefined and equal weights are used. ``weights=`` overrides.
            - ``"majority"``: per-voxel most frequent label, one-hot. Ties go to the **lowest** tied label
              (so to background for binary tasks).
            - ``"random"``: the one-hot map of one rater drawn uniformly with ``generator`` (torch's global
              generator when ``None``); every call draws anew.
            - ``"staple"``: SimpleITK STAPLE probabilities: ``[1 - p, p]`` for binary tasks, renormalised
              one-vs-rest STAPLE for multi-class (see :mod:`medjdt.labels.staple`, which explains why).
        num_classes: number of classes ``C >= 2`` (binary tasks use ``C = 2``).
        weights: only for ``"weighted"``: explicit non-negative rater weights ``(R,)``, normalised to sum 1.
        generator: only used by ``"random"``.

    Returns:
        Soft target ``(C, *spatial)`` float32 on the device of ``raters`` (CPU for numpy input); every voxel
        lies in ``[0, 1]`` and sums to 1 over ``C``.

    Raises:
        ValueError: unknown method, ``weights`` given for a method other than ``"weighted"``, bad weights,
            zero raters, raters of different shapes, labels that are NaN, non-integer or outside
            ``[0, num_classes)``.
    """
    check_choice("method", method, FUSION_METHODS, where="fuse")
    num_classes = check_num_classes(num_classes)
    if weights is not None and method != "weighted":
        raise ValueError(f"weights only apply to method='weighted', got method={method!r}")
    stack = as_label_stack(raters, num_classes)
    if method == "mean":
        return mean_fusion(stack, num_classes)
    if method == "weighted":
        w = None if weights is None else check_weights(weights, num_raters=stack.shape[0])
        return weighted_fusion(stack, num_classes, w)
    if method == "majority":
        return one_hot(majority_labels(stack, num_classes), num_classes)
    if method == "random":
        index = int(torch.randint(stack.shape[0], (1,), generator=generator))
        return one_hot(stack[index], num_classes)
    return staple_probabilities(stack, num_classes)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encode a validated label map ``(*spatial)`` into ``(C, *spatial)`` float32."""
    out = torch.empty((num_classes, *labels.shape), dtype=torch.float32, device=labels.device)
    for c in range(num_classes):
        torch.eq(labels, c, out=out[c])
    return out


def class_counts(stack: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Number of raters voting for each class: validated stack ``(R, *spatial)`` -> ``(C, *spatial)`` integer."""
    num_raters, spatial = stack.shape[0], stack.shape[1:]
    dtype = torch.uint8 if num_raters <= 255 else torch.int32
    counts = torch.zeros((num_classes, *spatial), dtype=dtype, device=stack.device)
    hit = torch.empty(spatial, dtype=dtype, device=stack.device)
    for c in range(num_classes - 1):
        for r in range(num_raters):
            torch.eq(stack[r], c, out=hit)
            counts[c].add_(hit)
    # Every rater votes for exactly one class, so the last count is what is left.
    counts[-1].fill_(num_raters).sub_(counts[:-1].sum(0, dtype=dtype))
    return counts


def mean_fusion(stack: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Average one-hot map of a validated stack ``(R, *spatial)`` -> ``(C, *spatial)`` float32."""
    out = torch.empty((num_classes, *stack.shape[1:]), dtype=torch.float32, device=stack.device)
    out.copy_(class_counts(stack, num_classes))
    return out.div_(stack.shape[0])


def majority_labels(stack: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-voxel most frequent label of a validated stack ``(R, *spatial)`` -> ``(*spatial)``; ties -> lowest."""
    counts = class_counts(stack, num_classes)
    best = counts[0].clone()
    labels = torch.zeros_like(stack[0])
    wins = torch.empty_like(stack[0])
    for c in range(1, num_classes):
        # Strictly greater keeps the lower label on ties. Labels assigned so far are all < c,
        # so max(labels, c * wins) sets exactly the winning voxels to c (cheaper than masked_fill).
        torch.gt(counts[c], best, out=wins)
        torch.maximum(labels, wins.mul_(c), out=labels)
        torch.maximum(best, counts[c], out=best)
    return labels


def dice_weights(stack: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rater weights for ``"weighted"`` fusion: mean foreground Dice with the majority vote, normalised.

    Args:
        stack: validated label stack ``(R, *spatial)``.
        num_classes: number of classes ``C``.

    Returns:
        float64 ``(R,)`` summing to 1 (equal weights when every rater's Dice is 0).
    """
    majority = majority_labels(stack, num_classes)
    num_raters = stack.shape[0]
    dice = torch.zeros(num_raters, num_classes - 1, dtype=torch.float64)
    in_majority = torch.empty_like(majority)
    in_rater = torch.empty_like(majority)
    for c in range(1, num_classes):
        torch.eq(majority, c, out=in_majority)
        majority_size = int(torch.count_nonzero(in_majority))
        for r in range(num_raters):
            torch.eq(stack[r], c, out=in_rater)
            rater_size = int(torch.count_nonzero(in_rater))
            overlap = int(torch.count_nonzero(in_rater.bitwise_and_(in_majority)))
            total = rater_size + majority_size
            dice[r, c - 1] = 1.0 if total == 0 else 2.0 * overlap / total
    weights = dice.mean(dim=1)
    if weights.sum() == 0:
        return torch.full((num_raters,), 1.0 / num_raters, dtype=torch.float64)
    return weights / weights.sum()


def weighted_fusion(stack: torch.Tensor, num_classes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted average one-hot map of a validated stack ``(R, *spatial)`` -> ``(C, *spatial)`` float32.

    ``weights`` is float64 ``(R,)`` summing to 1; ``None`` uses :func:`dice_weights`. The weights are rounded to
    multiples of ``2**-24`` (an error below 3e-8) that sum to exactly 1.
    """
    if weights is None:
        weights = dice_weights(stack, num_classes)
    # Integer weights summing to 2**24 accumulate exactly in float32, so after the final (exact) scaling every
    # voxel sums to exactly 1 and no value exceeds 1 through rounding.
    scale = 2**24
    units = torch.round(weights * scale)
    units[torch.argmax(units)] += scale - units.sum()
    out = torch.zeros((num_classes, *stack.shape[1:]), dtype=torch.float32, device=stack.device)
    hit = torch.empty_like(out[0])
    for r, w in enumerate(units.tolist()):
        if w == 0:
            continue
        for c in range(num_classes - 1):
            torch.eq(stack[r], c, out=hit)
            out[c].add_(hit, alpha=w)
    # The class sums are exact, so the last class is what is left of the total.
    out[-1].fill_(scale).sub_(out[:-1].sum(0))
    return out.mul_(1.0 / scale)

"""Overlap metrics per image and class: Dice, IoU, soft Dice and QUBIQ thresholded Dice.

Every metric is a ratio of per-(image, class) sums (:class:`OverlapSums`); the streaming
:class:`~medjdt.metrics.OverlapMetrics` accumulates the same sums over chunks and cases.

Absent classes (``absent``), the one rule of every overlap metric: a class is **absent** from a case when the
reference gives it nothing (a hard reference: no voxel of the class; a soft reference: zero mass, i.e. no rater
marked it). With ``absent="exclude"`` (default) every overlap score of an absent class is NaN, whatever the
prediction, so it is left out of every mean: a stray predicted voxel cannot turn "left out" into 0 and back. The
voxels predicted for an absent class are false positives counted on their own (``absent_fp_voxels``, see
:class:`~medjdt.metrics.OverlapMetrics`). ``absent="score"`` scores absent classes like any other: 0 when the
prediction has the class, and the ``empty`` rule when it has not.

"Both empty" rule (``empty``): when prediction and reference are both empty (the denominator is 0) the score is
undefined. ``"nan"`` (default) reports NaN so the pair is left out of every mean; ``"one"`` counts it as perfect
agreement (MONAI's ``DiceMetric(ignore_empty=False)``); ``"zero"`` counts it as a miss. Under ``absent="exclude"``
it only concerns the thresholded Dice at a level where the reference of a present class is empty.

Two words: ``threshold`` (of :func:`dice` and :func:`iou`) is one cut that binarises the probabilities instead of
the argmax; ``levels`` (of :func:`thresholded_dice`, QUBIQ) is the list of cuts at which prediction and reference
are both binarised, one Dice per level, then averaged.

``include_background`` defaults to False for every overlap metric, functional and streaming: class 0 is
background, whose overlap is large and uninformative, so only the foreground classes are scored.

Hard overlap with a soft reference uses the reference's argmax (the majority class of the raters; ties go to the
lower class index, so a 50/50 vote is background in the binary case).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from medjdt._deprecation import renamed_argument
from medjdt.metrics._argmax import class_max
from medjdt.metrics._binning import grouped_sums
from medjdt.metrics._checks import MetricInputs, check_levels, prepare_inputs
from medjdt.validation import check_choice, check_number

__all__ = ["ABSENT_RULES", "QUBIQ_LEVELS", "dice", "iou", "soft_dice", "thresholded_dice"]

EmptyRule = Literal["nan", "one", "zero"]
EMPTY_RULES = ("nan", "one", "zero")
AbsentRule = Literal["exclude", "score"]
ABSENT_RULES = ("exclude", "score")
_EMPTY_VALUE = {"nan": float("nan"), "one": 1.0, "zero": 0.0}

QUBIQ_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The levels of the QUBIQ challenge's thresholded Dice."""


def __getattr__(name: str) -> object:
    if name == "QUBIQ_THRESHOLDS":  # the old name of QUBIQ_LEVELS, kept for one release
        warnings.warn("QUBIQ_THRESHOLDS is deprecated; use QUBIQ_LEVELS", FutureWarning, stacklevel=2)
        return QUBIQ_LEVELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_levels(
    where: str,
    levels: Sequence[float],
    thresholds: Sequence[float] | None,
    default: Sequence[float] = QUBIQ_LEVELS,
    *,
    stacklevel: int = 4,
) -> Sequence[float]:
    """``levels``, or the deprecated ``thresholds`` (with a ``FutureWarning``) when only that was given.

    ``levels`` equal to ``default`` counts as not given (a config loader passes the defaults too). ``stacklevel``
    counts from here: 4 points at the caller of the function that calls this one.

    Raises:
        ValueError: both were given.
    """
    try:
        given = tuple(levels) != tuple(default)
    except TypeError:  # not a sequence: given, and the check of the levels says what is wrong with it
        given = True
    return renamed_argument(where, "thresholds", "levels", thresholds, levels, new_given=given, stacklevel=stacklevel)


@dataclass(frozen=True)
class OverlapSums:
    """Sufficient statistics for the overlap metrics, float64, per image and class.

    Attributes:
        tp, fp, fn: ``(B, C)`` hard true positive, false positive and false negative voxel counts.
        pred_mass, ref_mass, abs_diff: ``(B, C)`` |x|_1, |y|_1 and |x - y|_1 of probabilities and reference.
        thr_tp, thr_pred, thr_ref: ``(B, C, T)`` per level t: |{x > t} & {y > t}|, |{x > t}|, |{y > t}|.
    """

    tp: Tensor
    fp: Tensor
    fn: Tensor
    pred_mass: Tensor
    ref_mass: Tensor
    abs_diff: Tensor
    thr_tp: Tensor
    thr_pred: Tensor
    thr_ref: Tensor


def ratio(numerator: Tensor, denominator: Tensor, empty: str) -> Tensor:
    """``numerator / denominator`` with the "both empty" rule applied where ``denominator == 0``."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), _EMPTY_VALUE[empty])


def dice_from_sums(tp: Tensor, fp: Tensor, fn: Tensor, empty: str) -> Tensor:
    return ratio(2 * tp, 2 * tp + fp + fn, empty)


def iou_from_sums(tp: Tensor, fp: Tensor, fn: Tensor, empty: str) -> Tensor:
    return ratio(tp, tp + fp + fn, empty)


def soft_dice_from_sums(pred_mass: Tensor, ref_mass: Tensor, abs_diff: Tensor, empty: str) -> Tensor:
    """(|x| + |y| - |x - y|) / (|x| + |y|); equals 2<x, y> / (|x| + |y|) for a hard reference."""
    total = pred_mass + ref_mass
    return ratio(total - abs_diff, total, empty)


def thresholded_dice_from_sums(thr_tp: Tensor, thr_pred: Tensor, thr_ref: Tensor, empty: str) -> Tensor:
    """Dice at each level (last dim), then the mean over the levels where it is not NaN."""
    return ratio(2 * thr_tp, thr_pred + thr_ref, empty).nanmean(-1)


def exclude_absent(scores: Tensor, reference_size: Tensor, absent: str) -> Tensor:
    """``scores`` with NaN where the class is absent from the reference (``reference_size == 0``) under
    ``absent="exclude"``; unchanged under ``"score"``. Shapes ``(..., C)`` both."""
    if absent == "score":
        return scores
    return torch.where(reference_size > 0, scores, torch.full_like(scores, float("nan")))


def _reference_labels(inputs: MetricInputs) -> Tensor:
    return class_max(inputs.target)[1] if inputs.soft else inputs.target


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(B, N)`` labels to a ``(B, C, N)`` bool one-hot tensor."""
    return labels[:, None] == torch.arange(num_classes, device=labels.device)[None, :, None]


def confusion_counts(inputs: MetricInputs, threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Hard TP, FP, FN per image and class, float64 ``(B, C)`` each.

    The prediction is the argmax of ``probs`` (``threshold=None``) or, per class, ``probs > threshold``.
    """
    num_classes = inputs.num_classes
    reference = _reference_labels(inputs)
    if threshold is None:
        predicted = class_max(inputs.probs)[1]
        keys = torch.add(reference, predicted, alpha=num_classes)
        counts = grouped_sums(keys, num_classes * num_classes, valid=inputs.mask)[0]
        confusion = counts.unflatten(-1, (num_classes, num_classes))  # (B, predicted, reference)
        tp = confusion.diagonal(dim1=-2, dim2=-1)
        return tp, confusion.sum(-1) - tp, confusion.sum(-2) - tp
    predicted = inputs.probs > threshold
    truth = _one_hot(reference, num_classes)
    if inputs.mask is not None:
        predicted &= inputs.mask[:, None]
        truth &= inputs.mask[:, None]
    tp = (predicted & truth).sum(-1).double()
    return tp, predicted.sum(-1).double() - tp, truth.sum(-1).double() - tp


def soft_overlap_sums(inputs: MetricInputs) -> tuple[Tensor, Tensor, Tensor]:
    """|x|_1, |y|_1 and |x - y|_1 per image and class, float64 ``(B, C)`` each."""
    probs = inputs.probs
    valid = None if inputs.mask is None else inputs.mask[:, None]
    pred_mass = _masked_sum(probs, valid)
    if inputs.soft:
        return pred_mass, _masked_sum(inputs.target, valid), _masked_sum((probs - inputs.target).abs_(), valid)
    # One-hot y: |y|_c is the label count and |x - y|_1 = |x|_1 + |y|_1 - 2 <x, y>, where <x, y>_c sums the
    # probability of class c over the voxels labelled c; one grouped sum over labels gives both.
    p_label = probs.gather(1, inputs.target[:, None]).squeeze(1)
    ref_mass, overlap = grouped_sums(inputs.target.clone(), inputs.num_classes, (p_label,), inputs.mask)
    return pred_mass, ref_mass, pred_mass + ref_mass - 2 * overlap


def threshold_counts(inputs: MetricInputs, levels: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, class and level t: |{x > t} & {y > t}|, |{x > t}|, |{y > t}|, float64 ``(B, C, T)`` each.

    One joint histogram of (number of levels below x, number below y) per image and class gives all three
    counts for every level at once.
    """
    n_levels = len(levels)
    n_bands = n_levels + 1
    edges = torch.tensor(levels, dtype=inputs.probs.dtype, device=inputs.probs.device)
    # bucketize(right=False) counts the edges strictly below the value: x > t_k  <=>  band(x) > k.
    keys = torch.bucketize(inputs.probs, edges).mul_(n_bands)
    if inputs.soft:
        keys += torch.bucketize(inputs.target, edges)
    else:
        # A one-hot 1 is above every level: the labelled class gets reference band n_levels, the others 0.
        label_band = torch.full((), n_levels, dtype=keys.dtype, device=keys.device)
        keys.scatter_add_(1, inputs.target[:, None], label_band.expand(keys.shape[0], 1, keys.shape[2]))
    valid = None if inputs.mask is None else inputs.mask[:, None]
    hist = grouped_sums(keys, n_bands * n_bands, valid=valid)[0].unflatten(-1, (n_bands, n_bands))
    return threshold_counts_from_histogram(hist)


def threshold_counts_from_histogram(hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three counts of :func:`threshold_counts` from the joint band histogram ``(..., T + 1, T + 1)``.

    ``hist[..., i, j]`` counts the voxels with i levels below x and j levels below y.
    """
    n_bands = hist.shape[-1]
    # tail[i, j] = number of voxels with pred band >= i and ref band >= j
    tail = hist.flip(-2, -1).cumsum(-2).cumsum(-1).flip(-2, -1)
    above = torch.arange(1, n_bands, device=hist.device)
    return tail[..., above, above], tail[..., above, 0], tail[..., 0, above]


def overlap_sums(
    inputs: MetricInputs, levels: Sequence[float] = QUBIQ_LEVELS, *, thresholds: Sequence[float] | None = None
) -> OverlapSums:
    """All overlap sufficient statistics of one batch (argmax prediction for the hard counts).

    Args:
        inputs: validated inputs from :func:`~medjdt.metrics._checks.prepare_inputs`.
        levels: the levels of the thresholded Dice counts (default: the QUBIQ levels).
        thresholds: deprecated name of ``levels``.

    Returns:
        :class:`OverlapSums` with ``(B, C)`` and ``(B, C, T)`` fields.
    """
    levels = resolve_levels("overlap_sums", levels, thresholds)
    tp, fp, fn = confusion_counts(inputs)
    pred_mass, ref_mass, abs_diff = soft_overlap_sums(inputs)
    thr_tp, thr_pred, thr_ref = threshold_counts(inputs, levels)
    return OverlapSums(tp, fp, fn, pred_mass, ref_mass, abs_diff, thr_tp, thr_pred, thr_ref)


def _masked_sum(values: Tensor, valid: Tensor | None) -> Tensor:
    if valid is not None:
        values = torch.where(valid, values, 0)
    # torch sums float32 with cascaded (pairwise-like) accumulation, accurate without a float64 copy.
    return values.sum(-1).double()


def _prepare(where, probs, target, mask, include_background, empty, absent) -> tuple[MetricInputs, slice]:
    check_choice("empty", empty, EMPTY_RULES, where=where)
    check_choice("absent", absent, ABSENT_RULES, where=where)
    inputs = prepare_inputs(probs, target, mask, simplex=False)
    return inputs, slice(None) if include_background else slice(1, None)


def _check_threshold(threshold: float | None, where: str) -> float | None:
    """None (argmax), or the cut as a float in [0, 1)."""
    if threshold is None:
        return None
    return check_number("threshold", threshold, low=0, high=1, high_inclusive=False, where=where)


@torch.no_grad()
def dice(
    probs: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    threshold: float | None = None,
    include_background: bool = False,
    empty: EmptyRule = "nan",
    absent: AbsentRule = "exclude",
) -> Tensor:
    """Per-image, per-class hard Dice 2|P & Y| / (|P| + |Y|).

    Args:
        probs: ``(B, C, *spatial)`` probabilities (2 or 3 spatial dims).
        target: hard labels ``(B, *spatial)`` or soft reference ``(B, C, *spatial)`` (reduced to its argmax).
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.
        threshold: None binarises by argmax over classes; a float t in [0, 1) predicts class c where p_c > t
            (multi-label style, classes may overlap).
        include_background: False (default) scores the foreground classes only (class 0 is background, see the
            module docstring); True keeps class 0.
        empty: rule for a class empty in both prediction and reference: ``"nan"``, ``"one"`` or ``"zero"``.
        absent: ``"exclude"`` (NaN for a class with no reference voxel) or ``"score"`` (see the module docstring).

    Returns:
        ``(B, C')`` with C' = C or C - 1, in the working dtype (float32, or float64 for float64 input).

    Raises:
        ValueError: on shape/dtype mismatch, NaN, values outside [0, 1], labels outside ``[0, C)``, bad mask,
            unknown ``empty`` rule or threshold outside [0, 1).
    """
    inputs, classes = _prepare("dice", probs, target, mask, include_background, empty, absent)
    tp, fp, fn = confusion_counts(inputs, _check_threshold(threshold, "dice"))
    scores = exclude_absent(dice_from_sums(tp, fp, fn, empty), tp + fn, absent)
    return scores[:, classes].to(inputs.probs.dtype)


@torch.no_grad()
def iou(
    probs: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    threshold: float | None = None,
    include_background: bool = False,
    empty: EmptyRule = "nan",
    absent: AbsentRule = "exclude",
) -> Tensor:
    """Per-image, per-class hard IoU (Jaccard) |P & Y| / |P | Y|.

    Arguments, return shape and errors as in :func:`dice`.
    """
    inputs, classes = _prepare("iou", probs, target, mask, include_background, empty, absent)
    tp, fp, fn = confusion_counts(inputs, _check_threshold(threshold, "iou"))
    scores = exclude_absent(iou_from_sums(tp, fp, fn, empty), tp + fn, absent)
    return scores[:, classes].to(inputs.probs.dtype)


@torch.no_grad()
def soft_dice(
    probs: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    include_background: bool = False,
    empty: EmptyRule = "nan",
    absent: AbsentRule = "exclude",
) -> Tensor:
    """Per-image, per-class continuous Dice (|x|_1 + |y|_1 - |x - y|_1) / (|x|_1 + |y|_1).

    This form equals 1 only when x = y, also for a soft reference y; for a hard reference it is the classic
    soft Dice 2<x, y> / (|x|_1 + |y|_1).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: hard labels ``(B, *spatial)`` (one-hot) or soft reference ``(B, C, *spatial)``.
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.
        include_background: False (default) scores the foreground classes only; True keeps class 0.
        empty: rule when |x|_1 + |y|_1 = 0: ``"nan"``, ``"one"`` or ``"zero"``.
        absent: ``"exclude"`` (NaN for a class with zero reference mass) or ``"score"``.

    Returns:
        ``(B, C')`` in the working dtype.

    Raises:
        ValueError: as :func:`dice`.
    """
    inputs, classes = _prepare("soft_dice", probs, target, mask, include_background, empty, absent)
    pred_mass, ref_mass, abs_diff = soft_overlap_sums(inputs)
    scores = exclude_absent(soft_dice_from_sums(pred_mass, ref_mass, abs_diff, empty), ref_mass, absent)
    return scores[:, classes].to(inputs.probs.dtype)


@torch.no_grad()
def thresholded_dice(
    probs: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    levels: Sequence[float] = QUBIQ_LEVELS,
    include_background: bool = False,
    empty: EmptyRule = "nan",
    absent: AbsentRule = "exclude",
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """Per-image, per-class QUBIQ thresholded Dice.

    For each level t, prediction and reference are binarised as ``x > t`` and ``y > t`` and their Dice is
    computed; the result is the mean over levels. With ``empty="nan"`` a level at which both masks are empty is
    left out of that mean (NaN only if all levels are empty). A hard (one-hot) reference gives the same mask at
    every level.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: hard labels ``(B, *spatial)`` or soft reference ``(B, C, *spatial)`` (e.g. the rater average).
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.
        levels: strictly increasing values in (0, 1); default :data:`QUBIQ_LEVELS` (0.1, 0.2, ..., 0.9).
        include_background: False (default) scores the foreground classes only; True keeps class 0.
        empty: rule for a level at which both masks are empty: ``"nan"``, ``"one"`` or ``"zero"``.
        absent: ``"exclude"`` (NaN for a class with zero reference mass) or ``"score"``.
        thresholds: deprecated name of ``levels`` (a ``FutureWarning``; giving both is an error).

    Returns:
        ``(B, C')`` in the working dtype.

    Raises:
        ValueError: as :func:`dice`, for levels that are not strictly increasing inside (0, 1), or when both
            ``levels`` and ``thresholds`` are given.
    """
    levels = resolve_levels("thresholded_dice", levels, thresholds, stacklevel=5)  # 5: past torch.no_grad
    levels = check_levels(levels, where="thresholded_dice")
    inputs, classes = _prepare("thresholded_dice", probs, target, mask, include_background, empty, absent)
    thr_tp, thr_pred, thr_ref = threshold_counts(inputs, levels)
    _, ref_mass, _ = soft_overlap_sums(inputs)
    scores = exclude_absent(thresholded_dice_from_sums(thr_tp, thr_pred, thr_ref, empty), ref_mass, absent)
    return scores[:, classes].to(inputs.probs.dtype)

"""Calibration metrics for hard and soft references: ECE (top-label, classwise), Brier score, NLL, reliability bins.

Binning: ``n_bins`` equal-width bins over [0, 1]; bin k holds confidences in ``[k/M, (k+1)/M)`` and the last bin
is closed, ``[(M-1)/M, 1]``, so a confidence of exactly 1.0 (common once softmax saturates) lands in the last bin.
torchmetrics instead gives p = 1.0 a bin of its own; the two agree whenever no confidence is exactly 1.0.

Soft references: the "accuracy" of a voxel is the reference probability of the predicted class (top-label) or
of the class itself (classwise), so calibration is measured against the rater distribution. For a hard (one-hot)
reference this is the usual 0/1 correctness.

All metrics here are evaluation metrics: they run without gradient tracking.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from medjdt.metrics._argmax import class_max
from medjdt.metrics._binning import grouped_sums
from medjdt.metrics._checks import MetricInputs, prepare_inputs
from medjdt.validation import check_choice, check_number

__all__ = [
    "DEFAULT_N_BINS",
    "ReliabilityBins",
    "brier_score",
    "calibration_error_from_sums",
    "expected_calibration_error",
    "nll",
    "reliability_bins",
]

CalibrationKind = Literal["top_label", "classwise"]
CalibrationNorm = Literal["l1", "l2", "max"]
KINDS = ("top_label", "classwise")
NORMS = ("l1", "l2", "max")
DEFAULT_N_BINS = 15
"""Equal-width bins of every ECE unless told otherwise (as torchmetrics' calibration errors)."""


class ReliabilityBins(NamedTuple):
    """What a reliability diagram plots, per bin (last dim M = ``n_bins``).

    Attributes:
        count: number of voxels in each bin (float64, exact integers).
        confidence: mean predicted probability in each bin; NaN for empty bins.
        accuracy: mean reference probability (accuracy) in each bin; NaN for empty bins.
    """

    count: Tensor
    confidence: Tensor
    accuracy: Tensor


def _bin_keys(values: Tensor, n_bins: int) -> Tensor:
    """``floor(value * M)`` as int32 in ``[0, M]``; key M (value 1.0) is merged into bin M - 1 by
    :func:`close_last_bin`, which is cheaper than clamping every voxel."""
    return (values * n_bins).to(torch.int32)  # truncation is floor for values >= 0


def close_last_bin(sums: Tensor) -> Tensor:
    """Merge key M into bin M - 1: ``(..., M + 1)`` -> ``(..., M)``."""
    return torch.cat([sums[..., :-2], sums[..., -2:].sum(-1, keepdim=True)], dim=-1)


def _split_by_correctness(sums: Tensor, n_keys: int) -> Tensor:
    """Sums over keys ``k + n_keys * correct`` ``(2, ..., 2 * n_keys)`` to (count, confidence, accuracy) bins."""
    sums = sums.unflatten(-1, (2, n_keys))
    return torch.stack([sums[0].sum(-2), sums[1].sum(-2), sums[0, ..., 1, :]])


def top_label_bin_sums(inputs: MetricInputs, n_bins: int) -> Tensor:
    """Per-image top-label bin sums.

    Returns:
        float64 ``(3, B, M)``: voxel count, sum of confidence (max probability) and sum of accuracy per bin.
    """
    confidence, predicted = class_max(inputs.probs)
    keys = _bin_keys(confidence, n_bins)
    n_keys = n_bins + 1
    if inputs.soft:
        accuracy = inputs.target.gather(1, predicted[:, None]).squeeze(1)
        return close_last_bin(grouped_sums(keys, n_keys, (confidence, accuracy), inputs.mask))
    # Hard reference: correct voxels get keys shifted by n_keys, so the accuracy sum is an exact count.
    keys.add_(predicted == inputs.target, alpha=n_keys)
    sums = grouped_sums(keys, 2 * n_keys, (confidence,), inputs.mask)
    return close_last_bin(_split_by_correctness(sums, n_keys))


def classwise_bin_sums(inputs: MetricInputs, n_bins: int) -> Tensor:
    """Per-image, per-class bin sums of each class probability against that class's reference.

    Returns:
        float64 ``(3, B, C, M)``: voxel count, sum of class probability and sum of class reference per bin.
    """
    probs = inputs.probs
    keys = _bin_keys(probs, n_bins)
    n_keys = n_bins + 1
    valid = None if inputs.mask is None else inputs.mask[:, None]
    if inputs.soft:
        return close_last_bin(grouped_sums(keys, n_keys, (probs, inputs.target), valid))
    # Hard reference: the reference class of each voxel gets its key shifted by n_keys.
    shift = torch.full((), n_keys, dtype=keys.dtype, device=keys.device).expand(keys.shape[0], 1, keys.shape[2])
    keys.scatter_add_(1, inputs.target[:, None], shift)
    sums = grouped_sums(keys, 2 * n_keys, (probs,), valid)
    return close_last_bin(_split_by_correctness(sums, n_keys))


def reliability_from_sums(sums: Tensor) -> ReliabilityBins:
    """Turn bin sums ``(3, ..., M)`` (count, confidence sum, accuracy sum) into per-bin means."""
    count = sums[0]
    # 0/0 = NaN marks the empty bins.
    return ReliabilityBins(count=count, confidence=sums[1] / count, accuracy=sums[2] / count)


def calibration_error_from_sums(sums: Tensor | np.ndarray, norm: CalibrationNorm = "l1") -> Tensor:
    """Calibration error from per-bin sums: the one ECE of :mod:`medjdt.metrics` and :mod:`medjdt.reporting`.

    With n_b voxels in bin b, mean confidence conf_b and mean accuracy acc_b (the sums divided by n_b) and N the
    number of voxels, ``l1`` is the expected calibration error sum_b n_b / N |acc_b - conf_b|, ``l2`` the root
    mean square calibration error sqrt(sum_b n_b / N (acc_b - conf_b)^2) and ``max`` the maximum calibration
    error max_b |acc_b - conf_b| over the non-empty bins.

    Args:
        sums: ``(3, ..., M)`` per bin: voxel count n_b, sum of confidences, sum of accuracies. A tensor, or an
            array (numpy, nested lists), read as float64.
        norm: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
        ``(...)`` one error per leading index (a 0-dim tensor for ``(3, M)``); NaN where no voxel was binned.

    Raises:
        ValueError: an unknown ``norm``, or ``sums`` without the leading axis of 3 sums.
    """
    check_choice("norm", norm, NORMS, where="calibration_error_from_sums")
    sums = sums if isinstance(sums, Tensor) else torch.as_tensor(np.asarray(sums, dtype=np.float64))
    if sums.ndim < 2 or sums.shape[0] != 3:
        raise ValueError(
            f"calibration_error_from_sums: sums must have shape (3, ..., M) (count, confidence and accuracy sums "
            f"per bin), got shape {tuple(sums.shape)}"
        )
    count = sums[0]
    total = count.sum(-1)
    filled = count > 0
    gap = ((sums[2] - sums[1]) / count.clamp_min(1)).abs()  # |mean acc - mean conf|, 0 for empty bins
    weight = count / total[..., None]
    if norm == "l1":
        error = (weight * gap).sum(-1)
    elif norm == "l2":
        error = (weight * gap.square()).sum(-1).sqrt()
    else:
        error = torch.where(filled, gap, 0.0).amax(-1)
    return torch.where(total > 0, error, torch.nan)


def squared_error_sums(inputs: MetricInputs) -> Tensor:
    """Per-image sum over voxels of sum_c (p_c - y_c)^2, float64 ``(B,)``."""
    probs = inputs.probs
    per_voxel = torch.zeros(probs.shape[0], probs.shape[2], dtype=probs.dtype, device=probs.device)
    if inputs.soft:
        for c in range(inputs.num_classes):
            diff = probs[:, c] - inputs.target[:, c]
            per_voxel.addcmul_(diff, diff)
    else:
        # One-hot y: sum_c p_c^2 - p_t^2 + (1 - p_t)^2 with t the label; avoids a class-sized temporary.
        for c in range(inputs.num_classes):
            per_voxel.addcmul_(probs[:, c], probs[:, c])
        p_label = probs.gather(1, inputs.target[:, None]).squeeze(1)
        per_voxel.sub_(p_label.square()).add_((1 - p_label).square_())
    return _masked_sum(per_voxel, inputs.mask)


def nll_sums(inputs: MetricInputs, eps: float) -> Tensor:
    """Per-image sum over voxels of the cross-entropy -sum_c y_c log(max(p_c, eps)), float64 ``(B,)``."""
    probs = inputs.probs
    if inputs.soft:
        per_voxel = torch.zeros(probs.shape[0], probs.shape[2], dtype=probs.dtype, device=probs.device)
        for c in range(inputs.num_classes):
            per_voxel.addcmul_(inputs.target[:, c], probs[:, c].clamp_min(eps).log_(), value=-1)
    else:
        per_voxel = probs.gather(1, inputs.target[:, None]).squeeze(1).clamp_min_(eps).log_().neg_()
    return _masked_sum(per_voxel, inputs.mask)


def voxel_counts(inputs: MetricInputs) -> Tensor:
    """Number of counted voxels per image, float64 ``(B,)``."""
    batch, _, n = inputs.probs.shape
    if inputs.mask is None:
        return torch.full((batch,), float(n), dtype=torch.float64, device=inputs.probs.device)
    return inputs.mask.sum(1).double()


def _masked_sum(per_voxel: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        per_voxel = torch.where(mask, per_voxel, 0.0)
    # torch sums float32 with cascaded (pairwise-like) accumulation, accurate without a float64 copy.
    return per_voxel.sum(-1).double()


def _select_classes(values: Tensor, include_background: bool) -> Tensor:
    return values if include_background else values[..., 1:, :]


@torch.no_grad()
def reliability_bins(
    probs: Tensor,
    target: Tensor,
    n_bins: int = DEFAULT_N_BINS,
    kind: CalibrationKind = "top_label",
    *,
    mask: Tensor | None = None,
    include_background: bool = True,
) -> ReliabilityBins:
    """Per-image reliability-diagram bins.

    Args:
        probs: ``(B, C, *spatial)`` probabilities (2 or 3 spatial dims); for ``kind="top_label"`` they must sum
            to 1 over C.
        target: hard labels ``(B, *spatial)`` or a soft reference ``(B, C, *spatial)`` summing to 1 over C.
        n_bins: number of equal-width bins M over [0, 1] (default 15; see the module docstring for the edges).
        kind: ``"top_label"`` bins the max probability against the reference probability of the predicted class;
            ``"classwise"`` bins every class probability against that class's reference probability.
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.
        include_background: classwise only: True (default) keeps a row for class 0, since calibration judges the
            whole distribution, background probability included; False drops it.

    Returns:
        :class:`ReliabilityBins` with tensors of shape ``(B, M)`` (top-label) or ``(B, C', M)`` (classwise,
        C' = C or C - 1).

    Raises:
        ValueError: on bad arguments or inputs (see :func:`expected_calibration_error`).
    """
    n_bins = check_number("n_bins", n_bins, low=1, integer=True, where="reliability_bins")
    check_choice("kind", kind, KINDS, where="reliability_bins")
    inputs = prepare_inputs(probs, target, mask, simplex=kind == "top_label")
    if kind == "top_label":
        return reliability_from_sums(top_label_bin_sums(inputs, n_bins))
    return reliability_from_sums(_select_classes(classwise_bin_sums(inputs, n_bins), include_background))


@torch.no_grad()
def expected_calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = DEFAULT_N_BINS,
    kind: CalibrationKind = "top_label",
    norm: CalibrationNorm = "l1",
    *,
    mask: Tensor | None = None,
    include_background: bool = True,
) -> Tensor:
    """Per-image expected calibration error with equal-width bins.

    ``kind="top_label"``: each voxel contributes its max probability (confidence) and the reference probability
    of its predicted class (accuracy; 0/1 correctness for hard labels). ``kind="classwise"``: for every class c,
    each voxel contributes p_c and the reference probability y_c; this is MONAI's ``CalibrationErrorMetric``.
    Per bin, |mean accuracy - mean confidence| is combined by ``norm`` (see :func:`calibration_error_from_sums`).

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1] (2 or 3 spatial dims). Top-label requires them to
            sum to 1 over C; classwise does not.
        target: hard labels ``(B, *spatial)`` (integer) or soft reference ``(B, C, *spatial)`` summing to 1 over C.
        n_bins: number of bins M over [0, 1] (default 15, as torchmetrics); bin k is ``[k/M, (k+1)/M)``, the last
            bin includes 1.0.
        kind: ``"top_label"`` or ``"classwise"``.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (maximum calibration error).
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded (and may hold any value).
        include_background: classwise only: True (default) scores class 0 too, since calibration judges the
            whole distribution, background probability included; False drops it.

    Returns:
        ``(B,)`` for top-label, ``(B, C')`` for classwise; NaN for an image with no counted voxel.

    Raises:
        ValueError: on an unknown ``kind``/``norm``, ``n_bins < 1``, shape or dtype mismatch, NaN, values outside
            [0, 1], probabilities not summing to 1 when ``kind`` needs it, or labels outside ``[0, C)``.
    """
    n_bins = check_number("n_bins", n_bins, low=1, integer=True, where="expected_calibration_error")
    check_choice("kind", kind, KINDS, where="expected_calibration_error")
    check_choice("norm", norm, NORMS, where="expected_calibration_error")
    inputs = prepare_inputs(probs, target, mask, simplex=kind == "top_label")
    if kind == "top_label":
        sums = top_label_bin_sums(inputs, n_bins)
    else:
        sums = _select_classes(classwise_bin_sums(inputs, n_bins), include_background)
    return calibration_error_from_sums(sums, norm).to(inputs.probs.dtype)


@torch.no_grad()
def brier_score(probs: Tensor, target: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Per-image multiclass Brier score: mean over voxels of sum_c (p_c - y_c)^2.

    This is Brier's original multiclass definition (range [0, 2]); for two classes it is twice the one-column
    binary form (q - y)^2 that scikit-learn's ``brier_score_loss`` reports for binary problems.

    Args:
        probs: ``(B, C, *spatial)`` probabilities summing to 1 over C.
        target: hard labels ``(B, *spatial)`` (y is one-hot) or soft reference ``(B, C, *spatial)``.
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.

    Returns:
        ``(B,)``; NaN for an image with no counted voxel.

    Raises:
        ValueError: on bad inputs (see :func:`expected_calibration_error`).
    """
    inputs = prepare_inputs(probs, target, mask, simplex=True)
    return (squared_error_sums(inputs) / voxel_counts(inputs)).to(inputs.probs.dtype)


@torch.no_grad()
def nll(probs: Tensor, target: Tensor, *, mask: Tensor | None = None, eps: float = 1e-7) -> Tensor:
    """Per-image negative log-likelihood: mean over voxels of the cross-entropy -sum_c y_c log p_c.

    Probabilities are floored at ``eps`` inside the logarithm so that a saturated softmax (p_c = 0 on the
    reference class) gives a large finite value, -log(eps), instead of inf.

    Args:
        probs: ``(B, C, *spatial)`` probabilities summing to 1 over C.
        target: hard labels ``(B, *spatial)`` or soft reference ``(B, C, *spatial)``.
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded.
        eps: floor for probabilities inside the log, in (0, 1).

    Returns:
        ``(B,)``; NaN for an image with no counted voxel.

    Raises:
        ValueError: on bad inputs (see :func:`expected_calibration_error`) or ``eps`` outside (0, 1).
    """
    eps = check_number("eps", eps, low=0, high=1, low_inclusive=False, high_inclusive=False, where="nll")
    inputs = prepare_inputs(probs, target, mask, simplex=True)
    return (nll_sums(inputs, eps) / voxel_counts(inputs)).to(inputs.probs.dtype)

"""The overlap part of a streaming metric: one float64 row of sums per image, and the metrics of summed rows.

Used by :class:`~medjdt.metrics.OverlapMetrics` and :class:`~medjdt.metrics.SegmentationMetrics`; rows of the
same case or of the whole dataset are summed before any score is computed (see
:mod:`medjdt.metrics._per_case_metric`), and the scores follow the rules of :mod:`medjdt.metrics.overlap`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medjdt.metrics._checks import check_levels
from medjdt.metrics._sums import VoxelSums
from medjdt.metrics.overlap import (
    ABSENT_RULES,
    EMPTY_RULES,
    dice_from_sums,
    exclude_absent,
    iou_from_sums,
    soft_dice_from_sums,
    thresholded_dice_from_sums,
)
from medjdt.validation import check_choice, check_number

OVERLAP_METRICS = ("dice", "iou", "soft_dice", "thresholded_dice")


def _worst_mean(scores: Tensor, percent: float) -> Tensor:
    """Mean of the lowest ``percent`` % of the non-NaN ``scores`` (at least one score)."""
    valid = scores[~scores.isnan()]
    if valid.numel() == 0:
        return torch.tensor(float("nan"), dtype=scores.dtype, device=scores.device)
    k = max(1, math.ceil(percent / 100 * valid.numel()))
    return valid.sort().values[:k].mean()


class OverlapPart:
    """Overlap statistics of one image as a float64 row, and the metrics computed from summed rows.

    Row layout: per class [tp, fp, fn, |x|, |y|, |x - y|, thr_tp (T), thr_pred (T), thr_ref (T)].

    Args:
        num_classes, class_names: C and the C names used in output keys.
        include_background: whether class 0 is scored.
        empty: the "both empty" rule, ``"nan"``, ``"one"`` or ``"zero"``.
        levels: the levels of the thresholded Dice, strictly increasing in (0, 1).
        worst_percent: the q values of the worst-case aggregates, each in (0, 100].
        absent: the rule for a class absent from the reference, ``"exclude"`` or ``"score"``.
        where: the metric's name, for error messages.

    Raises:
        ValueError: a bad ``empty``, ``absent``, ``levels`` or ``worst_percent``.
    """

    simplex = False  # overlap metrics accept probabilities that do not sum to 1

    def __init__(
        self,
        num_classes: int,
        class_names: list[str],
        include_background: bool,
        empty: str,
        levels: Sequence[float],
        worst_percent: Sequence[float],
        absent: str,
        where: str,
    ) -> None:
        self.num_classes, self.class_names = num_classes, class_names
        self.include_background = include_background
        self.empty = check_choice("empty", empty, EMPTY_RULES, where=where)
        self.absent = check_choice("absent", absent, ABSENT_RULES, where=where)
        self.levels = check_levels(levels, where=where)
        self.worst_percent = tuple(
            check_number(f"worst_percent[{i}]", q, low=0, high=100, low_inclusive=False, where=where)
            for i, q in enumerate(worst_percent)
        )
        self._per_class = 6 + 3 * len(self.levels)
        self.size = num_classes * self._per_class
        self.sum_options = {"overlap": True, "levels": self.levels}

    def rows(self, sums: VoxelSums) -> Tensor:
        """Per-image rows ``(B, size)`` from the sums of a batch."""
        overlap = sums.overlap
        per_class = [overlap.tp, overlap.fp, overlap.fn, overlap.pred_mass, overlap.ref_mass, overlap.abs_diff]
        stats = torch.cat(
            [torch.stack(per_class, dim=-1), overlap.thr_tp, overlap.thr_pred, overlap.thr_ref], dim=-1
        )  # (B, C, per_class)
        return stats.flatten(1)

    def _per_class_stats(self, stats: Tensor) -> Tensor:
        """Stats ``(..., S)`` as ``(..., C', per_class)``, classes as in ``include_background``."""
        per_class = stats.unflatten(-1, (self.num_classes, self._per_class))
        return per_class if self.include_background else per_class[..., 1:, :]

    def _scores(self, stats: Tensor) -> dict[str, Tensor]:
        """Per-class scores ``(..., C')`` of every metric from stats ``(..., S)``."""
        per_class = self._per_class_stats(stats)
        tp, fp, fn, pred_mass, ref_mass, abs_diff = per_class[..., :6].unbind(-1)
        thr = per_class[..., 6:].unflatten(-1, (3, len(self.levels)))
        thresholded = thresholded_dice_from_sums(thr[..., 0, :], thr[..., 1, :], thr[..., 2, :], self.empty)
        soft = soft_dice_from_sums(pred_mass, ref_mass, abs_diff, self.empty)
        return {
            "dice": exclude_absent(dice_from_sums(tp, fp, fn, self.empty), tp + fn, self.absent),
            "iou": exclude_absent(iou_from_sums(tp, fp, fn, self.empty), tp + fn, self.absent),
            "soft_dice": exclude_absent(soft, ref_mass, self.absent),
            "thresholded_dice": exclude_absent(thresholded, ref_mass, self.absent),
        }

    def _absent_false_positives(self, stats: Tensor) -> Tensor:
        """Voxels predicted (argmax) as a class the reference lacks, ``(..., C')`` from stats ``(..., S)``."""
        per_class = self._per_class_stats(stats)
        tp, fp, fn = per_class[..., 0], per_class[..., 1], per_class[..., 2]
        return torch.where(tp + fn > 0, torch.zeros_like(fp), fp)

    def _class_names(self) -> list[str]:
        return self.class_names if self.include_background else self.class_names[1:]

    def compute(self, totals: Tensor, cases: Tensor) -> dict[str, Tensor]:
        """Dataset (D), image (I), class (C) and worst-case aggregates from ``totals`` ``(S,)`` and ``cases``
        ``(K, S)``; NaN scores are left out of every mean (NaN where nothing is left)."""
        pooled = self._scores(totals)
        scores = self._scores(cases)
        out: dict[str, Tensor] = {}
        for metric in OVERLAP_METRICS:
            per_case = scores[metric].nanmean(-1)  # (K,)
            per_class = scores[metric].nanmean(0)  # (C',)
            out[metric] = per_case.nanmean()
            out[f"{metric}_D"] = pooled[metric].nanmean()
            out[f"{metric}_I"] = out[metric]
            out[f"{metric}_C"] = per_class.nanmean()
            for q in self.worst_percent:
                out[f"{metric}_worst{q:g}"] = _worst_mean(per_case, q)
            for name, value in zip(self._class_names(), per_class):
                out[f"{metric}/{name}"] = value
        absent_fp = self._absent_false_positives(cases)  # (K, C')
        out["absent_fp_voxels"] = absent_fp.sum(-1).mean() if absent_fp.numel() else totals.new_tensor(0.0)
        for name, value in zip(self._class_names(), absent_fp.unbind(-1)):
            out[f"absent_fp_cases/{name}"] = (value > 0).sum().to(totals.dtype)
        return out

    def case_columns(self, stats: Tensor) -> dict[str, Tensor]:
        """Per-case columns (name -> ``(K,)``) from per-case stats ``(K, S)``."""
        scores = self._scores(stats)
        per_class = stats.unflatten(-1, (self.num_classes, self._per_class))
        columns = {"n_voxels": per_class[..., 0].sum(-1) + per_class[..., 1].sum(-1)}  # every voxel: TP or FP once
        for metric in OVERLAP_METRICS:
            columns[metric] = scores[metric].nanmean(-1)
            for c, name in enumerate(self._class_names()):
                columns[f"{metric}/{name}"] = scores[metric][:, c]
        absent_fp = self._absent_false_positives(stats)
        columns["absent_fp_voxels"] = absent_fp.sum(-1)
        for c, name in enumerate(self._class_names()):
            columns[f"absent_fp_voxels/{name}"] = absent_fp[:, c]
        return columns

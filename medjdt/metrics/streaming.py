"""Streaming metric objects: accumulate sums over chunks, cases and DDP ranks, then aggregate.

:class:`CalibrationMetrics` (ECE, Brier, NLL), :class:`OverlapMetrics` (Dice, IoU, soft and thresholded Dice) and
:class:`SegmentationMetrics` (both, from one pass over every batch) keep two kinds of state, all float64 sums:

* ``totals``: the pooled sums over every voxel seen, O(bins x classes), reduced with ``"sum"`` under DDP;
* ``case_names`` / ``case_stats``: one row of the same sums per case, gathered with ``"cat"`` under DDP.
  Rows with the same case id are summed, so a volume evaluated in chunks (sliding window), in any order and
  on any mix of ranks, gives exactly the sums of the whole volume. Memory is O(cases x bins x classes),
  independent of the volume size.

``update(probs, target, case_ids=None, mask=None)`` takes probabilities ``(B, C, *spatial)`` and hard labels
``(B, *spatial)`` or a soft reference ``(B, C, *spatial)``; ``case_ids`` names the case of each image (default:
every image is its own case).

Every batch is summed in one pass over its voxels (:func:`medjdt.metrics.fused.voxel_sums`). On CPU tensors the
input values are checked inside ``update`` (a ``ValueError`` names the offending cases); on accelerators the
value checks are deferred, so that ``update`` never waits for the device: their per-image statistics stay on the
device and are read, all at once, before ``compute``, ``per_case`` or ``reliability`` return anything (or when
``reset`` clears the state), which then raise the same ``ValueError``.

Duplicated samples: every voxel update is counted, so a case fed twice (e.g. a ``DistributedSampler`` padding
the last batch) is counted twice in the pooled values; use a sampler that does not repeat samples for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from medjdt.metrics._cases import CASE_ID_BYTES, cat_state, decode_case_ids, encode_case_ids, merge_rows
from medjdt.metrics._checks import (
    DeferredCheck,
    MetricInputs,
    check_choice,
    check_image_stats,
    check_n_bins,
    check_thresholds,
    prepare_inputs,
)
from medjdt.metrics.calibration import NORMS, calibration_error_from_sums, reliability_from_sums
from medjdt.metrics.fused import VoxelSums, voxel_sums
from medjdt.metrics.overlap import (
    ABSENT_RULES,
    EMPTY_RULES,
    QUBIQ_THRESHOLDS,
    dice_from_sums,
    exclude_absent,
    iou_from_sums,
    soft_dice_from_sums,
    thresholded_dice_from_sums,
)

__all__ = ["CalibrationMetrics", "OverlapMetrics", "SegmentationMetrics"]

# Merging per-case rows costs O(rows); merging once the unmerged rows outnumber the merged ones keeps the total
# cost linear in the number of updates.
_MIN_ROWS_BEFORE_MERGE = 64


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    return num_classes


def _check_class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = list(class_names)
    if len(names) != num_classes or len(set(names)) != num_classes or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be {num_classes} distinct strings, got {class_names!r}.")
    return names


def _nanmean(values: Tensor, dim: int | None = None) -> Tensor:
    """Mean ignoring NaN; NaN where nothing is left (also for zero cases)."""
    return values.nanmean() if dim is None else values.nanmean(dim)


def _worst_mean(scores: Tensor, percent: float) -> Tensor:
    """Mean of the lowest ``percent`` % of the non-NaN ``scores`` (at least one score)."""
    valid = scores[~scores.isnan()]
    if valid.numel() == 0:
        return torch.tensor(float("nan"), dtype=scores.dtype, device=scores.device)
    k = max(1, math.ceil(percent / 100 * valid.numel()))
    return valid.sort().values[:k].mean()


class _CalibrationPart:
    """Calibration statistics of one image as a float64 row, and the metrics computed from summed rows.

    Row layout: top-label bins (3, M) | classwise bins (3, C, M) | squared error sum | NLL sum.
    """

    simplex = True  # top-label calibration, Brier and NLL need probabilities summing to 1

    def __init__(
        self, num_classes: int, class_names: list[str], n_bins: int, norm: str, include_background: bool, eps: float
    ) -> None:
        self.num_classes, self.class_names = num_classes, class_names
        self.n_bins = check_n_bins(n_bins)
        self.norm = check_choice("norm", norm, NORMS)
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps!r}.")
        self.eps = eps
        self.include_background = include_background
        self.size = 3 * n_bins * (1 + num_classes) + 2
        self.sum_options = {"n_bins": n_bins, "eps": eps}

    def rows(self, sums: VoxelSums) -> Tensor:
        """Per-image rows ``(B, size)`` from the sums of a batch."""
        batch = sums.squared_error.shape[0]
        return torch.cat(
            [
                sums.top_label.transpose(0, 1).reshape(batch, -1),
                sums.classwise.transpose(0, 1).reshape(batch, -1),
                sums.squared_error[:, None],
                sums.nll[:, None],
            ],
            dim=1,
        )

    def _split(self, stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stats ``(..., S)`` to top bins ``(3, ..., M)``, classwise ``(3, ..., C', M)``, sq. error, NLL sums."""
        m, c = self.n_bins, self.num_classes
        top = stats[..., : 3 * m].unflatten(-1, (3, m)).movedim(-2, 0)
        classwise = stats[..., 3 * m : 3 * m * (1 + c)].unflatten(-1, (3, c, m)).movedim(-3, 0)
        if not self.include_background:
            classwise = classwise[..., 1:, :]
        return top, classwise, stats[..., -2], stats[..., -1]

    def _values(self, stats: Tensor) -> dict[str, Tensor]:
        top, classwise, squared_error, nll = self._split(stats)
        n_voxels = top[0].sum(-1)
        return {
            "ece": calibration_error_from_sums(top, self.norm),
            "ece_classwise": calibration_error_from_sums(classwise, self.norm),  # (..., C')
            "brier": squared_error / n_voxels,
            "nll": nll / n_voxels,
            "n_voxels": n_voxels,
        }

    def _class_names(self) -> list[str]:
        return self.class_names if self.include_background else self.class_names[1:]

    def compute(self, totals: Tensor, cases: Tensor) -> dict[str, Tensor]:
        """Pooled values from ``totals`` ``(S,)`` and per-case means from ``cases`` ``(K, S)``."""
        pooled = self._values(totals)
        per_case = self._values(cases)
        out = {
            "ece_D": pooled["ece"],
            "ece_classwise_D": _nanmean(pooled["ece_classwise"]),
            "brier_D": pooled["brier"],
            "nll_D": pooled["nll"],
            "ece_I": _nanmean(per_case["ece"]),
            "ece_classwise_I": _nanmean(_nanmean(per_case["ece_classwise"], dim=-1)),
            "brier_I": _nanmean(per_case["brier"]),
            "nll_I": _nanmean(per_case["nll"]),
        }
        for name in ("ece", "ece_classwise", "brier", "nll"):
            out[name] = out[f"{name}_I"]  # as for the overlap metrics: the unsuffixed name is the mean over cases
        for name, value in zip(self._class_names(), pooled["ece_classwise"]):
            out[f"ece_classwise_D/{name}"] = value
        return out

    def case_columns(self, stats: Tensor) -> dict[str, Tensor]:
        """Per-case columns (name -> ``(K,)``) from per-case stats ``(K, S)``."""
        values = self._values(stats)
        columns = {
            "ece": values["ece"],
            "ece_classwise": _nanmean(values["ece_classwise"], dim=-1),
            "brier": values["brier"],
            "nll": values["nll"],
            "n_voxels": values["n_voxels"],
        }
        for c, name in enumerate(self._class_names()):
            columns[f"ece_classwise/{name}"] = values["ece_classwise"][:, c]
        return columns

    def reliability(self, totals: Tensor, kind: str) -> pd.DataFrame:
        """Reliability-diagram bins of ``kind`` from the pooled ``totals`` ``(S,)``."""
        top, classwise, _, _ = self._split(totals)
        bins = reliability_from_sums(top if kind == "top_label" else classwise)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        frame = pd.DataFrame(
            {
                "bin_lower": edges[:-1].repeat(bins.count.numel() // self.n_bins).numpy(),
                "bin_upper": edges[1:].repeat(bins.count.numel() // self.n_bins).numpy(),
                "count": bins.count.flatten().cpu().numpy(),
                "confidence": bins.confidence.flatten().cpu().numpy(),
                "accuracy": bins.accuracy.flatten().cpu().numpy(),
            }
        )
        if kind == "classwise":
            frame.insert(0, "class", [name for name in self._class_names() for _ in range(self.n_bins)])
        return frame


_OVERLAP_METRICS = ("dice", "iou", "soft_dice", "thresholded_dice")


class _OverlapPart:
    """Overlap statistics of one image as a float64 row, and the metrics computed from summed rows.

    Row layout: per class [tp, fp, fn, |x|, |y|, |x - y|, thr_tp (T), thr_pred (T), thr_ref (T)].
    """

    simplex = False  # overlap metrics accept probabilities that do not sum to 1

    def __init__(
        self,
        num_classes: int,
        class_names: list[str],
        include_background: bool,
        empty: str,
        thresholds: Sequence[float],
        worst_percent: Sequence[float],
        absent: str = "exclude",
    ) -> None:
        self.num_classes, self.class_names = num_classes, class_names
        self.include_background = include_background
        self.empty = check_choice("empty", empty, EMPTY_RULES)
        self.absent = check_choice("absent", absent, ABSENT_RULES)
        self.thresholds = check_thresholds(thresholds)
        self.worst_percent = tuple(float(q) for q in worst_percent)
        if any(not 0 < q <= 100 for q in self.worst_percent):
            raise ValueError(f"worst_percent values must be in (0, 100], got {worst_percent!r}.")
        self._per_class = 6 + 3 * len(self.thresholds)
        self.size = num_classes * self._per_class
        self.sum_options = {"overlap": True, "thresholds": self.thresholds}

    def rows(self, sums: VoxelSums) -> Tensor:
        """Per-image rows ``(B, size)`` from the sums of a batch."""
        overlap = sums.overlap
        per_class = [overlap.tp, overlap.fp, overlap.fn, overlap.pred_mass, overlap.ref_mass, overlap.abs_diff]
        stats = torch.cat(
            [torch.stack(per_class, dim=-1), overlap.thr_tp, overlap.thr_pred, overlap.thr_ref], dim=-1
        )  # (B, C, per_class)
        return stats.flatten(1)

    def _scores(self, stats: Tensor) -> dict[str, Tensor]:
        """Per-class scores ``(..., C')`` of every metric from stats ``(..., S)``."""
        per_class = stats.unflatten(-1, (self.num_classes, self._per_class))
        if not self.include_background:
            per_class = per_class[..., 1:, :]
        n_thr = len(self.thresholds)
        tp, fp, fn, pred_mass, ref_mass, abs_diff = per_class[..., :6].unbind(-1)
        thr = per_class[..., 6:].unflatten(-1, (3, n_thr))
        thresholded = thresholded_dice_from_sums(thr[..., 0, :], thr[..., 1, :], thr[..., 2, :], self.empty)
        return {
            "dice": exclude_absent(dice_from_sums(tp, fp, fn, self.empty), tp + fn, self.absent),
            "iou": exclude_absent(iou_from_sums(tp, fp, fn, self.empty), tp + fn, self.absent),
            "soft_dice": exclude_absent(soft_dice_from_sums(pred_mass, ref_mass, abs_diff, self.empty), ref_mass,
                                        self.absent),
            "thresholded_dice": exclude_absent(thresholded, ref_mass, self.absent),
        }

    def _absent_false_positives(self, stats: Tensor) -> Tensor:
        """Voxels predicted (argmax) as a class the reference lacks, ``(..., C')`` from stats ``(..., S)``."""
        per_class = stats.unflatten(-1, (self.num_classes, self._per_class))
        if not self.include_background:
            per_class = per_class[..., 1:, :]
        tp, fp, fn = per_class[..., 0], per_class[..., 1], per_class[..., 2]
        return torch.where(tp + fn > 0, torch.zeros_like(fp), fp)

    def _class_names(self) -> list[str]:
        return self.class_names if self.include_background else self.class_names[1:]

    def compute(self, totals: Tensor, cases: Tensor) -> dict[str, Tensor]:
        """Dataset (D), image (I), class (C) and worst-case aggregates from ``totals`` ``(S,)`` and ``cases``
        ``(K, S)``."""
        pooled = self._scores(totals)
        scores = self._scores(cases)
        out: dict[str, Tensor] = {}
        for metric in _OVERLAP_METRICS:
            per_case = _nanmean(scores[metric], dim=-1)  # (K,)
            per_class = _nanmean(scores[metric], dim=0)  # (C',)
            out[metric] = _nanmean(per_case)
            out[f"{metric}_D"] = _nanmean(pooled[metric])
            out[f"{metric}_I"] = out[metric]
            out[f"{metric}_C"] = _nanmean(per_class)
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
        for metric in _OVERLAP_METRICS:
            columns[metric] = _nanmean(scores[metric], dim=-1)
            for c, name in enumerate(self._class_names()):
                columns[f"{metric}/{name}"] = scores[metric][:, c]
        absent_fp = self._absent_false_positives(stats)
        columns["absent_fp_voxels"] = absent_fp.sum(-1)
        for c, name in enumerate(self._class_names()):
            columns[f"absent_fp_voxels/{name}"] = absent_fp[:, c]
        return columns


_Part = _CalibrationPart | _OverlapPart


class _PerCaseMetric(Metric):
    """Shared machinery: pooled ``totals`` plus per-case rows keyed by case id.

    A row is the concatenation of the rows of the metric's parts (calibration and/or overlap); every batch is
    summed for all parts in one :func:`~medjdt.metrics.fused.voxel_sums` call.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    # Devices whose inputs are value-checked inside update(); elsewhere the checks run before the results.
    _CHECK_NOW_DEVICES = ("cpu",)

    def __init__(self, num_classes: int, class_names: list[str], parts: Sequence[_Part], **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.class_names = num_classes, class_names
        self._parts = tuple(parts)
        starts = [sum(part.size for part in self._parts[:i]) for i in range(len(self._parts))]
        self._columns = [slice(start, start + part.size) for start, part in zip(starts, self._parts)]
        self._n_stats = sum(part.size for part in self._parts)
        self._simplex = any(part.simplex for part in self._parts)
        self._sum_options = {key: value for part in self._parts for key, value in part.sum_options.items()}
        self.add_state("totals", default=torch.zeros(self._n_stats, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("case_names", default=[], dist_reduce_fx="cat")
        self.add_state("case_stats", default=[], dist_reduce_fx="cat")
        self._n_auto_ids = 0
        self._merged_rows = 0
        self._pending_checks: list[DeferredCheck] = []
        self._seed_case_rows()

    def _seed_case_rows(self) -> None:
        # A rank that saw no data must still contribute 2-D tensors to the gather, not torchmetrics' 1-D default.
        self.case_names.append(torch.zeros(0, CASE_ID_BYTES, dtype=torch.uint8, device=self.device))
        self.case_stats.append(torch.zeros(0, self._n_stats, dtype=torch.float64, device=self.device))

    def update(
        self, probs: Tensor, target: Tensor, case_ids: Sequence[str] | None = None, mask: Tensor | None = None
    ) -> None:
        """Accumulate one batch or one chunk of cases (shapes in the class docstring)."""
        inputs, ids, unchecked = self._prepare(probs, target, case_ids, mask)
        sums = voxel_sums(inputs, **self._sum_options, unchecked=unchecked)
        self._add_rows(ids, torch.cat([part.rows(sums) for part in self._parts], dim=1))

    def compute(self) -> dict[str, Tensor]:
        """Every metric value of the parts (keys in the class docstring)."""
        self._check_pending()
        _, stats = self._cases()
        out = {}
        for part, columns in zip(self._parts, self._columns):
            out.update(part.compute(self.totals[columns], stats[:, columns]))
        return out

    def reset(self) -> None:
        """Clear all accumulated sums and cases.

        Raises:
            ValueError: after clearing, if a batch since the last check held invalid values (deferred checks).
        """
        pending, self._pending_checks = self._pending_checks, []
        super().reset()
        self._n_auto_ids = 0
        self._merged_rows = 0
        self._seed_case_rows()
        self._run_checks(pending)

    def _check_pending(self) -> None:
        """Run the deferred value checks of the updates so far (one host synchronisation for all of them).

        A failed check stays pending, so every later result raises too until :meth:`reset`.
        """
        self._run_checks(self._pending_checks)
        self._pending_checks = []

    def _run_checks(self, pending: list[DeferredCheck]) -> None:
        if not pending:
            return
        rows = torch.cat([check.stats for check in pending]).tolist()
        start = 0
        for check in pending:
            n = check.stats.shape[0]
            check_image_stats(rows[start : start + n], check, self.num_classes)
            start += n

    def _auto_case_ids(self, batch: int) -> list[str]:
        suffix = ""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            suffix = f"@rank{dist.get_rank()}"
        ids = [f"image{self._n_auto_ids + i:06d}{suffix}" for i in range(batch)]
        self._n_auto_ids += batch
        return ids

    def _prepare(self, probs, target, case_ids, mask) -> tuple[MetricInputs, list[str], bool]:
        """Validated inputs, case ids and whether the value checks were deferred (then they are pending).

        Off the devices in ``_CHECK_NOW_DEVICES`` the value checks are deferred (see :meth:`_check_pending`):
        reading them back now would wait for the device on every batch.
        """
        defer = isinstance(probs, Tensor) and probs.device.type not in self._CHECK_NOW_DEVICES
        prepared = prepare_inputs(probs, target, mask, simplex=self._simplex, case_ids=case_ids, defer=defer)
        if defer:
            inputs, pending = prepared
            self._pending_checks.append(pending)
        else:
            inputs = prepared
        if inputs.num_classes != self.num_classes:
            raise ValueError(
                f"probs has {inputs.num_classes} classes (dim 1 of shape {tuple(probs.shape)}) but the metric was "
                f"built for num_classes={self.num_classes}."
            )
        ids = list(case_ids) if case_ids is not None else self._auto_case_ids(inputs.probs.shape[0])
        return inputs, ids, defer

    def _add_rows(self, case_ids: list[str], stats: Tensor) -> None:
        """Add per-image stats ``(B, S)`` to the pooled totals and to the rows of their cases."""
        self.totals += stats.sum(0)
        self.case_names.append(encode_case_ids(case_ids, stats.device))
        self.case_stats.append(stats)
        n_rows = sum(rows.shape[0] for rows in self.case_stats)
        if n_rows - self._merged_rows > max(_MIN_ROWS_BEFORE_MERGE, self._merged_rows):
            device = stats.device  # older rows may have been moved to the CPU (compute_on_cpu=True)
            names, merged = merge_rows(
                torch.cat([rows.to(device) for rows in self.case_names]),
                torch.cat([rows.to(device) for rows in self.case_stats]),
            )
            self.case_names, self.case_stats = [names], [merged]
            self._merged_rows = names.shape[0]

    def _cases(self) -> tuple[list[str], Tensor]:
        """Distinct case ids (sorted) and their summed stats ``(K, S)`` from the current (synced) state."""
        names = cat_state(self.case_names, torch.zeros(0, CASE_ID_BYTES, dtype=torch.uint8, device=self.device))
        stats = cat_state(self.case_stats, torch.zeros(0, self._n_stats, dtype=torch.float64, device=self.device))
        names, stats = merge_rows(names, stats)
        return decode_case_ids(names), stats

    def _synced(self):
        """Context in which the states are gathered over DDP ranks (as in ``compute()``)."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )

    def per_case(self) -> pd.DataFrame:
        """One row per case, sorted by the ``case_id`` column, then one column per metric and class.

        The states are gathered over DDP ranks first, so every rank returns the whole table.
        """
        self._check_pending()
        with self._synced():
            case_ids, stats = self._cases()
        columns: dict[str, Tensor] = {}
        for part, part_columns in zip(self._parts, self._columns):
            for name, values in part.case_columns(stats[:, part_columns]).items():
                columns.setdefault(name, values)  # n_voxels: the same in every part
        return pd.DataFrame({"case_id": case_ids, **{name: v.cpu().numpy() for name, v in columns.items()}})

    def _reliability(self, kind: str) -> pd.DataFrame:
        """Pooled reliability-diagram bins of the calibration part (synced over DDP)."""
        check_choice("kind", kind, ("top_label", "classwise"))
        self._check_pending()
        with self._synced():
            totals = self.totals.clone()
        part, columns = next((p, c) for p, c in zip(self._parts, self._columns) if isinstance(p, _CalibrationPart))
        return part.reliability(totals[columns], kind)


class CalibrationMetrics(_PerCaseMetric):
    """Streaming calibration metrics for hard or soft references: ECE (top-label and classwise), Brier, NLL.

    Accumulates, per case and pooled, the reliability bins (count, confidence sum, accuracy sum) for top-label
    and for every class, the sum of squared errors and the sum of cross-entropies; see
    :mod:`medjdt.metrics.calibration` for the definitions and bin edges.

    Args:
        num_classes: number of classes C (>= 2).
        n_bins: number of equal-width bins M.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` for both ECE variants.
        include_background: whether classwise ECE includes class 0 (default True: calibration of the background
            probability matters too; top-label, Brier and NLL always use every class).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        eps: floor for probabilities inside the log of the NLL.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    ``update(probs, target, case_ids=None, mask=None)``: probs ``(B, C, *spatial)`` summing to 1 over C, target
    ``(B, *spatial)`` int or ``(B, C, *spatial)`` soft, case_ids B strings, mask ``(B, *spatial)`` bool.

    ``compute()`` returns float64 scalars, named as the overlap metrics are: the mean of the per-case values
    ``"ece"`` (top-label), ``"ece_classwise"`` (mean over classes), ``"brier"``, ``"nll"``, the same under
    ``"<name>_I"``, and pooled over all voxels of the dataset ``"ece_D"``, ``"ece_classwise_D"``,
    ``"ece_classwise_D/<class>"``, ``"brier_D"``, ``"nll_D"``. ``per_case()`` has the columns
    ``case_id``, ``ece``, ``ece_classwise``, ``brier``, ``nll``, ``n_voxels`` and ``ece_classwise/<class>``;
    ``reliability()`` returns the pooled bins for a reliability diagram.

    Raises:
        ValueError: on bad arguments, or in ``update`` on bad inputs (shape, NaN, range, sums, labels, case ids).
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 10,
        norm: str = "l1",
        include_background: bool = True,
        class_names: Sequence[str] | None = None,
        eps: float = 1e-7,
        **kwargs,
    ) -> None:
        names = _check_class_names(_check_num_classes(num_classes), class_names)
        part = _CalibrationPart(num_classes, names, n_bins, norm, include_background, eps)
        self.n_bins, self.norm, self.include_background, self.eps = n_bins, norm, include_background, eps
        super().__init__(num_classes, names, [part], **kwargs)

    def reliability(self, kind: str = "top_label") -> pd.DataFrame:
        """Pooled reliability-diagram bins over every voxel seen (synced over DDP).

        Args:
            kind: ``"top_label"`` (one row per bin) or ``"classwise"`` (one row per class and bin, with a
                ``class`` column; classes as in ``include_background``).

        Returns:
            DataFrame with columns ``bin_lower``, ``bin_upper``, ``count``, ``confidence`` (mean predicted
            probability) and ``accuracy`` (mean reference probability); the means are NaN in empty bins.
        """
        return self._reliability(kind)


class OverlapMetrics(_PerCaseMetric):
    """Streaming Dice, IoU, soft Dice and QUBIQ thresholded Dice with dataset, image and class aggregation.

    Per case and class it accumulates the hard TP/FP/FN of the argmax prediction, |x|_1, |y|_1, |x - y|_1, and the
    per-threshold counts of the thresholded Dice (see :mod:`medjdt.metrics.overlap`). Aggregations (following the
    fine-grained mIoU definitions), for every metric m:

    * ``m_D`` (dataset): sums pooled over all cases per class, then the mean over classes;
    * ``m_I`` (image): per case the mean over classes, then the mean over cases; ``m`` is the same value;
    * ``m_C`` (class): per class the mean over cases, then the mean over classes; ``m/<class>`` per class;
    * ``m_worst<q>``: the mean of the lowest q % of the per-case scores of ``m_I`` (at least one case).

    NaN scores are left out of every mean: a class absent from a case's reference (``absent="exclude"``, see
    :mod:`medjdt.metrics.overlap`), or empty in prediction and reference under ``empty="nan"``. The voxels predicted
    for an absent class are counted on their own: ``absent_fp_voxels`` (mean over cases of the per-case total) and
    ``absent_fp_cases/<class>`` (cases with at least one such voxel).

    Args:
        num_classes: number of classes C (>= 2).
        include_background: whether class 0 is scored (default False: background overlap is uninformative).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        empty: "both empty" rule, ``"nan"``, ``"one"`` or ``"zero"``.
        thresholds: thresholds of the thresholded Dice, default (0.1, ..., 0.9).
        worst_percent: the q values of the worst-case aggregates.
        absent: ``"exclude"`` (default) or ``"score"``: the rule for a class absent from the reference.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(probs, target, case_ids=None, mask=None)`` as in :class:`CalibrationMetrics` (probs need not sum
    to 1). ``compute()`` returns float64 scalars under the keys above. ``per_case()`` has the columns
    ``case_id``, ``n_voxels``, per metric m the mean over classes ``m`` and ``m/<class>``, and
    ``absent_fp_voxels`` with ``absent_fp_voxels/<class>``.

    Raises:
        ValueError: on bad arguments, or in ``update`` on bad inputs.
    """

    def __init__(
        self,
        num_classes: int,
        include_background: bool = False,
        class_names: Sequence[str] | None = None,
        empty: str = "nan",
        thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
        worst_percent: Sequence[float] = (10.0,),
        absent: str = "exclude",
        **kwargs,
    ) -> None:
        names = _check_class_names(_check_num_classes(num_classes), class_names)
        part = _OverlapPart(num_classes, names, include_background, empty, thresholds, worst_percent, absent)
        self.include_background, self.empty = include_background, part.empty
        self.thresholds, self.worst_percent = part.thresholds, part.worst_percent
        super().__init__(num_classes, names, [part], **kwargs)


class SegmentationMetrics(_PerCaseMetric):
    """Overlap and calibration metrics of the same predictions, summed in one pass over the voxels per batch.

    Computes everything :class:`OverlapMetrics` and :class:`CalibrationMetrics` compute, with the same values,
    but each batch is validated once and summed for both in one :func:`~medjdt.metrics.fused.voxel_sums` call
    (about half the time of updating the two objects), and one state is synchronised under DDP.

    Args:
        num_classes: number of classes C (>= 2).
        n_bins: number of equal-width calibration bins M.
        norm: calibration error norm, ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"``.
        include_background: whether the overlap metrics score class 0 (default False).
        calibration_background: whether classwise ECE includes class 0 (default True).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        empty: overlap "both empty" rule, ``"nan"``, ``"one"`` or ``"zero"``.
        thresholds: thresholds of the thresholded Dice, default (0.1, ..., 0.9).
        worst_percent: the q values of the worst-case overlap aggregates.
        eps: floor for probabilities inside the log of the NLL.
        absent: the overlap rule for a class absent from the reference, ``"exclude"`` (default) or ``"score"``.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    ``update(probs, target, case_ids=None, mask=None)``: probs ``(B, C, *spatial)`` summing to 1 over C, target
    hard ``(B, *spatial)`` int or soft ``(B, C, *spatial)``, case_ids B strings, mask ``(B, *spatial)`` bool.

    ``compute()`` returns the keys of :meth:`OverlapMetrics.compute` and of :meth:`CalibrationMetrics.compute`
    (no key is shared). ``per_case()`` has the columns ``case_id``, ``n_voxels``, the overlap columns, then the
    calibration columns (as in the two objects). ``reliability(kind)`` as :meth:`CalibrationMetrics.reliability`.

    Raises:
        ValueError: on bad arguments, or in ``update`` on bad inputs (shape, NaN, range, sums, labels, case ids).
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 10,
        norm: str = "l1",
        include_background: bool = False,
        calibration_background: bool = True,
        class_names: Sequence[str] | None = None,
        empty: str = "nan",
        thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
        worst_percent: Sequence[float] = (10.0,),
        eps: float = 1e-7,
        absent: str = "exclude",
        **kwargs,
    ) -> None:
        names = _check_class_names(_check_num_classes(num_classes), class_names)
        overlap = _OverlapPart(num_classes, names, include_background, empty, thresholds, worst_percent, absent)
        calibration = _CalibrationPart(num_classes, names, n_bins, norm, calibration_background, eps)
        super().__init__(num_classes, names, [overlap, calibration], **kwargs)

    def reliability(self, kind: str = "top_label") -> pd.DataFrame:
        """Pooled reliability-diagram bins over every voxel seen, as :meth:`CalibrationMetrics.reliability`."""
        return self._reliability(kind)

"""What every streaming metric of :mod:`medjdt.metrics` shares: sums per case and pooled, over chunks and ranks.

:class:`~medjdt.metrics.CalibrationMetrics` (ECE, Brier, NLL), :class:`~medjdt.metrics.OverlapMetrics` (Dice, IoU,
soft and thresholded Dice) and :class:`~medjdt.metrics.SegmentationMetrics` (both, from one pass over every batch)
are a :class:`PerCaseMetric` with one or two *parts* (:class:`~._calibration_part.CalibrationPart`,
:class:`~._overlap_part.OverlapPart`). They keep two kinds of state, all float64 sums:

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

from collections.abc import Sequence

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from medjdt.metrics._calibration_part import CalibrationPart
from medjdt.metrics._cases import CASE_ID_BYTES, cat_state, decode_case_ids, encode_case_ids, merge_rows
from medjdt.metrics._checks import DeferredCheck, MetricInputs, check_image_stats, prepare_inputs
from medjdt.metrics._overlap_part import OverlapPart
from medjdt.metrics.calibration import KINDS
from medjdt.metrics.fused import voxel_sums
from medjdt.validation import check_choice, check_number

Part = CalibrationPart | OverlapPart

# Merging per-case rows costs O(rows); merging once the unmerged rows outnumber the merged ones keeps the total
# cost linear in the number of updates.
_MIN_ROWS_BEFORE_MERGE = 64


def check_num_classes(num_classes: int, where: str) -> int:
    """``num_classes`` as an int after checking that it is a whole number >= 2."""
    return check_number("num_classes", num_classes, low=2, integer=True, where=where)


def check_class_names(num_classes: int, class_names: Sequence[str] | None, where: str) -> list[str]:
    """The C names of the classes: ``class_names`` checked, or ``"0"``, ``"1"``, ... by default."""
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = list(class_names)
    if len(names) != num_classes or len(set(names)) != num_classes or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: class_names must be {num_classes} distinct strings, got {class_names!r}")
    return names


class PerCaseMetric(Metric):
    """Shared machinery: pooled ``totals`` plus per-case rows keyed by case id.

    A row is the concatenation of the rows of the metric's parts (calibration and/or overlap); every batch is
    summed for all parts in one :func:`~medjdt.metrics.fused.voxel_sums` call.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    # Devices whose inputs are value-checked inside update(); elsewhere the checks run before the results.
    _CHECK_NOW_DEVICES = ("cpu",)

    def __init__(self, num_classes: int, class_names: list[str], parts: Sequence[Part], **kwargs) -> None:
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
        """Accumulate one batch or one chunk of cases.

        Args:
            probs: ``(B, C, *spatial)`` probabilities (summing to 1 over C where a calibration part needs it).
            target: hard labels ``(B, *spatial)`` or a soft reference ``(B, C, *spatial)``.
            case_ids: B case names; default: every image is its own case.
            mask: optional ``(B, *spatial)`` bool; False voxels count nowhere.
        """
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
        check_choice("kind", kind, KINDS, where=type(self).__name__)
        self._check_pending()
        with self._synced():
            totals = self.totals.clone()
        part, columns = next((p, c) for p, c in zip(self._parts, self._columns) if isinstance(p, CalibrationPart))
        return part.reliability(totals[columns], kind)

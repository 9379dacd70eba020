"""Overlap and calibration metrics from one pass over every batch: :class:`SegmentationMetrics`."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from medjdt.metrics._calibration_part import CalibrationPart
from medjdt.metrics._overlap_part import OverlapPart
from medjdt.metrics._per_case_metric import PerCaseMetric, check_class_names, check_num_classes
from medjdt.metrics.calibration import DEFAULT_N_BINS
from medjdt.metrics.overlap import QUBIQ_LEVELS, resolve_levels

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(PerCaseMetric):
    """Overlap and calibration metrics of the same predictions, summed in one pass over the voxels per batch.

    Computes everything :class:`~medjdt.metrics.OverlapMetrics` and :class:`~medjdt.metrics.CalibrationMetrics`
    compute, with the same values, but each batch is validated once and summed for both in one
    :func:`~medjdt.metrics.fused.voxel_sums` call (about half the time of updating the two objects), and one state
    is synchronised under DDP.

    Args:
        num_classes: number of classes C (>= 2).
        n_bins: number of equal-width calibration bins M (default 15, as torchmetrics).
        norm: calibration error norm, ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"``.
        include_background: whether the overlap metrics score class 0 (default False, as
            :class:`~medjdt.metrics.OverlapMetrics`: background overlap is uninformative).
        calibration_background: whether classwise ECE includes class 0 (default True, as
            :class:`~medjdt.metrics.CalibrationMetrics`: calibration judges the whole distribution).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        empty: overlap "both empty" rule, ``"nan"``, ``"one"`` or ``"zero"``.
        levels: levels of the thresholded Dice, default :data:`~medjdt.metrics.QUBIQ_LEVELS` (0.1, ..., 0.9).
        worst_percent: the q values of the worst-case overlap aggregates, each in (0, 100].
        eps: floor for probabilities inside the log of the NLL, in (0, 1).
        absent: the overlap rule for a class absent from the reference, ``"exclude"`` (default) or ``"score"``.
        thresholds: deprecated name of ``levels`` (a ``FutureWarning``; giving both is an error).
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    ``update(probs, target, case_ids=None, mask=None)``: probs ``(B, C, *spatial)`` summing to 1 over C, target
    hard ``(B, *spatial)`` int or soft ``(B, C, *spatial)``, case_ids B strings, mask ``(B, *spatial)`` bool.

    ``compute()`` returns the keys of ``OverlapMetrics.compute`` and of ``CalibrationMetrics.compute`` (no key is
    shared). ``per_case()`` has the columns ``case_id``, ``n_voxels``, the overlap columns, then the calibration
    columns (as in the two objects). ``reliability(kind)`` as ``CalibrationMetrics.reliability``.

    Raises:
        ValueError: on bad arguments, or in ``update`` on bad inputs (shape, NaN, range, sums, labels, case ids).
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = DEFAULT_N_BINS,
        norm: str = "l1",
        include_background: bool = False,
        calibration_background: bool = True,
        class_names: Sequence[str] | None = None,
        empty: str = "nan",
        levels: Sequence[float] = QUBIQ_LEVELS,
        worst_percent: Sequence[float] = (10.0,),
        eps: float = 1e-7,
        absent: str = "exclude",
        thresholds: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        where = "SegmentationMetrics"
        levels = resolve_levels(where, levels, thresholds)
        num_classes = check_num_classes(num_classes, where)
        names = check_class_names(num_classes, class_names, where)
        overlap = OverlapPart(num_classes, names, include_background, empty, levels, worst_percent, absent, where)
        calibration = CalibrationPart(num_classes, names, n_bins, norm, calibration_background, eps, where)
        super().__init__(num_classes, names, [overlap, calibration], **kwargs)

    def reliability(self, kind: str = "top_label") -> pd.DataFrame:
        """Pooled reliability-diagram bins over every voxel seen, as ``CalibrationMetrics.reliability``."""
        return self._reliability(kind)

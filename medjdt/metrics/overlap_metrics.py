"""Streaming Dice, IoU, soft and thresholded Dice over chunks, cases and DDP ranks: :class:`OverlapMetrics`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from medjdt.metrics._overlap_part import OverlapPart
from medjdt.metrics._per_case_metric import PerCaseMetric, check_class_names, check_num_classes
from medjdt.metrics.overlap import QUBIQ_LEVELS, resolve_levels

__all__ = ["OverlapMetrics"]


class OverlapMetrics(PerCaseMetric):
    """Streaming Dice, IoU, soft Dice and QUBIQ thresholded Dice with dataset, image and class aggregation.

    Per case and class it accumulates the hard TP/FP/FN of the argmax prediction, |x|_1, |y|_1, |x - y|_1, and the
    per-level counts of the thresholded Dice (see :mod:`medjdt.metrics.overlap`). Aggregations (following the
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
        include_background: whether class 0 is scored (default False, as the functional overlap metrics:
            background overlap is large and uninformative).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        empty: "both empty" rule, ``"nan"``, ``"one"`` or ``"zero"``.
        levels: levels of the thresholded Dice, default :data:`~medjdt.metrics.QUBIQ_LEVELS` (0.1, ..., 0.9).
        worst_percent: the q values of the worst-case aggregates, each in (0, 100].
        absent: ``"exclude"`` (default) or ``"score"``: the rule for a class absent from the reference.
        thresholds: deprecated name of ``levels`` (a ``FutureWarning``; giving both is an error).
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(probs, target, case_ids=None, mask=None)`` as in :class:`~medjdt.metrics.CalibrationMetrics` (probs
    need not sum to 1). ``compute()`` returns float64 scalars under the keys above. ``per_case()`` has the columns
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
        levels: Sequence[float] = QUBIQ_LEVELS,
        worst_percent: Sequence[float] = (10.0,),
        absent: str = "exclude",
        thresholds: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        where = "OverlapMetrics"
        levels = resolve_levels(where, levels, thresholds)
        num_classes = check_num_classes(num_classes, where)
        names = check_class_names(num_classes, class_names, where)
        part = OverlapPart(num_classes, names, include_background, empty, levels, worst_percent, absent, where)
        self.include_background, self.empty = include_background, part.empty
        self.levels, self.worst_percent = part.levels, part.worst_percent
        super().__init__(num_classes, names, [part], **kwargs)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Deprecated name of :attr:`levels`."""
        warnings.warn("OverlapMetrics: attribute 'thresholds' is deprecated; use 'levels'", FutureWarning, stacklevel=2)
        return self.levels

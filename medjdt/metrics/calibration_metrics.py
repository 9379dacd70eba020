"""Streaming calibration metrics (ECE, Brier, NLL) over chunks, cases and DDP ranks: :class:`CalibrationMetrics`."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from medjdt.metrics._calibration_part import CalibrationPart
from medjdt.metrics._per_case_metric import PerCaseMetric, check_class_names, check_num_classes
from medjdt.metrics.calibration import DEFAULT_N_BINS

__all__ = ["CalibrationMetrics"]


class CalibrationMetrics(PerCaseMetric):
    """Streaming calibration metrics for hard or soft references: ECE (top-label and classwise), Brier, NLL.

    Accumulates, per case and pooled, the reliability bins (count, confidence sum, accuracy sum) for top-label
    and for every class, the sum of squared errors and the sum of cross-entropies; see
    :mod:`medjdt.metrics.calibration` for the definitions and bin edges, and
    :mod:`medjdt.metrics._per_case_metric` for how cases, chunks and ranks are summed.

    Args:
        num_classes: number of classes C (>= 2).
        n_bins: number of equal-width bins M (default 15, as torchmetrics).
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` for both ECE variants.
        include_background: whether classwise ECE includes class 0 (default True, as
            :func:`~medjdt.metrics.expected_calibration_error`: calibration judges the whole distribution, the
            background probability included; top-label, Brier and NLL always use every class).
        class_names: C names used in output keys; default ``"0"``, ``"1"``, ...
        eps: floor for probabilities inside the log of the NLL, in (0, 1).
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
        n_bins: int = DEFAULT_N_BINS,
        norm: str = "l1",
        include_background: bool = True,
        class_names: Sequence[str] | None = None,
        eps: float = 1e-7,
        **kwargs,
    ) -> None:
        where = "CalibrationMetrics"
        num_classes = check_num_classes(num_classes, where)
        names = check_class_names(num_classes, class_names, where)
        part = CalibrationPart(num_classes, names, n_bins, norm, include_background, eps, where)
        self.n_bins, self.norm, self.include_background, self.eps = part.n_bins, part.norm, include_background, part.eps
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

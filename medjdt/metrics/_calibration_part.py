"""The calibration part of a streaming metric: one float64 row of sums per image, and the metrics of summed rows.

Used by :class:`~medjdt.metrics.CalibrationMetrics` and :class:`~medjdt.metrics.SegmentationMetrics`; rows of the
same case or of the whole dataset are summed before any metric is computed, so per-case and pooled values come
from the same sums (see :mod:`medjdt.metrics._per_case_metric`).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from medjdt.metrics._sums import VoxelSums
from medjdt.metrics.calibration import NORMS, calibration_error_from_sums, reliability_from_sums
from medjdt.validation import check_choice, check_number


class CalibrationPart:
    """Calibration statistics of one image as a float64 row, and the metrics computed from summed rows.

    Row layout: top-label bins (3, M) | classwise bins (3, C, M) | squared error sum | NLL sum.

    Args:
        num_classes, class_names: C and the C names used in output keys.
        n_bins: number of equal-width bins M (>= 1).
        norm: ``"l1"``, ``"l2"`` or ``"max"`` (see :func:`~medjdt.metrics.calibration.calibration_error_from_sums`).
        include_background: whether the classwise ECE includes class 0.
        eps: floor of the probabilities inside the log of the NLL, in (0, 1).
        where: the metric's name, for error messages.

    Raises:
        ValueError: a bad ``n_bins``, ``norm`` or ``eps``.
    """

    simplex = True  # top-label calibration, Brier and NLL need probabilities summing to 1

    def __init__(
        self,
        num_classes: int,
        class_names: list[str],
        n_bins: int,
        norm: str,
        include_background: bool,
        eps: float,
        where: str,
    ) -> None:
        self.num_classes, self.class_names = num_classes, class_names
        self.n_bins = check_number("n_bins", n_bins, low=1, integer=True, where=where)
        self.norm = check_choice("norm", norm, NORMS, where=where)
        self.eps = check_number("eps", eps, low=0, high=1, low_inclusive=False, high_inclusive=False, where=where)
        self.include_background = include_background
        self.size = 3 * self.n_bins * (1 + num_classes) + 2
        self.sum_options = {"n_bins": self.n_bins, "eps": self.eps}

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
        """Pooled values from ``totals`` ``(S,)`` and per-case means from ``cases`` ``(K, S)``; NaN values are left
        out of every mean (NaN where nothing is left)."""
        pooled = self._values(totals)
        per_case = self._values(cases)
        out = {
            "ece_D": pooled["ece"],
            "ece_classwise_D": pooled["ece_classwise"].nanmean(),
            "brier_D": pooled["brier"],
            "nll_D": pooled["nll"],
            "ece_I": per_case["ece"].nanmean(),
            "ece_classwise_I": per_case["ece_classwise"].nanmean(-1).nanmean(),
            "brier_I": per_case["brier"].nanmean(),
            "nll_I": per_case["nll"].nanmean(),
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
            "ece_classwise": values["ece_classwise"].nanmean(-1),
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

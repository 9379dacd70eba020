"""The per-image sums of one batch that every metric is computed from, whichever backend summed them.

Both backends of :func:`medjdt.metrics.fused.voxel_sums` (the chunked torch pass and the Triton kernel of
:mod:`medjdt.metrics.fused_triton`) return a :class:`VoxelSums`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from medjdt.metrics.overlap import OverlapSums


@dataclass(frozen=True)
class VoxelSums:
    """Per-image sums of one batch, float64; a field is None when it was not requested.

    Attributes:
        top_label: ``(3, B, M)`` top-label bins: count, confidence sum, accuracy sum.
        classwise: ``(3, B, C, M)`` classwise bins: count, probability sum, reference sum.
        squared_error: ``(B,)`` sum over voxels of sum_c (p_c - y_c)^2.
        nll: ``(B,)`` sum over voxels of -sum_c y_c log(max(p_c, eps)).
        overlap: the :class:`~medjdt.metrics.overlap.OverlapSums`.
    """

    top_label: Tensor | None
    classwise: Tensor | None
    squared_error: Tensor | None
    nll: Tensor | None
    overlap: OverlapSums | None

    @classmethod
    def nothing(cls) -> VoxelSums:
        """The sums when neither calibration nor overlap was requested."""
        return cls(top_label=None, classwise=None, squared_error=None, nll=None, overlap=None)

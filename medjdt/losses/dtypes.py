"""The one dtype rule of the losses and metrics: sums run in float32, or in float64 for float64 inputs.

Half-precision inputs (fp16, bf16, e.g. under autocast) are promoted so that sums over millions of voxels stay
accurate; float64 inputs keep their precision (gradcheck and reference computations need it).
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype computations on a tensor of ``dtype`` run in: float64 for float64, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32

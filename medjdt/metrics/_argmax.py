"""Maximum over the class dimension of a ``(B, C, N)`` tensor, with the index of its first occurrence.

``torch.max(x, dim=1)`` reduces over a strided axis and is slow on CPU for the few classes of a segmentation
(several times a pass over the data); a chain of elementwise maxima over the C class planes is much faster and
gives the same values and the same first-occurrence indices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """Max over dim 1 and the first index attaining it.

    Args:
        x: ``(B, C, N)`` tensor without NaN.

    Returns:
        values ``(B, N)`` (dtype of ``x``) and indices ``(B, N)`` int64, equal to ``torch.max(x, dim=1)``.
    """
    values = x[:, 0].clone()
    for c in range(1, x.shape[1]):
        torch.maximum(values, x[:, c], out=values)
    # First index of the max = number of leading classes that all fall short of it.
    short = x[:, 0] != values
    indices = short.long()
    for c in range(1, x.shape[1] - 1):
        short &= x[:, c] != values
        indices += short
    return values, indices

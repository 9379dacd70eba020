"""Work tensors of a chunked pass over the voxels, allocated once and reused by every chunk.

A fresh voxel-sized tensor costs page faults that take longer than the arithmetic done in it; tensors reused from
chunk to chunk stay in the CPU cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkWork:
    """Named work tensors for chunks of ``n`` voxels of a ``(B, C, N)`` batch, allocated on first use."""

    def __init__(self, probs: Tensor, n: int) -> None:
        self._probs, self.n = probs, n
        self._store: dict[str, Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
        """Tensor ``name`` of ``shape`` (default ``(B, C, n)``) on the batch's device, contiguous, uninitialised
        on first use and holding whatever was last written to it afterwards."""
        tensor = self._store.get(name)
        if tensor is None:
            batch, channels, _ = self._probs.shape
            size = (batch, channels, self.n) if shape is None else shape
            tensor = self._store[name] = self._probs.new_empty(size, dtype=dtype)
        return tensor

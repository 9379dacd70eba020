"""Chunks of the voxel axis and the reusable buffers that the fused JDT passes compute in.

The fused forward and backward (:mod:`medjdt.losses.fused_soft`, :mod:`medjdt.losses.fused_hard`) walk over
``(B, C, N)`` logits in chunks of voxels. Every chunk's temporaries are written into the same few allocations
(``out=`` and in-place operations): a fresh allocation per chunk would cost page faults that take longer than
the arithmetic. On a CPU a chunk is small enough for its buffers to stay in the cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["Chunks", "chunk_mask", "chunk_target", "expand"]

# Values per chunk and CPU thread: buffers of 512 KiB (float32) per thread stay in the L2/L3 cache and amortise
# the per-operation overhead of Python and OpenMP (each operation splits its chunk among the threads). On
# accelerators the chunk only bounds the temporaries: 1/16 of the logits per
# buffer (at least 2**20 values, to keep the number of kernel launches low).
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_MAX_CPU_CHUNK_ELEMENTS = 1 << 20  # with many threads: buffers of at most 4 MiB, small next to large logits
_CHUNK_FRACTION_OTHER = 16
_MIN_CHUNK_ELEMENTS_OTHER = 1 << 20
# Below this many voxels per chunk the per-operation overhead of Python dominates.
_MIN_CHUNK_VOXELS = 2048


class Chunks:
    """Chunks of the voxel axis of ``(B, C, N)`` logits and reusable buffers for their temporaries.

    Iterating gives the chunks as slices of the voxel axis. :meth:`buffer` and :meth:`plane` hand out numbered
    buffers shaped for a chunk; buffers are allocated on first use, so a pass only pays for the ones it needs.
    """

    def __init__(self, logits: torch.Tensor, dtype: torch.dtype) -> None:
        batch, channels, n_voxels = logits.shape
        budget = _CHUNK_ELEMENTS.get(logits.device.type)
        if budget is not None and logits.device.type == "cpu":
            budget = min(budget * torch.get_num_threads(), _MAX_CPU_CHUNK_ELEMENTS)
        if budget is None:  # accelerators: a fixed fraction of the logits, so the buffers stay small next to them
            budget = max(_MIN_CHUNK_ELEMENTS_OTHER, logits.numel() // _CHUNK_FRACTION_OTHER)
        self.step = min(n_voxels, max(_MIN_CHUNK_VOXELS, budget // max(1, batch * channels)))
        self.n_voxels, self.batch, self.channels = n_voxels, batch, channels
        self._like, self._dtype = logits, dtype
        self._buffers: dict = {}  # i -> flat storage, (i, n) -> its (B, C, n) view
        self._planes: dict = {}
        self._labels = None

    def __iter__(self) -> Iterator[slice]:
        for start in range(0, self.n_voxels, self.step):
            yield slice(start, min(start + self.step, self.n_voxels))

    def buffer(self, i: int, chunk: slice) -> torch.Tensor:
        """Buffer ``i`` as a contiguous ``(B, C, n)`` tensor for ``chunk`` (n voxels)."""
        return self._view(self._buffers, i, self.channels, chunk.stop - chunk.start)

    def plane(self, i: int, chunk: slice) -> torch.Tensor:
        """Plane ``i`` as a contiguous ``(B, 1, n)`` tensor for ``chunk``."""
        return self._view(self._planes, i, 1, chunk.stop - chunk.start)

    def _view(self, store: dict, i: int, rows: int, n: int) -> torch.Tensor:
        # views are cached per length (all chunks but the last have the same): making them costs Python time
        key = (i, n)
        if key not in store:
            if i not in store:
                store[i] = self._like.new_empty(self.batch * rows * self.step, dtype=self._dtype)
            store[key] = store[i][: self.batch * rows * n].view(self.batch, rows, n)
        return store[key]

    def one_hot(self, out: torch.Tensor, labels: torch.Tensor, chunk: slice) -> torch.Tensor:
        """Write the one-hot encoding of ``labels[:, chunk]`` (``(B, N)`` int64) into ``out`` ``(B, C, n)``."""
        if self._labels is None:
            self._labels = labels.new_empty(self.batch * self.step, dtype=torch.int32)
            self._classes = torch.arange(self.channels, dtype=torch.int32, device=labels.device).view(1, -1, 1)
        n = chunk.stop - chunk.start
        # int32 compares twice as fast as int64; labels lie in [0, C)
        narrow = self._labels[: self.batch * n].view(self.batch, 1, n).copy_(labels[:, None, chunk])
        return torch.eq(narrow, self._classes, out=out)


def chunk_mask(mask: torch.Tensor | None, chunks: Chunks, chunk: slice, plane: int) -> torch.Tensor | None:
    """``(B, 1, n)`` {0, 1} multiplier of one chunk (written into a plane buffer), or None without a mask."""
    return None if mask is None else chunks.plane(plane, chunk).copy_(mask[:, None, chunk])


def chunk_target(target: torch.Tensor, chunks: Chunks, chunk: slice, buffer: int) -> torch.Tensor:
    """The soft target ``(B, C, n)`` of one chunk in the compute dtype (copied into a buffer only if it differs)."""
    y = target[:, :, chunk]
    out = chunks.buffer(buffer, chunk)
    return y if y.dtype == out.dtype else out.copy_(y)


def expand(stat: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1) for broadcasting against a chunk."""
    return stat.unsqueeze(-1)

"""Single-pass grouped histograms: counts and sums of values per (group, key).

Every binned statistic in :mod:`medjdt.metrics` (calibration bins, confusion matrices, QUBIQ threshold
histograms) is one call to :func:`grouped_sums`: the keys are computed elementwise, then each value is
scattered once with ``index_add_``; there is no Python loop over bins or voxels.

Accuracy: a float32 running sum over millions of voxels loses digits (and stalls beyond 2**24), so each
group is split into blocks of a few hundred voxels that are summed separately in the input dtype and then
combined in float64. Counts are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Values are summed in the input dtype over blocks of this many voxels (relative rounding error of a float32
# block sum below ~1e-5 even for adversarial inputs), then in float64.
_SUM_BLOCK = 256
# Counts stay exact in float32 up to 2**24 per block.
_COUNT_BLOCK = 2**24
# Upper bound on the number of (group, block, key) slots; larger inputs get larger blocks.
_MAX_SLOTS = 2**22


def grouped_sums(keys: Tensor, n_keys: int, values: Sequence[Tensor] = (), valid: Tensor | None = None) -> Tensor:
    """Count elements and sum values per (group, key).

    Args:
        keys: ``(*groups, N)`` int32 or int64 tensor with keys in ``[0, n_keys)``; every leading index is a
            separate group, N runs over voxels. It is overwritten (used as scratch space).
        n_keys: number of distinct keys K.
        values: tensors broadcastable to ``keys`` (float32 or float64) to sum per (group, key).
        valid: optional bool tensor broadcastable to ``keys``; False elements are left out.

    Returns:
        float64 tensor ``(1 + len(values), *groups, K)``: element counts first, then one sum per value tensor.
    """
    group_shape = keys.shape[:-1]
    n = keys.shape[-1]
    flat_keys = keys.view(-1, n) if keys.is_contiguous() else keys.reshape(-1, n).contiguous()
    n_groups = flat_keys.shape[0]
    device = keys.device

    block = _SUM_BLOCK if values else _COUNT_BLOCK
    block = min(max(block, -(-n_groups * n * n_keys // _MAX_SLOTS)), _COUNT_BLOCK)
    n_blocks = -(-n // block)
    n_slots = n_groups * n_blocks * n_keys
    index_dtype = torch.int64 if keys.dtype == torch.int64 or n_slots >= 2**31 - 1 else torch.int32

    # slot = (group * n_blocks + block) * K + key, written block-wise so the offsets broadcast from a small
    # (G, n_blocks, 1) tensor instead of being materialised per voxel.
    offsets = (
        torch.arange(n_groups, device=device, dtype=index_dtype)[:, None] * n_blocks
        + torch.arange(n_blocks, device=device, dtype=index_dtype)
    ) * n_keys
    # The keys are updated in place when their dtype allows it: a fresh voxel-sized buffer costs page faults.
    slots = flat_keys if flat_keys.dtype == index_dtype else flat_keys.to(index_dtype)
    n_full = n // block * block
    full_blocks = n_full // block
    slots[:, :n_full].view(n_groups, full_blocks, block).add_(offsets[:, :full_blocks, None])
    if n_full < n:
        slots[:, n_full:].add_(offsets[:, -1:])
    if valid is not None:
        trash = n_slots  # one extra slot collects the excluded elements
        slots = torch.where(valid.expand(keys.shape).reshape(-1, n), slots, trash)
    index = slots.flatten()

    ones = torch.ones((), device=device).expand(index.shape)  # stride 0: no memory
    results = []
    for value in (ones, *values):
        value = value.expand(keys.shape).reshape(-1) if value is not ones else value
        partial = torch.zeros(n_slots + 1, dtype=value.dtype, device=device).index_add_(0, index, value)
        results.append(partial[:-1].view(n_groups, n_blocks, n_keys).sum(1, dtype=torch.float64))
    return torch.stack(results).view(1 + len(values), *group_shape, n_keys)

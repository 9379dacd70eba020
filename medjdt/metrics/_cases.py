"""Per-case rows that survive DDP gathering: case ids encoded as fixed-width byte rows, stats summed by case.

Case ids are strings, but torchmetrics can only gather tensors, so each id is stored as its UTF-8 bytes padded
with zeros to :data:`CASE_ID_BYTES`. Rows of the same case (chunks of one volume, possibly on different ranks)
are merged by summing their statistics; the byte rows themselves are the grouping key, so there is no hashing
and no possibility of collision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CASE_ID_BYTES = 256


def encode_case_ids(case_ids: Sequence[str], device: torch.device) -> Tensor:
    """Encode case ids as a ``(len(case_ids), CASE_ID_BYTES)`` uint8 tensor of zero-padded UTF-8 bytes."""
    rows = torch.zeros(len(case_ids), CASE_ID_BYTES, dtype=torch.uint8)
    for i, case_id in enumerate(case_ids):
        data = case_id.encode("utf-8")
        if len(data) > CASE_ID_BYTES:
            raise ValueError(f"case id {case_id!r} is {len(data)} bytes in UTF-8; at most {CASE_ID_BYTES} allowed.")
        if 0 in data:
            raise ValueError(f"case id {case_id!r} contains a NUL character.")
        rows[i, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if device.type == "cuda":
        # from pinned memory the copy is queued without waiting for the device (no host synchronisation)
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def decode_case_ids(rows: Tensor) -> list[str]:
    """Inverse of :func:`encode_case_ids`."""
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in rows.cpu().tolist()]


def merge_rows(names: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the stats rows of each distinct case.

    Args:
        names: ``(R, CASE_ID_BYTES)`` uint8 encoded case ids.
        stats: ``(R, S)`` float64 statistics, one row per (case, chunk).

    Returns:
        ``(K, CASE_ID_BYTES)`` distinct names sorted by their UTF-8 bytes and ``(K, S)`` summed stats.
    """
    if names.shape[0] == 0:
        return names, stats
    unique, inverse = torch.unique(names, dim=0, return_inverse=True)
    summed = torch.zeros(unique.shape[0], stats.shape[1], dtype=stats.dtype, device=stats.device)
    return unique, summed.index_add_(0, inverse, stats)


def cat_state(state: Tensor | list[Tensor], empty: Tensor) -> Tensor:
    """A list state (local, unsynced) or its gathered tensor (synced) as one tensor."""
    if isinstance(state, Tensor):
        return state
    return torch.cat([rows.to(empty.device) for rows in state]) if state else empty

"""Cross-rank sums for the dataset aggregation under ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_max", "all_reduce_sum", "distributed_world_size"]


def distributed_world_size() -> int:
    """Number of ranks of the default process group, or 1 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward also sums the incoming gradients over ranks.

    Written here rather than taken from ``torch.distributed.nn`` (deprecated) or the functional collectives
    (autograd only in recent torch releases) so that it behaves the same on every supported torch version.
    """

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum of ``tensor`` (any shape, same on every rank) over all ranks.

    Every rank gets the same total S = sum_r t_r. In backward, the gradients arriving at S on all ranks are
    summed too, so rank r receives ``sum_r' dL_r'/dS`` for its own ``t_r``. When every rank computes the same
    loss L(S) that is ``world_size * dL/dS``; DDP then averages parameter gradients over ranks, which gives
    exactly the gradient of L computed by one process on the whole batch. Without an initialised process
    group (or with one rank) the input is returned unchanged.
    """
    if distributed_world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, without gradient (used to agree on active classes)."""
    if distributed_world_size() == 1:
        return tensor
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out

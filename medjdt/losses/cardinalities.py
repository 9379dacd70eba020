"""Per-image, per-class cardinalities TP, FP, FN of probabilities against soft or hard targets.

For one class with prediction x and target y (unmasked voxels only), with ``|v|_p^p = sum |v_i|^p``:

- variant 1: ``TP = (|x|_p^p + |y|_p^p - |x - y|_p^p) / 2``, ``FP = |x|_p^p - TP``, ``FN = |y|_p^p - TP``;
- variant 2 (p = 1): ``TP = sum x*y``, ``FP = sum max(x - y, 0)``, ``FN = sum max(y - x, 0)``.

Both agree on hard targets. The sums run in float32 for fp16/bf16/fp32 inputs (float64 stays float64).

Two custom autograd functions keep backward lean: they save only tensors that are alive anyway (the
probabilities, the target, the mask) and recompute the voxel-wise terms in backward. The hard-label path
never builds a one-hot tensor: per-class sums come from ``gather`` / ``scatter_add`` on the label map.
"""

from __future__ import annotations

import torch

from medjdt.losses._inputs import check_ignore_index, check_p_variant, check_unit_interval, prepare_target
from medjdt.losses.dtypes import compute_dtype

__all__ = ["hard_cardinalities", "soft_cardinalities", "target_max"]


def _expand(stat: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ..., 1) with ``ndim`` dims, for broadcasting against voxels."""
    return stat.view(*stat.shape, *([1] * (ndim - 2)))


def _power(values: torch.Tensor, p: float) -> torch.Tensor:
    return values if p == 1 else values.pow(p)


class _SoftSums(torch.autograd.Function):
    """Sums over voxels of x^p, y^p, |x - y|^p (and x*y when ``with_product``) -> (K, B, C) in x's dtype.

    ``x``, ``y``: (B, C, *spatial); ``keep``: (B, 1, *spatial) float {0, 1} or None.
    """

    @staticmethod
    def forward(ctx, x, y, keep, p, with_product):
        dims = tuple(range(2, x.ndim))
        xk, yk = (x, y) if keep is None else (x * keep, y * keep)
        sums = [_power(xk, p).sum(dims), _power(yk, p).sum(dims), _power((xk - yk).abs_(), p).sum(dims)]
        if with_product:
            sums.append((xk * yk).sum(dims))
        ctx.save_for_backward(x, y, keep)
        ctx.p, ctx.with_product = p, with_product
        return torch.stack(sums)

    @staticmethod
    def backward(ctx, grad):
        x, y, keep = ctx.saved_tensors
        p, ndim = ctx.p, x.ndim
        g_x, g_y, g_d = (_expand(g, ndim) for g in grad[:3])
        diff = x - y
        # d|d|^p / dd = p |d|^(p-1) sign(d); sign(0) = 0 picks the zero subgradient of |.| at a tie
        slope = diff.sign_() if p == 1 else diff.abs().pow_(p - 1).mul_(diff.sign()).mul_(p)
        grad_x = grad_y = None
        if ctx.needs_input_grad[1]:
            grad_y = slope * -g_d
            grad_y += g_y if p == 1 else p * y.pow(p - 1) * g_y
            if ctx.with_product:
                grad_y += x * _expand(grad[3], ndim)
            if keep is not None:
                grad_y *= keep
        if ctx.needs_input_grad[0]:
            grad_x = slope.mul_(g_d)
            grad_x += g_x if p == 1 else p * x.pow(p - 1) * g_x
            if ctx.with_product:
                grad_x += y * _expand(grad[3], ndim)
            if keep is not None:
                grad_x *= keep
        return grad_x, grad_y, None, None, None


class _HardSums(torch.autograd.Function):
    """Sums over voxels of x^p, of the TP term on each voxel's own class, and of the voxel count -> (3, B, C).

    ``x``: (B, C, *spatial) float32/64; ``labels``: (B, *spatial) int64 in [0, C); ``keep``: (B, *spatial)
    float {0, 1} or None. With g = x[label] on each voxel the TP term is ``(g^p + 1 - (1 - g)^p) / 2``
    (``g`` for p = 1), the variant-1 TP of a one-hot y.
    """

    @staticmethod
    def forward(ctx, x, labels, keep, p):
        batch, channels = x.shape[:2]
        dims = tuple(range(2, x.ndim))
        flat_labels = labels.reshape(batch, -1)
        own = x.reshape(batch, channels, -1).gather(1, flat_labels.unsqueeze(1)).reshape(-1)
        tp_term = own if p == 1 else (own.pow(p) + 1 - (1 - own).pow(p)) / 2
        xp = _power(x, p)
        if keep is None:
            sum_x = xp.sum(dims)
            count_src = torch.ones((), dtype=x.dtype, device=x.device).expand_as(own)
        else:
            sum_x = (xp * keep.unsqueeze(1)).sum(dims)
            count_src = keep.reshape(-1)
            tp_term = tp_term * count_src
        # one bin per (image, class); a 1-D scatter is much faster than a 2-D one along the class dim
        bins = _image_class_bins(flat_labels, channels).reshape(-1)
        tp = x.new_zeros(batch * channels).scatter_add_(0, bins, tp_term).view(batch, channels)
        count = x.new_zeros(batch * channels).scatter_add_(0, bins, count_src).view(batch, channels)
        ctx.save_for_backward(x, labels, keep)
        ctx.p = p
        return torch.stack([sum_x, tp, count])

    @staticmethod
    def backward(ctx, grad):
        x, labels, keep = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        p = ctx.p
        batch, channels = x.shape[:2]
        g_x = _expand(grad[0], x.ndim)
        grad_x = g_x.expand_as(x).contiguous() if p == 1 else (p * x.pow(p - 1) * g_x).contiguous()
        flat_labels = labels.reshape(batch, -1)
        own_grad = grad[1].reshape(-1)[_image_class_bins(flat_labels, channels)]  # dL/dTP of each voxel's class
        if p != 1:
            own = x.reshape(batch, channels, -1).gather(1, flat_labels.unsqueeze(1)).squeeze(1)
            own_grad = own_grad * (p * (own.pow(p - 1) + (1 - own).pow(p - 1)) / 2)
        if keep is not None:
            grad_x *= keep.unsqueeze(1)
            own_grad = own_grad * keep.reshape(batch, -1)
        grad_x.view(batch, channels, -1).scatter_add_(1, flat_labels.unsqueeze(1), own_grad.unsqueeze(1))
        return grad_x, None, None, None


def _image_class_bins(flat_labels: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N) labels -> (B, N) index of the (image, class) pair, ``b * C + label``."""
    offsets = torch.arange(0, flat_labels.shape[0] * channels, channels, device=flat_labels.device)
    return flat_labels + offsets.unsqueeze(1)


def _soft_cardinalities(
    probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, p: float, variant: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unchecked core of :func:`soft_cardinalities`; ``probs`` is already in its
    :func:`~medjdt.losses.dtypes.compute_dtype`."""
    keep = None if mask is None else mask.unsqueeze(1).to(probs.dtype)
    sums = _SoftSums.apply(probs, target.to(probs.dtype), keep, float(p), variant == 2)
    sum_x, sum_y, sum_diff = sums[0], sums[1], sums[2]
    if variant == 2:
        tp = sums[3]
        fp = (sum_x - sum_y + sum_diff) / 2
        fn = (sum_y - sum_x + sum_diff) / 2
        return tp, fp, fn
    tp = (sum_x + sum_y - sum_diff) / 2
    return tp, sum_x - tp, sum_y - tp


def _hard_cardinalities(
    probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unchecked core of :func:`hard_cardinalities`; also returns the per-(image, class) voxel count."""
    keep = None if mask is None else mask.to(probs.dtype)
    sum_x, tp, count = _HardSums.apply(probs, labels, keep, float(p))
    return tp, sum_x - tp, count - tp, count


def soft_cardinalities(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    p: float = 1,
    variant: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class TP, FP, FN of probabilities against a soft target.

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1], 2 or 3 spatial dims.
        target: ``(B, C, *spatial)`` soft labels in [0, 1] (channels need not sum to 1).
        mask: optional ``(B, *spatial)`` bool, True for voxels that count; excluded voxels add nothing.
        p: exponent of the Lp cardinalities ``|v|_p^p``, a finite number >= 1.
        variant: 1 (difference form, any p) or 2 (product form, p = 1 only); see the module docstring.

    Returns:
        ``(tp, fp, fn)``, each ``(B, C)`` in the :func:`~medjdt.losses.dtypes.compute_dtype` of ``probs``,
        differentiable with respect to ``probs`` and ``target``.

    Raises:
        ValueError: bad shapes or dtypes, values outside [0, 1], or a bad ``p`` / ``variant``.
    """
    p, variant = check_p_variant(p, variant, where="soft_cardinalities")
    prepared = _prepare_checked(probs, target, mask, ignore_index=None)
    if prepared.soft is None:
        raise ValueError(
            f"soft_cardinalities needs a soft target of shape {tuple(probs.shape)}, got {tuple(target.shape)}"
        )
    return _soft_cardinalities(probs.to(compute_dtype(probs.dtype)), prepared.soft, prepared.mask, p, variant)


def hard_cardinalities(
    probs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    p: float = 1,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class TP, FP, FN of probabilities against hard labels, without a one-hot tensor.

    Equal to :func:`soft_cardinalities` on the one-hot encoding of ``labels`` (for either variant).

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1], C >= 2, 2 or 3 spatial dims.
        labels: ``(B, *spatial)`` integer class indices in ``[0, C)``.
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.
        p: exponent of the Lp cardinalities, a finite number >= 1.
        ignore_index: label value whose voxels are excluded (may lie outside ``[0, C)``).

    Returns:
        ``(tp, fp, fn)``, each ``(B, C)`` in the :func:`~medjdt.losses.dtypes.compute_dtype` of ``probs``,
        differentiable with respect to ``probs``.

    Raises:
        ValueError: bad shapes or dtypes, probabilities outside [0, 1], class indices outside ``[0, C)``, a bad ``p``
            or ``ignore_index``.
    """
    p, _ = check_p_variant(p, 1, where="hard_cardinalities")
    ignore_index = check_ignore_index(ignore_index, where="hard_cardinalities")
    prepared = _prepare_checked(probs, labels, mask, ignore_index)
    if prepared.labels is None:
        raise ValueError(
            f"hard_cardinalities needs (B, *spatial) labels and C >= 2 channels, got labels of shape "
            f"{tuple(labels.shape)} for probabilities of shape {tuple(probs.shape)}"
        )
    tp, fp, fn, _ = _hard_cardinalities(probs.to(compute_dtype(probs.dtype)), prepared.labels, prepared.mask, p)
    return tp, fp, fn


def _prepare_checked(probs, target, mask, ignore_index):
    if not isinstance(probs, torch.Tensor) or probs.ndim not in (4, 5) or not probs.is_floating_point():
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a floating (B, C, *spatial) tensor with 2 or 3 spatial dims, got {got}")
    check_unit_interval(probs, "probabilities")
    return prepare_target(probs, target, mask, ignore_index)


def target_max(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Largest soft target value per image and class over unmasked voxels.

    Args:
        target: ``(B, C, *spatial)`` soft labels in [0, 1].
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.

    Returns:
        ``(B, C)`` in the target's :func:`~medjdt.losses.dtypes.compute_dtype` (0 where every voxel is masked), no
        gradient.
    """
    target = target.detach()
    if mask is not None:
        target = target * mask.unsqueeze(1)
    return target.flatten(2).amax(2).to(compute_dtype(target.dtype))

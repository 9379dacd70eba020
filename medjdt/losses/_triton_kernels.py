"""Triton kernels of :mod:`medjdt.losses.fused_triton` (imported only when they are used: Triton is optional).

Kept at module level because Triton resolves the helper functions a kernel calls through the module's globals.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(logits_ptr, target_ptr, mask_ptr, b, start, n_voxels, channels,
          ACTIVATION: tl.constexpr, HARD: tl.constexpr, HAS_MASK: tl.constexpr,
          C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Probabilities x, target y (one-hot for hard labels) and the keep factor of one (C_PAD, BLOCK) tile."""
    classes = tl.arange(0, C_PAD)[:, None]
    voxels = start + tl.arange(0, BLOCK)[None, :]
    class_ok = classes < channels
    voxel_ok = voxels < n_voxels
    inside = class_ok & voxel_ok
    offsets = (b * channels + classes) * n_voxels + voxels
    z = tl.load(logits_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        z = tl.where(class_ok, z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=0)[None, :])
        x = e / tl.sum(e, axis=0)[None, :]
    elif ACTIVATION == 1:
        x = 1.0 / (1.0 + tl.exp(-z))
    else:
        x = z
    if HARD:
        labels = tl.load(target_ptr + b * n_voxels + voxels, mask=voxel_ok, other=0)
        y = (labels == classes).to(tl.float32)
    else:
        y = tl.load(target_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    keep = inside.to(tl.float32)
    if HAS_MASK:
        keep *= tl.load(mask_ptr + b * n_voxels + voxels, mask=voxel_ok, other=0).to(tl.float32)
    return x, y, keep, offsets, inside

@triton.jit
def forward_kernel(logits_ptr, target_ptr, mask_ptr, sums_ptr, n_voxels, channels, batch,
                   ACTIVATION: tl.constexpr, HARD: tl.constexpr, HAS_MASK: tl.constexpr,
                   P2: tl.constexpr, PRODUCT: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    x, y, keep, _, _ = _tile(logits_ptr, target_ptr, mask_ptr, b, start, n_voxels, channels,
                             ACTIVATION, HARD, HAS_MASK, C_PAD, BLOCK)
    x = x * keep
    y = y * keep
    classes = tl.arange(0, C_PAD)
    out = sums_ptr + b * channels + classes
    stride = batch * channels
    ok = classes < channels
    if P2:
        tl.atomic_add(out, tl.sum(x * x, axis=1), mask=ok)
    else:
        tl.atomic_add(out, tl.sum(x, axis=1), mask=ok)
    if HARD:
        # rows: S_x, TP = sum e t(x) with t(x) = x for p = 1 and 2, voxel count
        tl.atomic_add(out + stride, tl.sum(x * y, axis=1), mask=ok)
        tl.atomic_add(out + 2 * stride, tl.sum(y, axis=1), mask=ok)
    else:
        # rows: S_x, S_y, S_d (, S_xy)
        d = x - y
        if P2:
            tl.atomic_add(out + stride, tl.sum(y * y, axis=1), mask=ok)
            tl.atomic_add(out + 2 * stride, tl.sum(d * d, axis=1), mask=ok)
        else:
            tl.atomic_add(out + stride, tl.sum(y, axis=1), mask=ok)
            tl.atomic_add(out + 2 * stride, tl.sum(tl.abs(d), axis=1), mask=ok)
        if PRODUCT:
            tl.atomic_add(out + 3 * stride, tl.sum(x * y, axis=1), mask=ok)

@triton.jit
def backward_kernel(logits_ptr, target_ptr, mask_ptr, grad_sums_ptr, grad_ptr, n_voxels, channels, batch,
                    ACTIVATION: tl.constexpr, HARD: tl.constexpr, HAS_MASK: tl.constexpr,
                    P2: tl.constexpr, PRODUCT: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    x, y, keep, offsets, inside = _tile(logits_ptr, target_ptr, mask_ptr, b, start, n_voxels, channels,
                                        ACTIVATION, HARD, HAS_MASK, C_PAD, BLOCK)
    classes = tl.arange(0, C_PAD)
    stride = batch * channels
    g = grad_sums_ptr + b * channels + classes
    ok = classes < channels
    g_x = tl.load(g, mask=ok, other=0.0)[:, None]
    if P2:
        grad_x = 2.0 * x * g_x
    else:
        grad_x = g_x + 0.0 * x
    if HARD:
        g_tp = tl.load(g + stride, mask=ok, other=0.0)[:, None]
        grad_x += y * g_tp
    else:
        g_d = tl.load(g + 2 * stride, mask=ok, other=0.0)[:, None]
        d = x - y
        if P2:
            grad_x += 2.0 * d * g_d
        else:
            grad_x += tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) * g_d
        if PRODUCT:
            grad_x += y * tl.load(g + 3 * stride, mask=ok, other=0.0)[:, None]
    grad_x *= keep
    if ACTIVATION == 0:
        product = x * grad_x
        grad_z = product - x * tl.sum(product, axis=0)[None, :]
    elif ACTIVATION == 1:
        grad_z = grad_x * x * (1.0 - x)
    else:
        grad_z = grad_x
    tl.store(grad_ptr + offsets, grad_z.to(grad_ptr.dtype.element_ty), mask=inside)

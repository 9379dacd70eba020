"""Network topology, memory estimate and the patch/batch that fit a memory budget (MONAI ``DynUNet``).

Topology (after nnU-Net's rule): level 0 keeps full resolution; each further level halves the axes that are not
coarse (their spacing at that level less than twice the finest) and still at least ``2 * min_edge`` voxels long in
the patch, and keeps the others (stride 1). Kernels are 3 on an axis whose spacing at that level is less than twice
the finest and 1 on a coarser one, so thick slices are not mixed until downsampling has made the grid more
isotropic. Filters start at a base and double per level up to a cap.

Memory (documented estimate, checked against the tensors autograd saves in ``tests/test_planning.py``)::

    activations = patches * bytes * (sum over levels l of  a_l * filters_l * voxels_l  +  (in + 4 * out) * voxels_0)
    a_l = 11 (encoder block 4: two convolutions, each saving its output and its activation; decoder block 7:
              the upsampled map, the concatenation (2x) and two convolutions), 4 at the bottom level
    states      = 16 bytes per parameter (fp32 weight, gradient, two AdamW moments)
    total GiB   = (activations + states) / 2**30 + overhead (framework and workspace; 0.5 GiB on a GPU, 0 on CPU)

``voxels_l`` is the patch's voxel count at level l, ``bytes`` 2 under bf16-mixed, 4 in fp32. Every term grows
with the patch and the batch, so the estimate is monotone in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Topology", "activation_bytes", "estimate_gib", "fit_patch_and_batch", "parameter_count", "topology"]

ENCODER_FACTOR = 4
DECODER_FACTOR = 7
STATE_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class Topology:
    """``strides[l]`` and ``kernels[l]`` (one entry per axis) of level ``l`` (``strides[0]`` all 1), ``filters[l]``,
    and ``divisor[a]``: the product of the strides on axis ``a`` (a patch axis must be a multiple of it)."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(len(self.strides[0])))


def topology(
    patch: Sequence[int],
    spacing: Sequence[float],
    *,
    base_filters: int,
    max_filters: int,
    max_levels: int,
    min_edge: int = 4,
) -> Topology:
    """The DynUNet levels for a ``patch`` (voxels per axis) on a grid of ``spacing`` (mm per axis)."""
    size = [int(p) for p in patch]
    current = [float(s) for s in spacing]
    strides = [tuple(1 for _ in size)]
    kernels = [_kernel(current)]
    while len(strides) < max_levels:
        finest = min(current)
        pool = [current[a] < 2 * finest and size[a] >= 2 * min_edge for a in range(len(size))]
        if not any(pool):
            break
        strides.append(tuple(2 if p else 1 for p in pool))
        size = [s // 2 if p else s for s, p in zip(size, pool)]
        current = [c * 2 if p else c for c, p in zip(current, pool)]
        kernels.append(_kernel(current))
    filters = tuple(min(max_filters, base_filters * 2**level) for level in range(len(strides)))
    return Topology(tuple(strides), tuple(kernels), filters)


def _kernel(spacing: Sequence[float]) -> tuple[int, ...]:
    finest = min(spacing)
    return tuple(3 if s < 2 * finest else 1 for s in spacing)


def level_voxels(patch: Sequence[int], topo: Topology) -> list[float]:
    """The voxel count of the feature maps at each level for ``patch``."""
    size = np.asarray(patch, dtype=np.float64)
    out = []
    for stride in topo.strides:
        size = size / np.asarray(stride)
        out.append(float(np.prod(size)))
    return out


def activation_bytes(
    patch: Sequence[int], patches: int, topo: Topology, in_channels: int, out_channels: int, value_bytes: int
) -> float:
    """Bytes of the activations a training step keeps for the backward pass (see the module docstring)."""
    voxels = level_voxels(patch, topo)
    total = 0.0
    for level, (v, f) in enumerate(zip(voxels, topo.filters)):
        factor = ENCODER_FACTOR if level == topo.levels - 1 else ENCODER_FACTOR + DECODER_FACTOR
        total += factor * f * v
    total += (in_channels + 4 * out_channels) * voxels[0]
    return total * patches * value_bytes


def parameter_count(topo: Topology, in_channels: int, out_channels: int, deep_supervision_heads: int = 0) -> int:
    """Weights of the DynUNet (no residual blocks, instance norm without affine): convolutions and the output
    1x1 convolutions (with bias)."""
    k = [int(np.prod(kernel)) for kernel in topo.kernels]
    f = topo.filters
    total = k[0] * in_channels * f[0] + k[0] * f[0] * f[0]  # input block
    for level in range(1, topo.levels):
        total += k[level] * f[level - 1] * f[level] + k[level] * f[level] * f[level]  # encoder block
        up = int(np.prod(topo.strides[level]))
        total += up * f[level] * f[level - 1]  # transposed convolution to level - 1
        total += k[level] * 2 * f[level - 1] * f[level - 1] + k[level] * f[level - 1] * f[level - 1]  # decoder
    total += (f[0] + 1) * out_channels
    total += sum((f[level] + 1) * out_channels for level in range(1, 1 + deep_supervision_heads))
    return int(total)


def estimate_gib(
    patch: Sequence[int],
    patches: int,
    topo: Topology,
    *,
    in_channels: int,
    out_channels: int,
    value_bytes: int,
    overhead_gib: float,
    deep_supervision_heads: int = 0,
) -> float:
    """Estimated memory of one training step in GiB (see the module docstring)."""
    states = STATE_BYTES_PER_PARAMETER * parameter_count(topo, in_channels, out_channels, deep_supervision_heads)
    act = activation_bytes(patch, patches, topo, in_channels, out_channels, value_bytes)
    return (act + states) / 2**30 + overhead_gib


@dataclass(frozen=True)
class Fit:
    """The outcome of :func:`fit_patch_and_batch`."""

    patch: tuple[int, ...]
    patches: int
    topology: Topology
    memory_gib: float
    fits: bool
    shrunk: bool
    batch_limit: str


def _round_to_topology(patch: Sequence[int], spacing: Sequence[float], **net) -> tuple[tuple[int, ...], Topology]:
    """``patch`` rounded down to multiples of the divisors of its topology (each axis at least one divisor)."""
    patch = tuple(int(p) for p in patch)
    while True:
        topo = topology(patch, spacing, **net)
        rounded = tuple(max(d, (p // d) * d) for p, d in zip(patch, topo.divisor))
        if rounded == patch:
            return patch, topo
        patch = rounded


def fit_patch_and_batch(
    start: Sequence[int],
    median_shape: Sequence[float],
    spacing: Sequence[float],
    *,
    budget_gib: float,
    dataset_voxels: float,
    in_channels: int,
    out_channels: int,
    value_bytes: int,
    overhead_gib: float,
    base_filters: int,
    max_filters: int,
    max_levels: int,
    max_patches: int | None = None,
    min_patches: int = 2,
    deep_supervision: bool = False,
    min_edge: int = 4,
) -> Fit:
    """The largest patch on the shrinking path from ``start`` that fits ``budget_gib`` with ``min_patches`` per
    step, then the most patches per step that fit (only when the patch did not have to shrink).

    Shrinking: the axis whose patch covers the largest fraction of ``median_shape`` loses one divisor (its product
    of strides), the topology is recomputed and the patch rounded down to it; the path is the same for every
    budget, so a smaller budget stops further along it (a patch no larger on any axis). More patches per step are
    added only to an unshrunk patch, up to the budget, ``max_patches`` and 5% of ``dataset_voxels`` per step
    (nnU-Net's limit): a smaller budget never gives more patches. When even the smallest patch on the path does not
    fit, it is returned with ``fits=False``.
    """
    net = {"base_filters": base_filters, "max_filters": max_filters, "max_levels": max_levels, "min_edge": min_edge}

    def memory(patch: Sequence[int], topo: Topology, patches: int) -> float:
        heads = max(0, min(3, topo.levels - 2)) if deep_supervision else 0
        return estimate_gib(
            patch,
            patches,
            topo,
            in_channels=in_channels,
            out_channels=out_channels,
            value_bytes=value_bytes,
            overhead_gib=overhead_gib,
            deep_supervision_heads=heads,
        )

    patch, topo = _round_to_topology(start, spacing, **net)
    shrunk = False
    while memory(patch, topo, min_patches) > budget_gib:
        ratios = [p / max(m, 1.0) for p, m in zip(patch, median_shape)]
        order = sorted(range(len(patch)), key=lambda a: (ratios[a], patch[a]), reverse=True)
        axis = next((a for a in order if patch[a] - topo.divisor[a] >= max(min_edge, 1)), None)
        if axis is None:
            return Fit(patch, min_patches, topo, memory(patch, topo, min_patches), False, True, "smallest patch")
        smaller = list(patch)
        smaller[axis] -= topo.divisor[axis]
        patch, topo = _round_to_topology(smaller, spacing, **net)
        shrunk = True
    patches, limit = min_patches, "the minimum"
    if not shrunk:
        coverage = max(min_patches, math.floor(0.05 * dataset_voxels / float(np.prod(patch))))
        ceiling = min(coverage, max_patches) if max_patches is not None else coverage
        while patches < ceiling and memory(patch, topo, patches + 1) <= budget_gib:
            patches += 1
        if patches < ceiling:
            limit = "the memory budget"
        elif max_patches is not None and ceiling == max_patches and max_patches <= coverage:
            limit = f"the plan's fixed {max_patches}"
        else:
            limit = "5% of the dataset's voxels per step"
    else:
        limit = "the memory budget (the patch had to shrink)"
    return Fit(patch, patches, topo, memory(patch, topo, patches), True, shrunk, limit)

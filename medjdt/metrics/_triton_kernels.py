"""Triton kernel of :mod:`medjdt.metrics.fused_triton` (imported only when it is used: Triton is optional).

One program sums ``ITERS`` consecutive blocks of ``BLOCK`` voxels of one image and keeps every sum in registers:
counts are ``tl.histogram`` calls (on a GPU: atomics in shared memory, private to the program), binned float sums
are reductions over the voxel axis of a comparison of each voxel's bin with ``tl.arange`` over the bins, dense
sums plain reductions. At the end the program adds each of its sums to the output with ONE atomic add, so the
global atomics per output value are the number of programs, not of voxels.

Every histogram key is clamped into its range first (NaN and out-of-range values or labels included), so no
input value, valid or not, can make the kernel index outside a histogram.

Kept at module level because Triton resolves the helper functions a kernel calls through the module's globals.
"""

import triton
import triton.language as tl


@triton.jit
def _load_row(ptr, row, n_voxels, voxels, inside):
    """Row ``row`` of a ``(rows, N)`` tensor at ``voxels`` (0 outside), as float32."""
    return tl.load(ptr + row.to(tl.int64) * n_voxels + voxels, mask=inside, other=0).to(tl.float32)


@triton.jit
def _bin_of(values, n_bins):
    """Calibration bin ``floor(value * M)`` of values in [0, 1] (the float32 product truncated, as the torch code
    computes it), with 1.0 in the last bin, which is closed. NaN and values outside [0, 1] go to an edge bin:
    the product is clamped before the conversion (converting NaN to an integer is undefined)."""
    scaled = values * n_bins
    scaled = tl.where(scaled >= 0.0, scaled, 0.0)
    scaled = tl.where(scaled < n_bins, scaled, n_bins - 1.0)
    return scaled.to(tl.int32)


@triton.jit
def _binned_sum(key, keep, values, bins):
    """Sum of ``values`` per bin over the kept voxels of one block ``(BLOCK,)`` -> ``(M_PAD,)`` float32."""
    hit = (key[:, None] == bins[None, :]) & keep[:, None]
    return tl.sum(tl.where(hit, values[:, None], 0.0), axis=0)


@triton.jit
def _level(values, thresholds_ptr, N_THR: tl.constexpr):
    """Number of thresholds strictly below each value (``torch.bucketize(right=False)``), int32."""
    level = tl.zeros(values.shape, dtype=tl.int32)
    for t in tl.static_range(N_THR):
        level += (values > tl.load(thresholds_ptr + t)).to(tl.int32)
    return level


@triton.jit
def _add_to_row(accumulator, row, values, rows):
    """``accumulator[row] += values`` for a ``(R, K)`` accumulator and ``(K,)`` values."""
    return tl.where((rows == row)[:, None], accumulator + values[None, :], accumulator)


@triton.jit
def _add_at(accumulator, row, value, rows):
    """``accumulator[row] += value`` for a ``(R,)`` accumulator and a scalar value."""
    return tl.where(rows == row, accumulator + value, accumulator)


@triton.jit
def _masked_sum(values, keep):
    return tl.sum(tl.where(keep, values, 0.0), axis=0)


@triton.jit
def _halves(histogram, ROWS: tl.constexpr, M_PAD: tl.constexpr):
    """A ``(ROWS, 2 * M_PAD)`` histogram over keys ``bin + M_PAD * flag`` -> (count per bin, count of flagged
    voxels per bin), float64 ``(ROWS, M_PAD)`` each."""
    split = tl.reshape(histogram, (ROWS, 2, M_PAD))
    flagged = tl.arange(0, 2)[None, :, None] == 1
    return tl.sum(split, axis=1).to(tl.float64), tl.sum(tl.where(flagged, split, 0), axis=1).to(tl.float64)


@triton.jit
def voxel_sums_kernel(
    probs_ptr,
    target_ptr,
    mask_ptr,
    thresholds_ptr,
    top_ptr,
    classwise_ptr,
    image_ptr,
    confusion_ptr,
    masses_ptr,
    levels_ptr,
    n_voxels,
    batch,
    n_bins,
    eps,
    C: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CALIBRATION: tl.constexpr,
    OVERLAP: tl.constexpr,
    N_THR: tl.constexpr,
    C_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    CC_PAD: tl.constexpr,
    LL_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """All sums of :func:`medjdt.metrics.fused_triton.triton_voxel_sums` for one (tile, image) program.

    Outputs (float64, zero-initialised, added to atomically): ``top_ptr`` ``(3, B, M)`` top-label count,
    confidence and accuracy sums; ``classwise_ptr`` ``(3, B, C, M)`` count, probability and reference sums;
    ``image_ptr`` ``(2, B)`` squared error and NLL; ``confusion_ptr`` ``(B, C, C)`` argmax counts [predicted,
    reference]; ``masses_ptr`` ``(3, B, C)`` |x|_1, |y|_1, |x - y|_1; ``levels_ptr`` ``(B, C, L, L)`` joint
    histogram of (thresholds below x, thresholds below y), L = N_THR + 1.
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    classes = tl.arange(0, C_PAD)
    bins = tl.arange(0, M_PAD)
    L: tl.constexpr = N_THR + 1

    # Counts: int32 histograms (a hard reference doubles the keys: bin + M_PAD * [correct / labelled class]).
    top_counts = tl.zeros((2 * M_PAD,), dtype=tl.int32)
    class_counts = tl.zeros((C_PAD, 2 * M_PAD), dtype=tl.int32)
    confusion = tl.zeros((CC_PAD,), dtype=tl.int32)
    level_counts = tl.zeros((C_PAD, LL_PAD), dtype=tl.int32)
    # Float sums: float32 over a block, then over the program's blocks.
    top_confidence = tl.zeros((M_PAD,), dtype=tl.float32)
    top_accuracy = tl.zeros((M_PAD,), dtype=tl.float32)
    class_probability = tl.zeros((C_PAD, M_PAD), dtype=tl.float32)
    class_reference = tl.zeros((C_PAD, M_PAD), dtype=tl.float32)
    x_mass = tl.zeros((C_PAD,), dtype=tl.float32)
    y_mass = tl.zeros((C_PAD,), dtype=tl.float32)
    abs_diff = tl.zeros((C_PAD,), dtype=tl.float32)
    squared_lanes = tl.zeros((BLOCK,), dtype=tl.float32)  # per voxel lane, reduced once at the end
    nll_lanes = tl.zeros((BLOCK,), dtype=tl.float32)

    for i in range(ITERS):
        voxels = (tile * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        inside = voxels < n_voxels
        keep = inside
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b.to(tl.int64) * n_voxels + voxels, mask=inside, other=0) != 0)
        if not SOFT:
            labels = tl.load(target_ptr + b.to(tl.int64) * n_voxels + voxels, mask=inside, other=0)
            labels = tl.minimum(tl.maximum(labels, 0), C - 1).to(tl.int32)  # a no-op on checked labels

        # Pass 1 over the classes: argmax with the first index on ties (strict >), as the torch code.
        confidence = _load_row(probs_ptr, b * C, n_voxels, voxels, inside)
        predicted = tl.zeros((BLOCK,), dtype=tl.int32)
        if SOFT:
            accuracy = _load_row(target_ptr, b * C, n_voxels, voxels, inside)  # reference at the argmax
            reference_max = accuracy
            reference = tl.zeros((BLOCK,), dtype=tl.int32)  # majority class of the soft reference
        for c in tl.static_range(1, C):
            x = _load_row(probs_ptr, b * C + c, n_voxels, voxels, inside)
            better = x > confidence
            confidence = tl.where(better, x, confidence)
            predicted = tl.where(better, c, predicted)
            if SOFT:
                y = _load_row(target_ptr, b * C + c, n_voxels, voxels, inside)
                accuracy = tl.where(better, y, accuracy)
                reference_better = y > reference_max
                reference_max = tl.where(reference_better, y, reference_max)
                reference = tl.where(reference_better, c, reference)
        if not SOFT:
            reference = labels

        if CALIBRATION:
            key = _bin_of(confidence, n_bins)
            top_confidence += _binned_sum(key, keep, confidence, bins)
            if SOFT:
                top_counts += tl.histogram(key, 2 * M_PAD, mask=keep)
                top_accuracy += _binned_sum(key, keep, accuracy, bins)
            else:
                top_counts += tl.histogram(key + M_PAD * (predicted == labels), 2 * M_PAD, mask=keep)
        if OVERLAP:
            confusion += tl.histogram(predicted * C + reference, CC_PAD, mask=keep)

        # Pass 2, class by class (the rows are in the cache from pass 1).
        for c in tl.static_range(C):
            x = _load_row(probs_ptr, b * C + c, n_voxels, voxels, inside)
            if SOFT:
                y = _load_row(target_ptr, b * C + c, n_voxels, voxels, inside)
            else:
                labelled = labels == c
                y = labelled.to(tl.float32)
            if CALIBRATION:
                key = _bin_of(x, n_bins)
                class_probability = _add_to_row(class_probability, c, _binned_sum(key, keep, x, bins), classes)
                if SOFT:
                    counts = tl.histogram(key, 2 * M_PAD, mask=keep)
                    class_reference = _add_to_row(class_reference, c, _binned_sum(key, keep, y, bins), classes)
                else:
                    counts = tl.histogram(key + M_PAD * labelled, 2 * M_PAD, mask=keep)
                class_counts = _add_to_row(class_counts, c, counts, classes)
                d = x - y
                squared_lanes += tl.where(keep, d * d, 0.0)
                nll_lanes -= tl.where(keep, y * tl.log(tl.maximum(x, eps)), 0.0)
            if OVERLAP:
                x_mass = _add_at(x_mass, c, _masked_sum(x, keep), classes)
                y_mass = _add_at(y_mass, c, _masked_sum(y, keep), classes)
                abs_diff = _add_at(abs_diff, c, _masked_sum(tl.abs(x - y), keep), classes)
                if N_THR > 0:
                    if SOFT:
                        level_y = _level(y, thresholds_ptr, N_THR)
                    else:
                        level_y = N_THR * labelled.to(tl.int32)  # a one-hot 1 lies above every threshold
                    level_key = _level(x, thresholds_ptr, N_THR) * L + level_y
                    level_counts = _add_to_row(level_counts, c, tl.histogram(level_key, LL_PAD, mask=keep), classes)

    # One atomic add per output value and program.
    class_ok = classes < C
    if CALIBRATION:
        bin_ok = bins < n_bins
        top = top_ptr + b * n_bins + bins
        top_stride = batch * n_bins
        top_count, top_flagged = _halves(tl.reshape(top_counts, (1, 2 * M_PAD)), 1, M_PAD)
        top_count = tl.reshape(top_count, (M_PAD,))
        if not SOFT:
            top_accuracy = tl.reshape(top_flagged, (M_PAD,))  # the count of correct voxels
        tl.atomic_add(top, top_count, mask=bin_ok, sem="relaxed")
        tl.atomic_add(top + top_stride, top_confidence.to(tl.float64), mask=bin_ok, sem="relaxed")
        tl.atomic_add(top + 2 * top_stride, top_accuracy.to(tl.float64), mask=bin_ok, sem="relaxed")
        classwise = classwise_ptr + (b * C + classes[:, None]) * n_bins + bins[None, :]
        classwise_stride = batch * C * n_bins
        classwise_ok = class_ok[:, None] & bin_ok[None, :]
        class_count, class_flagged = _halves(class_counts, C_PAD, M_PAD)
        if not SOFT:
            class_reference = class_flagged  # the count of voxels labelled with the class
        tl.atomic_add(classwise, class_count, mask=classwise_ok, sem="relaxed")
        tl.atomic_add(classwise + classwise_stride, class_probability.to(tl.float64), mask=classwise_ok, sem="relaxed")
        tl.atomic_add(
            classwise + 2 * classwise_stride, class_reference.to(tl.float64), mask=classwise_ok, sem="relaxed"
        )
        tl.atomic_add(image_ptr + b, tl.sum(squared_lanes, axis=0).to(tl.float64), sem="relaxed")
        tl.atomic_add(image_ptr + batch + b, tl.sum(nll_lanes, axis=0).to(tl.float64), sem="relaxed")
    if OVERLAP:
        pairs = tl.arange(0, CC_PAD)
        tl.atomic_add(confusion_ptr + b * C * C + pairs, confusion.to(tl.float64), mask=pairs < C * C, sem="relaxed")
        per_class = b * C + classes
        stride = batch * C
        tl.atomic_add(masses_ptr + per_class, x_mass.to(tl.float64), mask=class_ok, sem="relaxed")
        tl.atomic_add(masses_ptr + stride + per_class, y_mass.to(tl.float64), mask=class_ok, sem="relaxed")
        tl.atomic_add(masses_ptr + 2 * stride + per_class, abs_diff.to(tl.float64), mask=class_ok, sem="relaxed")
        if N_THR > 0:
            keys = tl.arange(0, LL_PAD)
            level = levels_ptr + per_class[:, None] * (L * L) + keys[None, :]
            tl.atomic_add(
                level, level_counts.to(tl.float64), mask=class_ok[:, None] & (keys < L * L)[None, :], sem="relaxed"
            )

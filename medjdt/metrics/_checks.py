"""Input validation shared by every metric in :mod:`medjdt.metrics`.

All checks run on the whole tensor with one host synchronisation in the common (valid) case; the slower
per-image diagnosis only runs when a check fails, to name the offending images in the error message. With
``defer=True`` the value checks are returned as a :class:`DeferredCheck` instead (per-image statistics left on
the device), so that a streaming metric on an accelerator can check many batches with one synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medjdt.losses.dtypes import compute_dtype
from medjdt.validation import SPATIAL_LAYOUT, check_number, check_tensor

# Largest accepted deviation of a class distribution's sum from 1. Softmax in float32 is exact to ~1e-6;
# half precision needs a wider margin, hence the dtype-dependent term.
_SUM_ATOL = 1e-4


@dataclass(frozen=True)
class MetricInputs:
    """Validated metric inputs with the spatial dimensions flattened to one axis N.

    Attributes:
        probs: ``(B, C, N)`` float32 (float64 if given as float64) probabilities.
        target: ``(B, N)`` int64 labels (hard reference) or ``(B, C, N)`` probabilities (soft reference).
        mask: ``(B, N)`` bool, True where a voxel counts; None when every voxel counts.
        soft: whether ``target`` is a soft reference.
    """

    probs: Tensor
    target: Tensor
    mask: Tensor | None
    soft: bool

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]


def describe_images(indices: Sequence[int], case_ids: Sequence[str] | None) -> str:
    """Human-readable list of batch indices (and case ids when known) for error messages."""
    if case_ids is None:
        return "image(s) " + ", ".join(str(i) for i in indices)
    return "image(s) " + ", ".join(f"{i} (case {case_ids[i]!r})" for i in indices)


def _replace_excluded(values: Tensor, keep: Tensor, fill: float) -> Tensor:
    """A copy of the float32/float64 ``values`` holding ``fill`` where ``keep`` (broadcastable bool) is False.

    Works on the bit patterns, ``bits * keep + bits(fill) * ~keep``: exact whatever the excluded values are (NaN
    too), and several times faster on CPUs than ``torch.where``.
    """
    int_dtype = torch.int32 if values.dtype == torch.float32 else torch.int64
    fill_bits = torch.tensor(fill, dtype=values.dtype).view(int_dtype).item()
    keep = keep.to(int_dtype)  # integer products: a bool operand would be converted element by element
    bits = values.view(int_dtype) * keep
    return bits.add_(keep.sub_(1).mul_(-fill_bits)).view(values.dtype)


def _bad_images(flags: Tensor) -> list[int]:
    """Batch indices where a per-voxel boolean flag tensor ``(B, ...)`` is True anywhere."""
    return torch.nonzero(flags.flatten(1).any(1)).flatten().tolist()


def _sum_tolerance(dtype: torch.dtype) -> float:
    return max(_SUM_ATOL, 10 * torch.finfo(dtype).eps)


def _distribution_stats(x: Tensor, simplex: bool) -> list[Tensor]:
    """Min and max of a ``(B, C, N)`` tensor, and of its sum over C when ``simplex`` (0-dim tensors)."""
    stats = list(torch.aminmax(x))
    if simplex:
        stats += list(torch.aminmax(x.sum(1)))
    return stats


def _raise_for_distribution(
    values: list[float],
    x: Tensor,
    name: str,
    *,
    simplex: bool,
    case_ids: Sequence[str] | None,
    input_dtype: torch.dtype,
) -> None:
    """Raise if the stats of :func:`_distribution_stats` show NaN, values outside [0, 1] or sums other than 1.

    The tolerance of the sum follows ``input_dtype``, the dtype the caller passed before promotion. The
    offending images are only located (another pass over ``x``) once a problem is known.
    """
    if any(v != v for v in values[:2]):  # NaN propagates through aminmax
        bad = _bad_images(torch.isnan(x))
        raise ValueError(f"{name} contains NaN in {describe_images(bad, case_ids)}.")
    if values[0] < 0 or values[1] > 1:
        bad = _bad_images((x < 0) | (x > 1))
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{values[0]:.6g}, {values[1]:.6g}] in "
            f"{describe_images(bad, case_ids)}."
        )
    if simplex:
        tol = _sum_tolerance(input_dtype)
        deviation = max(1 - values[2], values[3] - 1)
        if deviation > tol:
            bad = _bad_images((x.sum(1) - 1).abs() > tol)
            raise ValueError(
                f"{name} must sum to 1 over the class dimension (dim 1): largest deviation {deviation:.6g} "
                f"exceeds {tol:.3g} in {describe_images(bad, case_ids)}. Pass softmax probabilities, not logits "
                "or per-class sigmoid outputs."
            )


def check_case_ids(case_ids: Sequence[str], batch_size: int) -> list[str]:
    """Return ``case_ids`` as a list after checking there is one non-empty string per image."""
    if isinstance(case_ids, str) or not isinstance(case_ids, Sequence):
        raise ValueError(f"case_ids must be a sequence of {batch_size} strings, got {type(case_ids).__name__}.")
    ids = list(case_ids)
    if len(ids) != batch_size:
        raise ValueError(f"case_ids has {len(ids)} entries but the batch has {batch_size} images.")
    for i, case_id in enumerate(ids):
        if not isinstance(case_id, str) or not case_id:
            raise ValueError(f"case_ids[{i}] must be a non-empty string, got {case_id!r}.")
    return ids


def prepare_inputs(
    probs: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    simplex: bool,
    case_ids: Sequence[str] | None = None,
    defer: bool = False,
) -> MetricInputs | tuple[MetricInputs, DeferredCheck]:
    """Validate metric inputs and flatten their spatial dimensions.

    Args:
        probs: ``(B, C, *spatial)`` probabilities, 2 or 3 spatial dims, C >= 2, floating point.
        target: hard labels ``(B, *spatial)`` (integer dtype, values in ``[0, C)``) or a soft reference
            ``(B, C, *spatial)`` (floating point, values in [0, 1], summing to 1 over C).
        mask: optional ``(B, *spatial)`` bool; False voxels are excluded from the checks and from every metric.
        simplex: also require ``probs`` to sum to 1 over the class dimension (needed by top-label calibration,
            Brier score and NLL).
        case_ids: names of the B images, only used to name the offending images in error messages.
        defer: check types, shapes and devices now but leave the value checks (NaN, range, sums, labels) to the
            returned :class:`DeferredCheck`: nothing is read back to the host, so on an accelerator the call
            does not wait for the device. Invalid values then reach the metric code unchecked.

    Returns:
        :class:`MetricInputs`, and with ``defer`` also the :class:`DeferredCheck`. Half-precision inputs are
        promoted to float32 so bin edges and sums are exact.

    Raises:
        ValueError: naming the problem (type, dtype, shape, NaN, range, sum, labels) and the offending images.
    """
    check_tensor("probs", probs, ndim=(4, 5), layout=SPATIAL_LAYOUT, floating=True)
    check_tensor("target", target)
    batch, num_classes, *spatial = probs.shape
    if num_classes < 2:
        raise ValueError(
            f"probs must have at least 2 classes (dim 1), got shape {tuple(probs.shape)}; for a single sigmoid "
            "channel p use torch.cat([1 - p, p], dim=1)."
        )
    if probs.numel() == 0:
        raise ValueError(f"probs is empty, got shape {tuple(probs.shape)}.")
    hard_shape = (batch, *spatial)
    if tuple(target.shape) == tuple(probs.shape):
        soft = True
    elif tuple(target.shape) == hard_shape:
        soft = False
    else:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match probs shape {tuple(probs.shape)}: expected hard "
            f"labels of shape {hard_shape} or a soft reference of shape {tuple(probs.shape)}."
        )
    if target.device != probs.device:
        raise ValueError(f"target is on {target.device} but probs is on {probs.device}.")
    if case_ids is not None:
        case_ids = check_case_ids(case_ids, batch)

    work_dtype = compute_dtype(probs.dtype)
    flat_probs = probs.to(work_dtype).flatten(2).contiguous()
    if soft:
        if not target.is_floating_point():
            raise ValueError(
                f"target has the shape of probs {tuple(probs.shape)} (soft reference) but dtype {target.dtype}; "
                "a soft reference must be floating point, hard labels must have shape (B, *spatial)."
            )
        flat_target = target.to(work_dtype).flatten(2).contiguous()
    else:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"hard labels (B, *spatial) must have an integer dtype, got {target.dtype}.")
        flat_target = target.long().flatten(1).contiguous()

    flat_mask = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {hard_shape}, got {got}; use mask > 0.")
        if tuple(mask.shape) != hard_shape:
            raise ValueError(f"mask must have shape {hard_shape} (B, *spatial), got {tuple(mask.shape)}.")
        if mask.device != probs.device:
            raise ValueError(f"mask is on {mask.device} but probs is on {probs.device}.")
        flat_mask = mask.flatten(1).contiguous()
        # Excluded voxels may hold anything (padding, ignore labels, NaN): replace them by neutral valid values so
        # they cannot break the checks or the index arithmetic; every metric also drops them explicitly.
        uniform = 1.0 / num_classes
        flat_probs = _replace_excluded(flat_probs, flat_mask[:, None], uniform)
        if soft:
            flat_target = _replace_excluded(flat_target, flat_mask[:, None], uniform)
        else:
            flat_target = torch.where(flat_mask, flat_target, 0)

    inputs = MetricInputs(probs=flat_probs, target=flat_target, mask=flat_mask, soft=soft)
    if defer:
        pending = DeferredCheck(
            stats=_image_stats(inputs, simplex),
            soft=soft,
            simplex=simplex,
            probs_dtype=probs.dtype,
            target_dtype=target.dtype,
            case_ids=None if case_ids is None else list(case_ids),
        )
        return inputs, pending

    # All statistics in one tensor: a single host synchronisation when the inputs are valid.
    stats = _distribution_stats(flat_probs, simplex)
    stats += _distribution_stats(flat_target, True) if soft else list(torch.aminmax(flat_target))
    values = torch.stack([s.double() for s in stats]).tolist()
    n_probs = len(stats) - (4 if soft else 2)
    _raise_for_distribution(
        values[:n_probs], flat_probs, "probs", simplex=simplex, case_ids=case_ids, input_dtype=probs.dtype
    )
    if soft:
        _raise_for_distribution(
            values[n_probs:],
            flat_target,
            "target (soft reference)",
            simplex=True,
            case_ids=case_ids,
            input_dtype=target.dtype,
        )
    else:
        lo, hi = (int(v) for v in values[n_probs:])
        if lo < 0 or hi >= num_classes:
            bad = _bad_images((flat_target < 0) | (flat_target >= num_classes))
            raise ValueError(
                f"target labels must be in [0, {num_classes - 1}] for {num_classes} classes, got labels in "
                f"[{lo}, {hi}] in {describe_images(bad, case_ids)}."
            )
    return inputs


def _image_stats(inputs: MetricInputs, simplex: bool) -> Tensor:
    """Per-image value statistics ``(B, k)`` float64, on the inputs' device (not read here).

    Columns: min and max of probs, then (``simplex``) min and max of their class sums, then min and max of the
    target and (soft) of its class sums.
    """
    batch = inputs.probs.shape[0]

    def extremes(x: Tensor) -> list[Tensor]:
        flat = x.reshape(batch, -1)
        return [flat.amin(1), flat.amax(1)]  # torch.aminmax(dim=1) is several times slower on CPUs

    columns = extremes(inputs.probs)
    if simplex:
        columns += extremes(inputs.probs.sum(1))
    columns += extremes(inputs.target)
    if inputs.soft:
        columns += extremes(inputs.target.sum(1))
    return torch.stack([c.double() for c in columns], dim=1)


@dataclass(frozen=True)
class DeferredCheck:
    """Value checks of one batch whose statistics stay on the device until :meth:`check` reads them.

    On an accelerator, reading values on the host waits for the device; a streaming metric collects these and
    checks them all at once before it computes (one synchronisation for many batches).
    """

    stats: Tensor
    soft: bool
    simplex: bool
    probs_dtype: torch.dtype
    target_dtype: torch.dtype
    case_ids: list[str] | None

    def check(self, num_classes: int) -> None:
        """Raise ``ValueError`` as :func:`prepare_inputs` would, naming the offending images."""
        check_image_stats(self.stats.tolist(), self, num_classes)


def check_image_stats(rows: list[list[float]], check: DeferredCheck, num_classes: int) -> None:
    """Raise for the first problem found in per-image stats (see :func:`_image_stats`), naming every image with it."""
    ids = check.case_ids
    n_probs = 4 if check.simplex else 2
    probs_rows = [row[:n_probs] for row in rows]
    _raise_for_image_values(probs_rows, "probs", check.simplex, check.probs_dtype, ids)
    target_rows = [row[n_probs:] for row in rows]
    if check.soft:
        _raise_for_image_values(target_rows, "target (soft reference)", True, check.target_dtype, ids)
        return
    bad = [i for i, (lo, hi) in enumerate(target_rows) if lo < 0 or hi >= num_classes]
    if bad:
        lo, hi = int(min(target_rows[i][0] for i in bad)), int(max(target_rows[i][1] for i in bad))
        raise ValueError(
            f"target labels must be in [0, {num_classes - 1}] for {num_classes} classes, got labels in "
            f"[{lo}, {hi}] in {describe_images(bad, ids)}."
        )


def _raise_for_image_values(rows, name, simplex, input_dtype, case_ids) -> None:
    """Per-image version of :func:`_raise_for_distribution` (same messages)."""
    bad = [i for i, row in enumerate(rows) if any(v != v for v in row)]  # NaN propagates through aminmax
    if bad:
        raise ValueError(f"{name} contains NaN in {describe_images(bad, case_ids)}.")
    bad = [i for i, row in enumerate(rows) if row[0] < 0 or row[1] > 1]
    if bad:
        lo, hi = min(rows[i][0] for i in bad), max(rows[i][1] for i in bad)
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}] in "
            f"{describe_images(bad, case_ids)}."
        )
    if simplex:
        tol = _sum_tolerance(input_dtype)
        deviations = [max(1 - row[2], row[3] - 1) for row in rows]
        bad = [i for i, deviation in enumerate(deviations) if deviation > tol]
        if bad:
            raise ValueError(
                f"{name} must sum to 1 over the class dimension (dim 1): largest deviation "
                f"{max(deviations[i] for i in bad):.6g} exceeds {tol:.3g} in {describe_images(bad, case_ids)}. "
                "Pass softmax probabilities, not logits or per-class sigmoid outputs."
            )


def check_levels(levels: Sequence[float], *, where: str | None = None) -> tuple[float, ...]:
    """``levels`` as a tuple of floats after checking that they are strictly increasing numbers inside (0, 1).

    Raises:
        ValueError: not a sequence, empty, a value that is not a number in (0, 1), or not strictly increasing.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(levels, str) or not isinstance(levels, Iterable):
        raise ValueError(f"{prefix}levels must be a sequence of numbers in (0, 1), got {levels!r}")
    values = tuple(
        check_number(f"levels[{i}]", t, low=0, high=1, low_inclusive=False, high_inclusive=False, where=where)
        for i, t in enumerate(levels)
    )
    if not values:
        raise ValueError(f"{prefix}levels must not be empty")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{prefix}levels must be strictly increasing, got {values}")
    return values

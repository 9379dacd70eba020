"""Input checks and target parsing shared by the losses.

Every loss accepts the same inputs: logits (or probabilities) ``(B, C, *spatial)`` with 2 or 3 spatial
dims, a target that is either hard labels ``(B, *spatial)`` (integer class indices) or soft labels
``(B, C, *spatial)`` (floats in [0, 1]), and an optional bool ``mask`` ``(B, *spatial)`` of voxels to keep.
The helpers here raise ``ValueError`` naming the offending shape, dtype or value.

Value checks (NaN/Inf logits, soft values outside [0, 1], class indices out of range) read a statistic of the
data on the host, which on an accelerator waits for the device. There the losses pass a
:class:`DeferredChecks`: the statistics stay on the device, are copied to the host without blocking, and are
checked on a later call (or by :meth:`DeferredChecks.flush`), so a training step never waits for them. The
computations are safe for any values in the meantime (class indices are compared, never used as addresses).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medjdt.validation import SPATIAL_LAYOUT, check_choice, check_number, check_tensor

# The activations a loss applies to its input; None: the input holds probabilities already.
_ACTIVATIONS = ("softmax", "sigmoid", None)


@dataclass(frozen=True)
class PreparedTarget:
    """A validated target in one of two forms, plus the voxels that count.

    Exactly one of ``labels`` and ``soft`` is set:

    - ``labels``: ``(B, *spatial)`` int64 class indices in ``[0, C)``; voxels excluded by ``mask`` hold 0.
    - ``soft``: ``(B, C, *spatial)`` floating values in [0, 1].

    ``mask``: ``(B, *spatial)`` bool, True for voxels that count, or None when every voxel counts.
    """

    labels: torch.Tensor | None
    soft: torch.Tensor | None
    mask: torch.Tensor | None


def defers_checks(device: torch.device) -> bool:
    """Whether value checks of tensors on ``device`` are deferred: on every device but the CPU."""
    return device.type != "cpu"


class DeferredChecks:
    """Value checks whose statistics are computed on the device now and read by the host later.

    :meth:`add` queues a small statistic tensor with the function that raises for bad values; on CUDA it is
    copied into pinned host memory with a non-blocking copy followed by an event. :meth:`check` raises for every
    queued check whose copy has arrived (it never waits); :meth:`flush` waits for all of them.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event | None, Callable[[list], None]]] = deque()

    def add(self, stats: torch.Tensor, raise_for: Callable[[list], None]) -> None:
        """Queue ``stats`` (a small tensor); ``raise_for(stats.tolist())`` raises ``ValueError`` if they are bad."""
        event = None
        stats = stats.detach()
        if stats.device.type == "cuda":
            host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            stats = host
        self._pending.append((stats, event, raise_for))

    def check(self, wait: bool = False) -> None:
        """Raise ``ValueError`` for the first bad queued check that is ready (all of them with ``wait``)."""
        while self._pending:
            stats, event, raise_for = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.popleft()
            raise_for(stats.tolist())

    def flush(self) -> None:
        """Wait for every queued check and raise ``ValueError`` for the first bad one."""
        self.check(wait=True)

    def for_inputs(self, logits: torch.Tensor) -> DeferredChecks | None:
        """Raise for the ready checks of earlier calls, then return this queue if the checks of ``logits`` are
        to be deferred (see :func:`defers_checks`), else None (check now)."""
        self.check()
        return self if defers_checks(logits.device) else None

    def __len__(self) -> int:
        return len(self._pending)


def check_activation(activation: str | None, *, where: str | None = None) -> str | None:
    """``activation`` after checking that it is ``"softmax"``, ``"sigmoid"`` or None (``ValueError`` otherwise)."""
    return check_choice("activation", activation, _ACTIVATIONS, where=where)


def check_ignore_index(ignore_index: int | None, *, where: str | None = None) -> int | None:
    """``ignore_index`` as an ``int``, or None; ``ValueError`` for anything but a whole number or None."""
    return None if ignore_index is None else check_number("ignore_index", ignore_index, integer=True, where=where)


def check_p_variant(p: float, variant: int, *, where: str | None = None) -> tuple[float, int]:
    """``(p, variant)`` as ``(float, int)`` after checking the Lp exponent and the cardinality variant.

    Raises:
        ValueError: ``p`` is not a finite number >= 1, ``variant`` is not 1 or 2, or ``variant=2`` with p != 1
            (the product form exists for p = 1 only).
    """
    variant = int(check_choice("variant", variant, (1, 2), where=where))
    p = check_number("p", p, low=1, where=where)
    if variant == 2 and p != 1:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}variant=2 is defined for p=1 only, got p={p:g}")
    return p, variant


def check_logits(
    logits: torch.Tensor, activation: str | None, deferred: DeferredChecks | None = None
) -> tuple[float, float] | None:
    """Check a prediction tensor ``(B, C, *spatial)`` with 2 or 3 spatial dims.

    Logits must be finite floats; with ``activation=None`` the input holds probabilities and must lie in
    [0, 1]. ``"softmax"`` needs at least 2 channels (a softmax over one channel is constantly 1). With
    ``deferred``, the value checks are queued there instead of waiting for the data.

    Returns:
        The smallest and largest logit (one pass over the data, used to pick a cheaper softmax), or None for
        probabilities (``activation=None``) and deferred checks.
    """
    check_tensor("logits", logits, ndim=(4, 5), layout=SPATIAL_LAYOUT, floating=True)
    if activation == "softmax" and logits.shape[1] < 2:
        raise ValueError(
            f"activation='softmax' needs at least 2 channels, got logits of shape {tuple(logits.shape)}; "
            "use activation='sigmoid' for a single foreground channel"
        )
    if activation is None:
        check_unit_interval(logits, "probabilities (activation=None)", deferred)
        return None
    if logits.numel() == 0:
        return 0.0, 0.0
    shape = tuple(logits.shape)

    def raise_for(extremes: list[float]) -> None:
        # NaN propagates through aminmax, and an infinite value is the minimum or the maximum
        if not all(math.isfinite(v) for v in extremes):
            raise ValueError(f"logits of shape {shape} contain NaN or Inf{_later(deferred)}")

    extremes = torch.stack(torch.aminmax(logits.detach()))
    if deferred is not None:
        deferred.add(extremes, raise_for)
        return None
    low, high = extremes.tolist()
    raise_for([low, high])
    return low, high


def check_unit_interval(values: torch.Tensor, what: str, deferred: DeferredChecks | None = None) -> None:
    """Raise ``ValueError`` unless every entry of ``values`` is a number in [0, 1] (NaN fails too)."""
    if values.numel() == 0:
        return

    def raise_for(extremes: list[float]) -> None:
        low, high = extremes
        # written so that NaN (which compares False) fails the check
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"{what} must lie in [0, 1], found values in [{low}, {high}]{_later(deferred)}")

    extremes = torch.stack(torch.aminmax(values.detach())).float()
    if deferred is not None:
        deferred.add(extremes, raise_for)
    else:
        raise_for(extremes.tolist())


def _later(deferred: DeferredChecks | None) -> str:
    return "" if deferred is None else " (a deferred check of an earlier call on an accelerator)"


def prepare_target(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    deferred: DeferredChecks | None = None,
) -> PreparedTarget:
    """Validate ``target`` and ``mask`` against predictions of shape ``(B, C, *spatial)``.

    Args:
        logits: the predictions (logits or probabilities), ``(B, C, *spatial)``; only shape and device are read.
        target: hard labels ``(B, *spatial)`` of an integer (or bool) dtype with values in ``[0, C)``, or soft
            labels ``(B, C, *spatial)`` of a floating dtype with values in [0, 1]. With ``C == 1`` hard labels
            are a binary foreground mask (values in {0, 1}) and are returned as a soft ``(B, 1, *spatial)``
            target. Soft targets are not required to sum to 1 over the channels.
        mask: optional ``(B, *spatial)`` bool tensor, True for voxels that count.
        ignore_index: hard-label value whose voxels are excluded (may lie outside ``[0, C)``). It does not
            apply to soft targets; exclude voxels of a soft target with ``mask``.
        deferred: queue the value checks there instead of waiting for the data (see :class:`DeferredChecks`).

    Returns:
        A :class:`PreparedTarget` whose ``mask`` combines ``mask`` and ``ignore_index``.

    Raises:
        ValueError: wrong type, dtype, shape or device, soft values outside [0, 1] or NaN, or a class index outside
            ``[0, C)``.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    shape = tuple(logits.shape)
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape (B, *spatial), got {got}")
        if tuple(mask.shape) != (batch, *spatial):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match (B, *spatial) = {(batch, *spatial)}")
    if mask is not None and mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}")

    if tuple(target.shape) == shape:
        if not target.is_floating_point():
            raise ValueError(
                f"a target of the logits' shape {shape} holds soft labels and must be floating, got dtype "
                f"{target.dtype}; pass hard labels as (B, *spatial) class indices"
            )
        check_unit_interval(target, f"soft target of shape {shape}", deferred)
        return PreparedTarget(labels=None, soft=target, mask=mask)

    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target shape {tuple(target.shape)} matches neither hard labels (B, *spatial) = {(batch, *spatial)} "
            f"nor soft labels (B, C, *spatial) = {shape}"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"hard labels of shape {tuple(target.shape)} must be an integer tensor, got dtype {target.dtype}"
        )
    labels = target.long()
    if ignore_index is not None:
        keep = labels != ignore_index
        mask = keep if mask is None else mask & keep
        labels = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    if labels.numel() > 0:
        n_valid = max(channels, 2)  # one channel: binary labels in {0, 1}

        def raise_for(extremes: list[int]) -> None:
            low, high = extremes
            if low < 0 or high >= n_valid:
                raise ValueError(
                    f"hard labels contain class index {low if low < 0 else high} outside [0, {n_valid}) "
                    f"(logits have {channels} channel(s), ignore_index={ignore_index}){_later(deferred)}"
                )

        extremes = torch.stack(torch.aminmax(labels))
        if deferred is not None:
            deferred.add(extremes, raise_for)
            # until the check reports them, bad indices must not reach a gather or a cross-entropy kernel
            labels = labels.clamp(0, n_valid - 1)
        else:
            raise_for(extremes.tolist())
    if channels == 1:
        return PreparedTarget(labels=None, soft=labels.unsqueeze(1).float(), mask=mask)
    return PreparedTarget(labels=labels, soft=None, mask=mask)

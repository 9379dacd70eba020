"""The Jaccard-Dice-Tversky loss family for soft and hard labels: JML, DML and their Tversky generalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medjdt._deprecation import renamed_argument
from medjdt.losses._inputs import (
    DeferredChecks,
    PreparedTarget,
    check_activation,
    check_ignore_index,
    check_logits,
    check_p_variant,
    prepare_target,
)
from medjdt.losses.aggregation import class_mean, dataset_mean, image_mean, parse_aggregation
from medjdt.losses.cardinalities import _hard_cardinalities, _soft_cardinalities, target_max
from medjdt.losses.distributed import all_reduce_max, all_reduce_sum
from medjdt.losses.dtypes import compute_dtype
from medjdt.losses.fused import fused_sums
from medjdt.losses.tversky import tversky_loss
from medjdt.validation import check_choice, check_number

__all__ = ["DiceSemimetricLoss", "JDTLoss", "JaccardMetricLoss", "activate", "jdt_loss"]

ACTIVE_CLASSES = ("all", "present")
_DEFAULT_AGGREGATION = "dataset"
_DEFAULT_PRESENCE_THRESHOLD = 0.01
# Old argument names of JDTLoss and jdt_loss -> their new names (the old ones are deprecated).
_RENAMED = {"reduction": "aggregation", "threshold": "presence_threshold"}


def activate(logits: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Probabilities ``(B, C, *spatial)`` from logits of any floating dtype, in float32 (float64 stays float64).

    ``"softmax"`` over the channels, ``"sigmoid"`` per channel, None for inputs that already are
    probabilities. Autocast is disabled here so fp16/bf16 logits give float32 probabilities.
    """
    dtype = compute_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if activation == "softmax":
            return torch.softmax(logits, dim=1, dtype=dtype)
        if activation == "sigmoid":
            return torch.sigmoid(logits.to(dtype))
        return logits.to(dtype)


class JDTLoss(nn.Module):
    """Jaccard/Dice/Tversky loss that is correct for soft labels.

    Per class the loss is ``1 - T`` (or ``-log T``) with the Tversky index ``T = (TP + s) / (TP + alpha*FP +
    beta*FN + s)``; a class with neither prediction nor target and ``s = 0`` counts as a perfect match (T = 1).
    With ``alpha = beta = 1`` this is the Jaccard metric loss (JML), with ``alpha = beta = 0.5`` the Dice
    semimetric loss (DML). On hard labels both equal the classic soft Jaccard / soft Dice losses; on soft
    labels they are zero only where the prediction equals the target.

    Cardinalities (per image and class, over unmasked voxels, summed in float32, or float64 for float64 input):

    - ``variant=1``: ``TP = (|x|_p^p + |y|_p^p - |x - y|_p^p) / 2``, ``FP = |x|_p^p - TP``, ``FN = |y|_p^p - TP``.
    - ``variant=2`` (p = 1 only): ``TP = sum x*y``, ``FP = sum max(x - y, 0)``, ``FN = sum max(y - x, 0)``.

    Aggregations (how the per-image, per-class cardinalities become one value; not torch's ``reduction``):

    - ``"dataset"``: sum TP, FP, FN over the batch and voxels per class, then mean over active classes.
    - ``"image"``: per image, mean over its active classes, then mean over images that have one.
    - ``"class"``: per class, mean over the images where it is active, then mean over classes.
    - a dict of weights such as ``{"image": 0.5, "class": 0.5}`` sums the weighted aggregations.

    A class is active everywhere with ``active_classes="all"``; with ``"present"`` it is active where the
    largest target value over the aggregated dims exceeds ``presence_threshold`` (for the dataset aggregation:
    over the whole batch). Class means are weighted by ``class_weights``. If nothing is active the loss is 0, still
    attached to the graph.

    Distributed training: with ``sync_ranks=True`` and an initialised ``torch.distributed`` process group,
    the dataset aggregation sums the cardinalities over all ranks before forming the ratio (and agrees on the
    present classes over all ranks). Every rank then returns the same loss value, the one a single process
    gets on the concatenated batch. Gradient convention: on each rank the gradient with respect to its own
    logits is ``world_size`` times the full-batch gradient of those logits, so DDP's averaging of parameter
    gradients over ranks yields exactly the full-batch gradient. The image and class aggregations are computed
    per rank (DDP's averaging makes them a mean over ranks). The sync is a collective operation: call the loss
    on every rank, or pass ``sync_ranks=False`` where only some ranks compute it.

    Args:
        alpha: weight of FP, >= 0.
        beta: weight of FN, >= 0 (``alpha + beta > 0``).
        variant: 1 or 2, the cardinality formulas above.
        aggregation: ``"dataset"``, ``"image"``, ``"class"``, or a dict of non-negative weights over them.
        active_classes: ``"all"`` or ``"present"``.
        presence_threshold: a class is present where its largest target value exceeds this, in [0, 1).
        smooth: the smoothing term ``s`` >= 0, added to numerator and denominator.
        p: exponent of the Lp cardinalities, a finite number >= 1.
        log_loss: use ``-log T`` instead of ``1 - T``.
        gamma: per-class losses are raised to this power (focal form when > 1), > 0.
        class_weights: one non-negative weight per channel of the logits (C values), or None for equal weights.
        ignore_index: hard-label value whose voxels are excluded; does not apply to soft targets (use ``mask``).
        include_background: if False, channel 0 is left out of the loss (needs C >= 2).
        activation: ``"softmax"`` (multi-class), ``"sigmoid"`` (multi-label, or binary with one channel), or
            None when the input already holds probabilities in [0, 1].
        sync_ranks: sum the dataset cardinalities over ranks under ``torch.distributed``.
        fused: compute the cardinalities with the fused path of :mod:`medjdt.losses.fused` (default): the
            activation runs inside one autograd function that walks over the voxels in chunks (Triton kernels on
            CUDA), so no voxel-sized tensor besides the gradient is allocated. False selects the
            plain-torch reference path (activation, then :func:`soft_cardinalities` / :func:`hard_cardinalities`);
            the two agree to float rounding, also in their gradients.
        reduction: deprecated name of ``aggregation`` (``FutureWarning``).
        threshold: deprecated name of ``presence_threshold`` (``FutureWarning``).

    Inputs of :meth:`forward`:
        logits: ``(B, C, *spatial)`` floating, 2 or 3 spatial dims (probabilities if ``activation=None``).
        target: hard labels ``(B, *spatial)`` integer class indices in ``[0, C)`` (a {0, 1} foreground mask when
            C = 1), or soft labels ``(B, C, *spatial)`` floats in [0, 1]. Soft targets need not sum to 1 over
            channels (label smoothing and fusion produce sums of 1, but nothing else requires it).
        mask: optional ``(B, *spatial)`` bool, True for voxels that count; excluded voxels contribute nothing
            to any cardinality.

    Returns:
        A scalar tensor, float32 (float64 for float64 logits).

    Raises:
        ValueError: for bad arguments in ``__init__`` (also for a deprecated name given together with its new
            name), and in ``forward`` for shape or dtype mismatches, a wrong number of channels or class weights,
            soft targets outside [0, 1], class indices out of range, NaN/Inf logits, or probabilities outside
            [0, 1] (``activation=None``).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        variant: int = 1,
        aggregation: str | dict[str, float] = _DEFAULT_AGGREGATION,
        active_classes: str = "all",
        presence_threshold: float = _DEFAULT_PRESENCE_THRESHOLD,
        smooth: float = 1.0,
        p: float = 1,
        log_loss: bool = False,
        gamma: float = 1.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int | None = None,
        include_background: bool = True,
        activation: str | None = "softmax",
        sync_ranks: bool = True,
        fused: bool = True,
        *,
        reduction: str | dict[str, float] | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        # The warnings point at the line that built the loss, also through a preset's __init__. A new name left at
        # its default cannot be told from a new name not given, so only a new name with another value clashes.
        stacklevel = 3 if type(self).__init__ is JDTLoss.__init__ else 4
        aggregation = renamed_argument(
            where,
            "reduction",
            "aggregation",
            reduction,
            aggregation,
            new_given=aggregation != _DEFAULT_AGGREGATION,
            stacklevel=stacklevel,
        )
        presence_threshold = renamed_argument(
            where,
            "threshold",
            "presence_threshold",
            threshold,
            presence_threshold,
            new_given=presence_threshold != _DEFAULT_PRESENCE_THRESHOLD,
            stacklevel=stacklevel,
        )
        self.alpha = check_number("alpha", alpha, low=0, where=where)
        self.beta = check_number("beta", beta, low=0, where=where)
        if self.alpha + self.beta == 0:
            raise ValueError(f"{where}: alpha and beta must not both be 0 (the index would be constantly 1)")
        self.p, self.variant = check_p_variant(p, variant, where=where)
        self.aggregation = parse_aggregation(aggregation, where=where)
        self.active_classes = check_choice("active_classes", active_classes, ACTIVE_CLASSES, where=where)
        # at 1 or above no class could be present
        self.presence_threshold = check_number(
            "presence_threshold", presence_threshold, low=0, high=1, high_inclusive=False, where=where
        )
        self.smooth = check_number("smooth", smooth, low=0, where=where)
        self.log_loss = bool(log_loss)
        self.gamma = check_number("gamma", gamma, low=0, low_inclusive=False, where=where)
        self.ignore_index = check_ignore_index(ignore_index, where=where)
        self.include_background = bool(include_background)
        self.activation = check_activation(activation, where=where)
        self.sync_ranks = bool(sync_ranks)
        self.fused = bool(fused)
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if weights.ndim != 1 or weights.numel() == 0:
                raise ValueError(
                    f"{where}: class_weights must be a non-empty 1-D sequence, got shape {tuple(weights.shape)}"
                )
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(f"{where}: class_weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
        self.register_buffer("class_weights", weights, persistent=False)
        self._deferred = DeferredChecks()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of ``logits`` ``(B, C, *spatial)`` against ``target`` (see the class docstring) -> scalar.

        On an accelerator the value checks of the inputs are deferred (see :meth:`flush_checks`).
        """
        deferred = self._deferred.for_inputs(logits)
        logit_range = check_logits(logits, self.activation, deferred)
        prepared = prepare_target(logits, target, mask, self.ignore_index, deferred)
        return self._forward_checked(logits, prepared, logit_range)

    def flush_checks(self) -> None:
        """Wait for the deferred value checks of earlier calls on an accelerator; ``ValueError`` if one failed.

        On an accelerator, each call checks its inputs (NaN/Inf logits, values outside [0, 1], class indices out
        of range) without waiting for the device, and reports a failure on a later call; this reports it now.
        """
        self._deferred.flush()

    def _forward_checked(
        self, logits: torch.Tensor, prepared: PreparedTarget, logit_range: tuple[float, float] | None
    ) -> torch.Tensor:
        """:meth:`forward` on inputs checked by :func:`check_logits` and :func:`prepare_target`."""
        channels = logits.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != channels:
            raise ValueError(
                f"class_weights has {self.class_weights.numel()} values but logits have {channels} channels"
            )
        if not self.include_background and channels < 2:
            raise ValueError(f"include_background=False needs at least 2 channels, got logits {tuple(logits.shape)}")

        if self.fused:
            tp, fp, fn, count = fused_sums(logits, prepared, self.activation, self.p, self.variant, logit_range)
        else:
            probs = activate(logits, self.activation)
            if prepared.labels is not None:
                tp, fp, fn, count = _hard_cardinalities(probs, prepared.labels, prepared.mask, self.p)
            else:
                tp, fp, fn = _soft_cardinalities(probs, prepared.soft, prepared.mask, self.p, self.variant)
                count = None
        present = None
        if self.active_classes == "present":
            if prepared.labels is not None:
                present = (count > 0).to(tp.dtype)  # the largest one-hot value: 1 where the class occurs
            else:
                present = target_max(prepared.soft, prepared.mask)
        return self._reduce(tp, fp, fn, present)

    def _loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, active: torch.Tensor | None):
        if active is not None:
            # inactive entries get a perfect score so that they stay finite (and gradient-free) for any settings
            tp, fp, fn = torch.where(active, tp, 1.0), torch.where(active, fp, 0.0), torch.where(active, fn, 0.0)
        return tversky_loss(tp, fp, fn, self.alpha, self.beta, self.smooth, self.log_loss, self.gamma)

    def _reduce(
        self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, present: torch.Tensor | None
    ) -> torch.Tensor:
        """Combine ``(B, C)`` cardinalities (and the ``(B, C)`` largest target values) into the scalar loss."""
        class_weights = self.class_weights
        if class_weights is None:
            class_weights = tp.new_ones(tp.shape[1])
        if not self.include_background:
            tp, fp, fn, class_weights = tp[:, 1:], fp[:, 1:], fn[:, 1:], class_weights[1:]
            present = None if present is None else present[:, 1:]
        class_weights = class_weights.to(tp)

        total = tp.new_zeros(())
        for name, weight in self.aggregation.items():
            if name == "dataset":
                sums = torch.stack([tp.sum(0), fp.sum(0), fn.sum(0)])
                largest = None if present is None else present.amax(0)
                if self.sync_ranks:
                    sums = all_reduce_sum(sums)
                    largest = None if largest is None else all_reduce_max(largest)
                active = None if largest is None else largest > self.presence_threshold
                losses = self._loss(sums[0], sums[1], sums[2], active)
                weights = class_weights if active is None else class_weights * active
                value = dataset_mean(losses, weights)
            else:
                active = None if present is None else present > self.presence_threshold
                losses = self._loss(tp, fp, fn, active)
                if active is None:
                    active = torch.ones_like(tp, dtype=torch.bool)
                if name == "image":
                    value = image_mean(losses, class_weights * active)
                else:
                    value = class_mean(losses, active, class_weights)
            total = total + weight * value
        return total


class JaccardMetricLoss(JDTLoss):
    """Jaccard metric loss (JML): :class:`JDTLoss` with ``alpha = beta = 1``; takes its other arguments."""

    def __init__(self, **kwargs) -> None:
        super().__init__(alpha=1.0, beta=1.0, **kwargs)


class DiceSemimetricLoss(JDTLoss):
    """Dice semimetric loss (DML): :class:`JDTLoss` with ``alpha = beta = 0.5``; takes its other arguments."""

    def __init__(self, **kwargs) -> None:
        super().__init__(alpha=0.5, beta=0.5, **kwargs)


def jdt_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Functional :class:`JDTLoss` on probabilities, e.g. a student's softmax against a teacher's.

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1], 2 or 3 spatial dims.
        target: hard labels ``(B, *spatial)`` or soft labels ``(B, C, *spatial)`` in [0, 1].
        mask: optional ``(B, *spatial)`` bool, True for voxels that count.
        **options: any :class:`JDTLoss` argument except ``activation`` (``alpha``, ``beta``, ``aggregation``...);
            the deprecated names ``reduction`` and ``threshold`` warn as in :class:`JDTLoss`.

    Returns:
        A scalar tensor (float32, or float64 for float64 input), differentiable with respect to ``probs`` (and a
        soft ``target``).
    """
    if "activation" in options:
        raise ValueError("jdt_loss takes probabilities; use JDTLoss(activation=...) for logits")
    for old, new in _RENAMED.items():
        old_value = options.pop(old, None)
        if old_value is not None:
            options[new] = renamed_argument("jdt_loss", old, new, old_value, options.get(new), new_given=new in options)
    return JDTLoss(activation=None, **options)(probs, target, mask)

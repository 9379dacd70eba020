"""Semi-supervised training with a mean teacher and soft pseudo-labels: :class:`SemiSupervisedModule`.

The teacher is an exponential moving average (EMA) of the student's weights, updated after every optimiser
step. On each unlabelled patch the teacher sees a weakly augmented view and the student a strongly augmented
view of the same voxels (the data module shares the spatial transform, see
:func:`medjdt.data.transforms.unlabelled_transform`). The teacher's *soft* prediction is the target, never
hardened into a pseudo-mask; the student learns it with losses that are correct for soft targets:

    unlabelled loss = T**2 * KL(p || q) + JDT(q, p),   p = softmax(teacher / T),  q = softmax(student / T)

(:func:`medjdt.labels.distillation_loss`, the distillation loss of :class:`~medjdt.models.module.SegmentationModule`,
with its configured JML/DML), over the voxels where the teacher is confident (optional). The training loss is

    labelled loss + unlabelled_weight * rampup(epoch) * unlabelled loss

with the sigmoid ramp-up ``exp(-5 (1 - t)**2)`` over the first ``rampup_epochs`` epochs.

The JML/DML cardinalities are L1 norms, whose gradient does not fade as the student approaches the teacher, so
the unlabelled term pins the student to the teacher firmly. Early in training the teacher is immature: a
high ``unlabelled_weight`` reached after a short ramp-up can freeze both in an underconfident state (on the
demo phantoms weight 1.0 after 20 of 100 epochs did; 0.3 over 50 epochs did not). Ramp up over a large part
of the run.

Configuration: the LightningCLI's model class is :class:`SemiSupervisedModule`; without ``model.semi`` it is
exactly a :class:`SegmentationModule`, so existing ``model:`` configs are unchanged. Semi-supervised runs set
``model.semi`` (a :class:`MeanTeacherSpec`) and ``data.unlabelled_ratio > 0`` (a manifest with unlabelled
cases, see ``data_manifests/README.md``); either one without the other is an error at the start of ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch.optim.swa_utils import AveragedModel

from medjdt.labels import distillation_loss
from medjdt.models.module import SegmentationModule
from medjdt.models.networks import deep_supervision_heads
from medjdt.validation import check_choice, check_number

__all__ = ["EMADecay", "MeanTeacherSpec", "SemiSupervisedModule", "sigmoid_rampup"]

EVALUATE = ("student", "teacher")


@dataclass(frozen=True)
class MeanTeacherSpec:
    """Mean-teacher settings (``model.semi`` in a config).

    Attributes:
        ema_decay: EMA decay of the teacher's weights, in [0, 1). Update ``k`` (0-based) uses
            ``min(ema_decay, 1 - 1/(k+1))``: the teacher is the plain mean of the student's iterates until that
            reaches ``ema_decay`` (the first update copies the student).
        temperature: softening temperature ``T > 0`` of teacher and student in the unlabelled loss.
        unlabelled_weight: weight of the unlabelled loss once ramped up, >= 0.
        rampup_epochs: length of the sigmoid ramp-up of the unlabelled weight, in (fractional) epochs, >= 0
            (0: full weight from the first step).
        confidence_threshold: voxels where the teacher's largest class probability (at ``T = 1``) is below
            this are left out of the unlabelled loss, in [0, 1) (0: every voxel counts).
        evaluate: the network that validation, test and prediction run: ``"student"`` or ``"teacher"``.
    """

    ema_decay: float = 0.99
    temperature: float = 1.0
    unlabelled_weight: float = 0.3
    rampup_epochs: float = 20.0
    confidence_threshold: float = 0.0
    evaluate: Literal["student", "teacher"] = "student"

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | MeanTeacherSpec) -> MeanTeacherSpec:
        """Validated settings from a mapping (a checkpoint's hyper-parameters) or another spec."""
        if isinstance(spec, MeanTeacherSpec):
            spec = asdict(spec)
        if not isinstance(spec, Mapping):
            raise ValueError(f"semi must be a mapping of mean-teacher settings, got {spec!r}")
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"semi has unknown keys {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        out = cls(**spec)
        return cls(
            ema_decay=check_number("semi.ema_decay", out.ema_decay, low=0, high=1, high_inclusive=False),
            temperature=check_number("semi.temperature", out.temperature, low=0, low_inclusive=False),
            unlabelled_weight=check_number("semi.unlabelled_weight", out.unlabelled_weight, low=0),
            rampup_epochs=check_number("semi.rampup_epochs", out.rampup_epochs, low=0),
            confidence_threshold=check_number(
                "semi.confidence_threshold", out.confidence_threshold, low=0, high=1, high_inclusive=False
            ),
            evaluate=check_choice("semi.evaluate", out.evaluate, EVALUATE),
        )


def sigmoid_rampup(progress: float, length: float) -> float:
    """Ramp-up factor ``exp(-5 (1 - t)**2)`` with ``t = clip(progress / length, 0, 1)``; 1 when ``length == 0``.

    ``progress`` and ``length`` are in the same unit (epochs here). The factor is ``exp(-5)`` at the start and
    reaches 1 at ``progress = length``.
    """
    length = check_number("length", length, low=0, where="sigmoid_rampup")
    if length == 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class EMADecay:
    """``multi_avg_fn`` of :class:`torch.optim.swa_utils.AveragedModel`: ``avg <- d * avg + (1 - d) * current``.

    ``d = min(decay, 1 - 1/(n+1))`` where ``n`` is the number of updates so far (``AveragedModel`` copies the
    model on update 0 itself, which is ``d = 0``).
    """

    def __init__(self, decay: float):
        self.decay = float(decay)

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        decay = min(self.decay, 1.0 - 1.0 / (int(n_averaged) + 1))
        for avg, cur in zip(averaged, current, strict=True):
            avg.lerp_(cur, 1.0 - decay)


class SemiSupervisedModule(SegmentationModule):
    """:class:`SegmentationModule` plus mean-teacher training on unlabelled patches (see the module docstring).

    Args:
        network: as for :class:`SegmentationModule`.
        semi: mean-teacher settings (:class:`MeanTeacherSpec`, in YAML a mapping under ``model.semi``); ``None``
            (default) trains exactly like :class:`SegmentationModule`.
        **kwargs: every other :class:`SegmentationModule` argument.

    Training batches with ``semi``: ``{"labelled": {"image": (B, K, *patch), "label": (B, C, *patch)},
    "unlabelled": {"weak": (U, K, *patch), "strong": (U, K, *patch)}}`` (``SegmentationDataModule`` with
    ``unlabelled_ratio > 0``).

    The EMA teacher is the submodule ``ema_teacher`` (a :class:`torch.optim.swa_utils.AveragedModel` of
    ``network``): it is saved in checkpoints (so resuming continues it), is not optimised, always runs in
    eval mode (Lightning's notice about modules in eval mode at the start of training refers to it) and
    without gradients, and is updated after every optimiser step. Training logs, besides the
    labelled terms, ``train/labelled_loss``, ``train/unlabelled_kl``, ``train/unlabelled_jdt``,
    ``train/unlabelled_weight`` (the ramped weight) and ``train/confident_fraction``.

    Raises:
        ValueError: bad ``semi`` settings, a JDT loss without softmax activation, or (at the start of ``fit``)
            ``semi`` without ``data.unlabelled_ratio > 0`` or the reverse; anything :class:`SegmentationModule`
            raises.
    """

    def __init__(self, network: torch.nn.Module, *, semi: MeanTeacherSpec | None = None, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.semi = None if semi is None else MeanTeacherSpec.from_mapping(semi)
        if self.semi is None:
            # a checkpoint without mean teacher loads as a plain SegmentationModule too
            self.hparams.pop("semi", None)
            return
        self.hparams["semi"] = asdict(self.semi)
        if self.loss.jdt.activation != "softmax":
            raise ValueError(
                f"model.semi needs a JDT loss with softmax activation, got {self.loss.jdt.activation!r}"
            )
        self.ema_teacher = AveragedModel(self.network, multi_avg_fn=EMADecay(self.semi.ema_decay))
        self.ema_teacher.requires_grad_(False)
        self.ema_teacher.eval()

    @property
    def teacher_network(self) -> torch.nn.Module | None:
        """The EMA teacher network (same architecture as ``network``), or None without ``semi``."""
        return self.ema_teacher.module if self.semi is not None else None

    def update_teacher(self) -> None:
        """One EMA step of the teacher towards the student's current weights (see :class:`MeanTeacherSpec`)."""
        if self.semi is None:
            raise ValueError("update_teacher() needs model.semi")
        self.ema_teacher.update_parameters(self.network)

    def train(self, mode: bool = True) -> SemiSupervisedModule:
        """Set training mode; the EMA teacher stays in eval mode (it is never trained)."""
        super().train(mode)
        if self.semi is not None:
            self.ema_teacher.eval()
        return self

    def _inference_network(self) -> torch.nn.Module:
        if self.semi is not None and self.semi.evaluate == "teacher":
            return self.ema_teacher.module
        return self.network

    def on_fit_start(self) -> None:
        """Check that the data module delivers unlabelled batches exactly when ``semi`` is set."""
        ratio = getattr(self.trainer.datamodule, "unlabelled_ratio", None)
        if ratio is None:
            return
        if self.semi is not None and ratio == 0:
            raise ValueError(
                "model.semi is set but data.unlabelled_ratio is 0: set data.unlabelled_ratio > 0 (with unlabelled "
                "cases in the manifest's training folds), or remove model.semi to train on labelled cases only"
            )
        if self.semi is None and ratio > 0:
            raise ValueError(
                f"data.unlabelled_ratio is {ratio} but model.semi is not set: set model.semi (mean-teacher "
                "settings) or data.unlabelled_ratio: 0"
            )

    def _rampup_progress(self, batch_idx: int) -> float:
        """Training progress in (fractional) epochs."""
        trainer = self._trainer
        if trainer is None:
            return 0.0
        batches = trainer.num_training_batches
        fraction = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        return trainer.current_epoch + fraction

    def _unlabelled_loss(
        self, weak: torch.Tensor, strong: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Consistency loss of the student on ``strong`` against the teacher on ``weak`` (``(U, K, *patch)`` each)."""
        if weak.shape != strong.shape:
            raise ValueError(f"weak view {tuple(weak.shape)} and strong view {tuple(strong.shape)} differ")
        with torch.no_grad():
            teacher_logits = self.ema_teacher.module(weak)
        student_logits, _ = deep_supervision_heads(self.network, self.network(strong))
        total, parts = distillation_loss(
            student_logits,
            teacher_logits,
            self.loss.jdt,
            temperature=self.semi.temperature,
            confidence_threshold=self.semi.confidence_threshold,
        )
        return total, {
            "unlabelled_kl": parts["kl"],
            "unlabelled_jdt": parts["jdt"],
            "confident_fraction": parts["confident_fraction"],
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.semi is None:
            if "unlabelled" in batch:
                raise ValueError("the training batch has unlabelled views but model.semi is not set")
            return super().training_step(batch, batch_idx)
        if set(batch) != {"labelled", "unlabelled"}:
            raise ValueError(
                f"model.semi needs training batches {{'labelled', 'unlabelled'}} (data.unlabelled_ratio > 0), "
                f"got keys {sorted(batch)}"
            )
        labelled, unlabelled = batch["labelled"], batch["unlabelled"]
        loss, parts = self._labelled_loss(labelled)
        u_loss, u_parts = self._unlabelled_loss(unlabelled["weak"], unlabelled["strong"])
        weight = self.semi.unlabelled_weight * sigmoid_rampup(self._rampup_progress(batch_idx), self.semi.rampup_epochs)
        total = loss + weight * u_loss
        parts = {**parts, "labelled_loss": loss.detach(), **u_parts, "unlabelled_weight": float(weight)}
        self._log_training(total, parts, labelled["image"].shape[0])
        return total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then (with ``semi``) one EMA update of the teacher."""
        super().optimizer_step(*args, **kwargs)
        if self.semi is not None:
            self.update_teacher()

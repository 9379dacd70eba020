"""``SegmentationModule``: a MONAI network trained on fused soft targets with CE + JML/DML.

The module holds the network, the loss and the step logic only; data comes from
:class:`medjdt.data.SegmentationDataModule`. Every setting is a typed ``__init__`` argument so
LightningCLI exposes it in YAML.

Batches (see the data module):
    train: ``image`` (B, 1, *patch) float, ``label`` (B, C, *patch) float soft target.
    val/test: ``image`` (1, 1, *spatial), ``raters`` (1, R, *spatial) int, ``case_id`` [str].
    predict: ``image`` (1, 1, *spatial), ``case_id`` [str].

Logged metrics (validation prefix ``val/``, test prefix ``test/``), on the preprocessed grid. A name without
suffix is a mean over cases (per case first, then the mean over cases); ``_pooled`` is pooled over every voxel of
every case. Overlap scores are means over the foreground classes present in the case's reference (a class absent
from the reference is left out, see :mod:`medjdt.metrics.overlap`):
    ``dice``, ``iou``: hard Dice/IoU of the argmax against the raters' majority vote.
    ``soft_dice``, ``thresholded_dice``: against the mean of the raters (soft reference).
    ``ece``, ``brier``, ``nll``: calibration against the mean of the raters; ``ece_pooled``, ``brier_pooled``,
    ``nll_pooled`` the same pooled over voxels.
    ``ece_majority``, ``brier_majority``: calibration against the majority vote.
    ``absent_fp_voxels``: voxels predicted as a class the majority vote lacks (mean per case).
    ``dice/<class>``, ``soft_dice/<class>``: per-class values (means over the cases where the class is present).
The metric objects keep each evaluation's per-case values until the next one begins (:meth:`evaluation_metrics`);
the callback :class:`~medjdt.models.EvaluationTables` writes them to ``<stage>_per_case.csv`` and
``<stage>_reliability.csv``.
Training logs ``train/loss`` and its parts (``train/ce``, ``train/jdt``, and the teacher terms).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from medjdt.labels import distillation_loss, fuse
from medjdt.losses import DiceSemimetricLoss, SegmentationLoss
from medjdt.metrics import SegmentationMetrics
from medjdt.models.networks import build_network, deep_supervision_heads, network_channels
from medjdt.models.schedules import SCHEDULES, Schedule, adamw_with_schedule
from medjdt.models.specs import instantiate
from medjdt.models.teacher import TeacherSpec, load_teacher
from medjdt.models.tta import TTA_CHOICES, tta_prediction
from medjdt.validation import check_choice, check_number

__all__ = ["SegmentationModule"]

REFERENCES = ("majority", "mean")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor view of a MONAI MetaTensor (its geometry metadata is not needed past the data module)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class SegmentationModule(pl.LightningModule):
    """Soft-label segmentation training, validation, test and prediction.

    Args:
        network: the network, ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)`` logits; in YAML
            ``{class_path: monai.networks.nets.UNet, init_args: {...}}`` (MONAI UNet, DynUNet, SegResNet, ... or
            any ``nn.Module``). From Python a spec dict is accepted too (short MONAI names allowed); the spec is
            kept in the checkpoint so teachers and predictions rebuild the network from it. MONAI
            ``DynUNet(deep_supervision=True)`` is supported: each head is trained against the soft target
            downsampled with area interpolation, weighted ``1/2**i`` (normalised).
        ce_weight: weight of the soft-target cross-entropy.
        jdt_weight: weight of the JDT (Jaccard/Dice) loss.
        jdt: the JDT loss module, e.g. ``{class_path: medjdt.losses.JaccardMetricLoss, init_args: {...}}``
            (default ``DiceSemimetricLoss()``).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of all optimiser steps spent in linear warm-up.
        schedule: decay after warm-up: ``poly`` (power 0.9), ``cosine`` or ``constant``.
        roi_size: sliding-window size for whole-volume inference (default: the training patch size, linked by
            the CLI; required otherwise).
        sw_batch_size: windows per forward pass in sliding-window inference.
        overlap: sliding-window overlap in [0, 1).
        blend_mode: ``gaussian`` or ``constant`` window blending.
        teacher: distillation settings ``{checkpoint, temperature, label_weight, teacher_weight}`` (see
            :class:`medjdt.models.teacher.TeacherSpec`); ``None`` trains without a teacher.
        class_names: names of the C classes (background first), used in metric names and CSV columns.
        ece_bins: number of equal-width confidence bins for ECE and reliability diagrams.
        temperature: post-hoc temperature scaling of whole-volume inference (validation, test, prediction):
            probabilities are ``softmax(logits / T)``; ``None`` (default) means ``T = 1``. Training is never
            scaled. ``"auto"`` is resolved by the command line (``validate``/``test``/``predict --ckpt_path X
            --model.temperature auto``) to the temperature fitted on the validation fold of the run that made
            ``X`` (see :mod:`medjdt.models.temperature`).
        tta: test-time augmentation of whole-volume inference: ``"flips"`` averages the (temperature-scaled)
            probabilities over the ``2**D`` flips of the spatial axes (:mod:`medjdt.models.tta`, as nnU-Net);
            ``None`` or ``"none"`` (default) predicts once. Training is never augmented this way.

    Raises:
        ValueError: unknown network or loss, bad weights, a missing or mismatched teacher checkpoint, a temperature
            that is not a positive finite number.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        ce_weight: float = 0.25,
        jdt_weight: float = 0.75,
        jdt: torch.nn.Module | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        warmup_fraction: float = 0.05,
        schedule: Schedule = "poly",
        roi_size: list[int] | None = None,
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        blend_mode: Literal["gaussian", "constant"] = "gaussian",
        teacher: TeacherSpec | None = None,
        class_names: list[str] | None = None,
        ece_bins: int = 15,
        temperature: float | Literal["auto"] | None = None,
        tta: Literal["none", "flips"] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if temperature == "auto":
            raise ValueError(
                "model.temperature 'auto' is resolved by medjdt validate/test/predict --ckpt_path (fitted on the "
                "run's validation fold); give a number here, e.g. from medjdt.models.temperature.fit_temperature"
            )
        self.temperature = (
            None if temperature is None else check_number("model.temperature", temperature, low=0, low_inclusive=False)
        )
        self.tta = check_choice("model.tta", tta, TTA_CHOICES)
        check_number("model.lr", lr, low=0, low_inclusive=False)
        check_number("model.weight_decay", weight_decay, low=0)
        check_number("model.warmup_fraction", warmup_fraction, low=0, high=1, high_inclusive=False)
        check_choice("model.schedule", schedule, SCHEDULES)
        check_number("model.sw_batch_size", sw_batch_size, low=1, integer=True)
        check_number("model.overlap", overlap, low=0, high=1, high_inclusive=False)
        check_choice("model.blend_mode", blend_mode, ("gaussian", "constant"))
        self.network, network_spec = self._network_and_spec(network)
        self.in_channels, self.num_classes = self._channels(self.network, network_spec)
        if self.num_classes < 2:
            raise ValueError(f"network out_channels must be >= 2 (background + classes), got {self.num_classes}")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"network out_channels={self.num_classes} disagrees with the {len(class_names)} classes "
                f"{list(class_names)} of the dataset (manifest)"
            )
        self.class_names = list(class_names) if class_names else [f"class{c}" for c in range(self.num_classes)]
        if isinstance(jdt, Mapping):
            jdt = instantiate(jdt, torch.nn.Module, "jdt loss", short_prefix="medjdt.losses")
        elif jdt is None:
            jdt = DiceSemimetricLoss()
        if isinstance(self.hparams.get("jdt"), torch.nn.Module):
            self.hparams.pop("jdt")  # a built loss is not pickled into the hyper-parameters
        self.loss = SegmentationLoss(ce_weight=ce_weight, jdt_weight=jdt_weight, jdt=jdt)
        self.teacher_spec = None if teacher is None else TeacherSpec.from_mapping(teacher)
        # The teacher is kept outside the module tree: it is frozen, not part of the student's checkpoint,
        # and moved to the student's device on first use.
        self._teacher: tuple[torch.nn.Module, ...] = ()
        if self.teacher_spec is not None:
            self.hparams["teacher"] = asdict(self.teacher_spec)
            if self.loss.jdt.activation != "softmax":
                raise ValueError(
                    f"model.teacher needs a JDT loss with softmax activation, got {self.loss.jdt.activation!r}"
                )
            self._teacher = (load_teacher(self.teacher_spec.checkpoint, self.num_classes, self.in_channels),)
        # {"stage", "epoch", "step"} of the latest validation or test (read by the command line's summary)
        self.last_evaluation: dict[str, Any] | None = None
        # one object per stage and reference: calibration and overlap are summed in one pass over each volume
        self.val_metrics = self._metric_set(ece_bins)
        self.test_metrics = self._metric_set(ece_bins)

    def _metric_set(self, ece_bins: int) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict(
            {
                reference: SegmentationMetrics(self.num_classes, n_bins=ece_bins, class_names=self.class_names)
                for reference in REFERENCES
            }
        )

    def _network_and_spec(self, network: torch.nn.Module | Mapping[str, Any]) -> tuple[torch.nn.Module, Any]:
        """The network module and its ``class_path`` spec (None when only a built module was given).

        Under LightningCLI the saved hyper-parameters hold the config's spec; in Python a spec dict may be
        passed directly. Either way the spec stays in the checkpoint so the network can be rebuilt from it
        (teachers, prediction). A bare module cannot be rebuilt and is not pickled into the hyper-parameters.
        """
        if isinstance(network, Mapping):
            return build_network(network), dict(network)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"network must be a torch.nn.Module or a class_path spec, got {type(network).__name__}")
        spec = self.hparams.get("network")
        if isinstance(spec, Mapping):
            return network, dict(spec)
        self.hparams.pop("network", None)
        return network, None

    @staticmethod
    def _channels(network: torch.nn.Module, spec: Any) -> tuple[int, int]:
        if spec is not None:
            in_channels, out_channels, _ = network_channels(spec)
            return in_channels, out_channels
        try:
            return int(network.in_channels), int(network.out_channels)
        except AttributeError as err:
            raise ValueError(
                f"cannot tell the channels of {type(network).__name__}: pass the network as a class_path spec"
            ) from err

    # ------------------------------------------------------------------ forward / inference
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *spatial)`` for ``image`` ``(B, in_channels, *spatial)`` (one forward pass)."""
        return self.network(image)

    def _inference_network(self) -> torch.nn.Module:
        """The network that validation, test and prediction run (subclasses may choose another one)."""
        return self.network

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window probabilities ``softmax(logits / T)`` ``(B, C, *spatial)`` (float32) for a whole volume
        ``(B, K, *spatial)``; ``T`` is ``temperature`` (1 when None). With ``tta="flips"``, their mean over the
        flips of the spatial axes (:func:`medjdt.models.tta.flip_averaged`)."""
        scale = 1.0 if self.temperature is None else self.temperature
        return tta_prediction(lambda x: torch.softmax(self.infer_logits(x) / scale, dim=1), image, self.tta)

    def infer_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``(B, C, *spatial)`` (float32, unscaled) for a whole volume ``(B, K, *spatial)``."""
        roi = self.hparams.roi_size
        if roi is None:
            raise ValueError("model.roi_size is not set (the CLI links it to data.patch_size)")
        if len(roi) != image.dim() - 2:
            raise ValueError(f"roi_size {roi} does not match the {image.dim() - 2}-D image {tuple(image.shape)}")
        logits = sliding_window_inference(
            image,
            roi_size=list(roi),
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=self._inference_network(),
            overlap=self.hparams.overlap,
            mode=self.hparams.blend_mode,
        )
        return torch.as_tensor(logits).float()

    # ------------------------------------------------------------------ training
    def _supervised_loss(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, heads = deep_supervision_heads(self.network, output)
        # no float32 copy of half-precision logits: both terms compute in float32 inside (the fused JDT kernels
        # read the half-precision values directly)
        total, parts = self.loss(logits, target)
        if not heads:
            return total, parts
        # nnU-Net weighting: 1, 1/2, 1/4, ... normalised; soft targets are downsampled by area averaging so
        # they stay probability vectors (nearest would turn them into a random sample of the voxels).
        weights = [1.0] + [0.5 ** (i + 1) for i in range(len(heads))]
        total = total * weights[0]
        for w, head in zip(weights[1:], heads):
            small = F.interpolate(target, size=head.shape[2:], mode="area")
            head_total, _ = self.loss(head, small)
            total = total + w * head_total
        return total / sum(weights), parts

    def _teacher_loss(self, logits: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Distillation term of ``logits`` ``(B, C, *patch)`` against the frozen teacher on ``image``."""
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != image.device:
            teacher.to(image.device)
        with torch.no_grad():
            teacher_logits = teacher(image)
        total, parts = distillation_loss(logits, teacher_logits, self.loss.jdt, self.teacher_spec.temperature)
        return total, {"kd_kl": parts["kl"], "kd_jdt": parts["jdt"]}

    def _labelled_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss on a labelled batch ``{"image": (B, K, *patch), "label": (B, C, *patch)}`` and its logged parts."""
        image, target = batch["image"], batch["label"]
        output = self.network(image)
        loss, parts = self._supervised_loss(output, target.float())
        if self.teacher_spec is not None:
            logits, _ = deep_supervision_heads(self.network, output)
            kd_total, kd_parts = self._teacher_loss(logits, image)
            loss = self.teacher_spec.label_weight * loss + self.teacher_spec.teacher_weight * kd_total
            parts = {**parts, **kd_parts}
        return loss, parts

    def _log_training(self, loss: torch.Tensor, parts: Mapping[str, Any], batch_size: int) -> None:
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=False)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self._labelled_loss(batch)
        self._log_training(loss, parts, batch["image"].shape[0])
        return loss

    # ------------------------------------------------------------------ validation / test
    def evaluation_metrics(self, stage: str) -> Mapping[str, SegmentationMetrics]:
        """The metrics of ``stage`` (``"val"`` or ``"test"``) against each reference: ``{"majority": ...,
        "mean": ...}``. They hold the latest evaluation of that stage until the next one begins (read by
        :class:`~medjdt.models.EvaluationTables` when an evaluation ends)."""
        return {"val": self.val_metrics, "test": self.test_metrics}[check_choice("stage", stage, ("val", "test"))]

    def _references(self, raters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean soft reference ``(1, C, *spatial)`` and majority hard reference ``(1, *spatial)`` of ``(R, *sp)``."""
        soft = fuse(raters, "mean", self.num_classes).to(raters.device)
        hard = fuse(raters, "majority", self.num_classes).argmax(0).to(raters.device)
        return soft[None], hard[None]

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        image, raters, case_ids = batch["image"], batch["raters"], list(batch["case_id"])
        if image.shape[0] != 1 or raters.shape[0] != 1:
            raise ValueError(f"{stage} batches must hold one whole volume, got image {tuple(image.shape)}")
        probs = self.infer(_plain(image))
        soft, hard = self._references(_plain(raters)[0].long())
        metrics = self.evaluation_metrics(stage)
        metrics["majority"].update(probs, hard, case_ids=case_ids)
        metrics["mean"].update(probs, soft, case_ids=case_ids)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _summary(self, stage: str) -> dict[str, torch.Tensor]:
        hard = self.evaluation_metrics(stage)["majority"].compute()
        soft = self.evaluation_metrics(stage)["mean"].compute()
        out = {
            "dice": hard["dice"],
            "iou": hard["iou"],
            "soft_dice": soft["soft_dice"],
            "thresholded_dice": soft["thresholded_dice"],
            "ece": soft["ece"],
            "brier": soft["brier"],
            "nll": soft["nll"],
            "ece_pooled": soft["ece_D"],
            "brier_pooled": soft["brier_D"],
            "nll_pooled": soft["nll_D"],
            "ece_majority": hard["ece"],
            "brier_majority": hard["brier"],
            "absent_fp_voxels": hard["absent_fp_voxels"],
        }
        for name in self.class_names[1:]:
            out[f"dice/{name}"] = hard[f"dice/{name}"]
            out[f"soft_dice/{name}"] = soft[f"soft_dice/{name}"]
        return out

    def _start_of_evaluation(self, stage: str) -> None:
        for metric in self.evaluation_metrics(stage).values():
            metric.reset()

    def _end_of_evaluation(self, stage: str) -> None:
        for name, value in self._summary(stage).items():
            main = name in ("dice", "soft_dice", "ece", "brier")
            self.log(f"{stage}/{name}", value, prog_bar=main, sync_dist=False, rank_zero_only=False)
        if not self.trainer.sanity_checking:
            self.last_evaluation = {"stage": stage, "epoch": self.current_epoch, "step": self.global_step}

    def on_train_epoch_end(self) -> None:
        # On an accelerator the losses check their inputs without waiting for the device and report a bad batch
        # (NaN logits, a soft target outside [0, 1]...) a few steps later; by the end of its epoch at the latest.
        self.loss.flush_checks()

    def on_validation_epoch_start(self) -> None:
        self._start_of_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_of_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        self._end_of_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_of_evaluation("test")

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Probabilities ``(1, C, *spatial)`` on the preprocessed grid, with the batch's image and case id."""
        probs = self.infer(_plain(batch["image"]))
        return {"probs": probs, "image": batch["image"], "case_id": list(batch["case_id"])}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with warm-up and ``schedule`` over the trainer's estimated optimiser steps (see
        :func:`~medjdt.models.schedules.adamw_with_schedule`)."""
        trainer = self._trainer
        h = self.hparams
        return adamw_with_schedule(
            self.network.parameters(),
            lr=h.lr,
            weight_decay=h.weight_decay,
            warmup_fraction=h.warmup_fraction,
            schedule=h.schedule,
            total_steps=float(trainer.estimated_stepping_batches) if trainer is not None else 1.0,
        )

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen teacher network, or None."""
        return self._teacher[0] if self._teacher else None

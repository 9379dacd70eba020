"""Frozen teacher networks for knowledge distillation, loaded from medjdt checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medjdt.models.checkpoints import read_checkpoint
from medjdt.models.networks import build_network, network_channels
from medjdt.validation import check_number

__all__ = ["TeacherSpec", "load_teacher"]


@dataclass(frozen=True)
class TeacherSpec:
    """Distillation settings (``model.teacher`` in a config).

    The student loss is ``label_weight * (CE + JDT on the fused target)
    + teacher_weight * (T**2 * KL + JDT on softmax(teacher_logits / T))`` (the second term is
    :func:`medjdt.labels.distillation_loss`).
    """

    checkpoint: str
    temperature: float = 1.0
    label_weight: float = 0.5
    teacher_weight: float = 0.5

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | TeacherSpec) -> TeacherSpec:
        """Validated settings from a mapping (a checkpoint's hyper-parameters) or another spec."""
        if isinstance(spec, TeacherSpec):
            spec = asdict(spec)
        if not isinstance(spec, Mapping) or "checkpoint" not in spec:
            raise ValueError(f"teacher must be a mapping with at least 'checkpoint', got {spec!r}")
        unknown = set(spec) - {"checkpoint", "temperature", "label_weight", "teacher_weight"}
        if unknown:
            raise ValueError(f"teacher has unknown keys {sorted(unknown)}")
        out = cls(**spec)
        label_weight = check_number("teacher.label_weight", out.label_weight, low=0)
        teacher_weight = check_number("teacher.teacher_weight", out.teacher_weight, low=0)
        if label_weight + teacher_weight == 0:
            raise ValueError("teacher.label_weight and teacher.teacher_weight must not both be 0")
        return cls(
            checkpoint=out.checkpoint,
            temperature=check_number("teacher.temperature", out.temperature, low=0, low_inclusive=False),
            label_weight=label_weight,
            teacher_weight=teacher_weight,
        )


def load_teacher(checkpoint: str | Path, num_classes: int, in_channels: int) -> torch.nn.Module:
    """Rebuild the network stored in a medjdt checkpoint, frozen and in eval mode.

    Only the network is restored (from the checkpoint's ``network`` hyper-parameter and the ``network.*``
    weights); the teacher may be a different (bigger) architecture than the student.

    Raises:
        ValueError: the file is missing, is not a medjdt checkpoint, or its network's input/output
            channels differ from the student's.
    """
    path = Path(checkpoint)
    ckpt = read_checkpoint(path, "teacher checkpoint")
    spec = ckpt["hyper_parameters"]["network"]
    t_in, t_out, _ = network_channels(spec)
    if t_out != num_classes or t_in != in_channels:
        raise ValueError(
            f"teacher checkpoint {str(path)!r} has {t_in} input / {t_out} output channels, "
            f"but the student has {in_channels} / {num_classes}"
        )
    network = build_network(spec)
    prefix = "network."
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    network.load_state_dict(weights)
    network.eval()
    for param in network.parameters():
        param.requires_grad_(False)
    return network

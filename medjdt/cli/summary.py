"""The few lines a training command ends with: where its outputs are and the final per-class scores."""

from __future__ import annotations

import math
import shlex
import time
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

from medjdt.cli.session import RunSession

__all__ = ["summarise"]


def _shown(path: str | Path | None) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read), else as it is."""
    if path is None:
        return ""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_STAGE_PREFIX = {"fit": "val", "validate": "val", "test": "test"}


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _table(metrics: dict[str, Any], prefix: str, class_names: list[str]) -> list[str]:
    """Per-class Dice (vs majority vote) and soft Dice (vs mean of raters), their means, and calibration."""

    def fmt(value: float | None) -> str:
        return "    n/a" if value is None else f"{value:7.3f}"

    width = max([len(n) for n in class_names[1:]] + [5])
    lines = [f"    {'class':<{width}}    dice  soft_dice"]
    for name in class_names[1:]:
        dice = _value(metrics, f"{prefix}/dice/{name}")
        soft = _value(metrics, f"{prefix}/soft_dice/{name}")
        lines.append(f"    {name:<{width}} {fmt(dice)}    {fmt(soft)}")
    calibration = "  ".join(
        f"{key} {value:.4f}"
        for key in ("ece", "brier", "nll")
        if (value := _value(metrics, f"{prefix}/{key}")) is not None
    )
    mean_dice, mean_soft = _value(metrics, f"{prefix}/dice"), _value(metrics, f"{prefix}/soft_dice")
    lines.append(f"    {'mean':<{width}} {fmt(mean_dice)}    {fmt(mean_soft)}    {calibration}")
    return lines


def _best(trainer: Any) -> ModelCheckpoint | None:
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            return callback
    return None


def summarise(cli: Any, session: RunSession) -> dict[str, Any]:
    """Print the summary of the finished command of ``cli`` and return the fields it adds to ``run.json``."""
    trainer, datamodule = cli.trainer, cli.datamodule
    command = session.command
    folder = session.folder
    seconds = time.monotonic() - session.started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    class_names = list(datamodule.class_names)
    fields: dict[str, Any] = {
        "metrics": metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "last_validation": getattr(cli.model, "last_evaluation", None),
    }
    lines = []
    if command == "fit":
        lines.append(
            f"medjdt fit: done, {trainer.current_epoch} epoch(s), {trainer.global_step} step(s) in {seconds:.0f} s"
        )
        lines.append(f"  run folder       {_shown(folder)}")
        best = _best(trainer)
        if best is not None and best.best_model_path:
            score = best.best_model_score
            shown = f" ({best.monitor} {float(score):.4f})" if score is not None else ""
            lines.append(f"  best checkpoint  {_shown(best.best_model_path)}{shown}")
            fields["best_checkpoint"] = best.best_model_path
            fields["best_score"] = None if score is None else float(score)
        last = Path(folder) / "checkpoints" / "last.ckpt" if folder is not None else None
        if last is not None and last.is_file():
            lines.append(f"  last checkpoint  {_shown(last)}")
            fields["last_checkpoint"] = str(last)
    else:
        lines.append(f"medjdt {command}: done in {seconds:.0f} s")
        lines.append(f"  checkpoint       {session.checkpoint or 'none (untrained network)'}")
        temperature = getattr(cli.model, "temperature", None)
        if temperature is not None:
            fields["temperature"] = temperature
            lines.append(f"  temperature      {temperature:.4f} (post-hoc: probabilities are softmax(logits / T))")
        lines.append(f"  outputs          {_shown(folder)}")
    prefix = _STAGE_PREFIX.get(command)
    if prefix is not None and f"{prefix}/dice" in metrics:
        split = "val" if prefix == "val" else "test"
        cases = len(datamodule.datasets.get(split, [])) if hasattr(datamodule, "datasets") else 0
        when = f"epoch {trainer.current_epoch - 1}; " if command == "fit" else ""
        lines.append(
            f"  {'last validation' if command == 'fit' else command} ({when}{cases} case(s) on the preprocessed grid; "
            "Dice vs the raters' majority vote, soft Dice and calibration vs their mean):"
        )
        lines += _table(metrics, prefix, class_names)
        lines.append(f"  per case         {_shown(Path(folder) / f'{prefix}_per_case.csv')}")
    if command == "predict":
        writer = next((c for c in trainer.callbacks if type(c).__name__ == "NiftiPredictionWriter"), None)
        directory = writer.directory(trainer) if writer is not None else Path(folder)
        cases = [record.case_id for record in datamodule.datasets["predict"].data]
        fields["predictions"] = str(directory)
        fields["cases"] = cases
        lines.append(
            f"  predictions      {len(cases)} case(s) in {_shown(directory)} (*_probs, *_label, *_uncertainty.nii.gz; "
            "labels.itksnap.txt and labels.ctbl name the classes for ITK-SNAP and 3D Slicer)"
        )
        manifest = str(session.manifest_path)
        evaluate = shlex.join(
            [
                "medjdt",
                "evaluate",
                "--manifest",
                manifest,
                "--predictions",
                str(directory),
                "--out",
                str(Path(folder) / "evaluation.csv"),
            ]
        )
        lines.append(f"  evaluate with    {evaluate}")
    for line in lines:
        session.say(line)
    return fields

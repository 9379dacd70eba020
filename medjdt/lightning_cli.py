"""The training subcommands ``medjdt fit|validate|test|predict``, built on LightningCLI.

Configs are plain LightningCLI YAML with ``model:``, ``data:`` and ``trainer:`` sections. Besides
Lightning's own options this adds ``checkpoint.*`` (a ``ModelCheckpoint``: best by ``checkpoint.monitor``,
default ``val/dice``), a :class:`~medjdt.models.LastCheckpoint` (``last.ckpt`` after every epoch) and
``prediction_writer.output_dir`` (NIfTI outputs of ``predict``).
``model.roi_size`` follows ``data.patch_size`` and ``model.class_names`` the manifest. The model class is
:class:`~medjdt.models.semi.SemiSupervisedModule`: a :class:`~medjdt.models.SegmentationModule` with the optional
argument group ``model.semi`` (mean-teacher settings; unset, training is plain supervised), so ``model:``
sections need no ``class_path``. Unless
``trainer.logger`` is set, runs log to ``runs/<config name>/version_N`` (CSV, and TensorBoard when installed),
and ``--ckpt_path last`` resumes from the newest ``last.ckpt`` there (into a new version directory).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from medjdt.data import SegmentationDataModule
from medjdt.models import LastCheckpoint, NiftiPredictionWriter
from medjdt.models.semi import SemiSupervisedModule

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")

__all__ = ["TRAINING_COMMANDS", "MedjdtCLI", "run_training_cli"]


def _next_version(save_dir: Path) -> int:
    """The first ``version_N`` not yet used under ``save_dir`` (Lightning's own numbering)."""
    used = [int(p.name.split("_", 1)[1]) for p in save_dir.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return max(used, default=-1) + 1


def _default_loggers(name: str) -> list[dict[str, Any]]:
    """CSV logging under ``runs/<name>/version_N``, plus TensorBoard into the same folder when it is installed."""
    # One explicit version for both loggers, so their files share one run directory.
    args = {"save_dir": "runs", "name": name, "version": _next_version(Path("runs") / name)}
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": args}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": args})
    return loggers


def _run_name(args: Sequence[str]) -> str:
    """The stem of the (last) ``--config`` file, else ``medjdt``."""
    name = "medjdt"
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            name = Path(args[i + 1]).stem
        elif arg.startswith("--config="):
            name = Path(arg.split("=", 1)[1]).stem
    return name


def _explicit_model_arguments(args: Sequence[str]) -> set[str]:
    """Names of the model's init arguments set on the command line (``--model.X ...``, ``--model.X.y=...``)."""
    names = set()
    for arg in args:
        if arg.startswith("--model."):
            names.add(arg[len("--model.") :].split("=", 1)[0].split(".", 1)[0])
    return names


class MedjdtCLI(LightningCLI):
    """LightningCLI over :class:`SemiSupervisedModule` and :class:`SegmentationDataModule`.

    With ``--ckpt_path``, Lightning replaces the model's settings by those saved in the checkpoint (so that the
    network matches its weights); a model argument given explicitly on the command line (``--model.X``) still
    wins over the checkpoint's, e.g. ``medjdt predict --ckpt_path ... --model.sw_batch_size 8``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        command_line = kwargs.get("args")
        self._explicit_model = _explicit_model_arguments(sys.argv[1:] if command_line is None else command_line)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        model = self.config[subcommand].model
        explicit = {name: model[name] for name in self._explicit_model if name in model}
        super()._parse_ckpt_path()
        for name, value in explicit.items():
            self.config[subcommand].model[name] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(NiftiPredictionWriter, "prediction_writer")
        parser.link_arguments("data.patch_size", "model.roi_size")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")


def _resolve_last(args: list[str], name: str) -> list[str]:
    """Replace ``--ckpt_path last`` by the newest ``runs/<name>/version_N/checkpoints/last.ckpt``.

    Every run logs into a new version directory, so Lightning's own ``last`` lookup (in the new run's empty
    checkpoint folder) would find nothing; the resumed run continues the epoch and step counts from that file.
    Runs with a ``trainer.logger`` of their own keep Lightning's behaviour.
    """
    if any(a.startswith("--trainer.logger") for a in args):
        return args
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--ckpt_path=last" or (arg == "last" and i > 0 and out[i - 1] == "--ckpt_path"):
            candidates = sorted(
                (Path("runs") / name).glob("version_*/checkpoints/last.ckpt"),
                key=lambda p: int(p.parts[-3].split("_", 1)[1]) if p.parts[-3].split("_", 1)[1].isdigit() else -1,
            )
            if not candidates:
                raise ValueError(f"--ckpt_path last: no runs/{name}/version_*/checkpoints/last.ckpt to resume from")
            out[i] = f"--ckpt_path={candidates[-1]}" if arg.startswith("--ckpt_path=") else str(candidates[-1])
    return out


def run_training_cli(args: Sequence[str]) -> MedjdtCLI:
    """Run ``medjdt <fit|validate|test|predict> ...`` with ``args`` (the subcommand first)."""
    name = _run_name(args)
    resolved = _resolve_last(list(args), name)
    return MedjdtCLI(
        SemiSupervisedModule,
        SegmentationDataModule,
        # From the console script the arguments are sys.argv itself; LightningCLI warns when given both.
        args=None if resolved == sys.argv[1:] else resolved,
        trainer_defaults={"logger": _default_loggers(name)},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "medjdt", "description": "Train and evaluate soft-label segmentation models."},
    )

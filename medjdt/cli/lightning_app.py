"""``MedjdtCLI``: LightningCLI over :class:`SemiSupervisedModule` and :class:`SegmentationDataModule`, run inside a
:class:`~medjdt.cli.session.RunSession`.

Besides Lightning's own options this adds ``checkpoint.*`` (a ``ModelCheckpoint``: best by ``checkpoint.monitor``,
default ``val/dice``), a :class:`~medjdt.models.LastCheckpoint` (``last.ckpt`` after every epoch), an
:class:`~medjdt.models.EvaluationTables` (per-case CSVs) when ``trainer.callbacks`` lacks one,
``prediction_writer.output_dir`` (NIfTI outputs of ``predict``), ``--run_dir`` (the run folder itself) and
``--allow_untrained`` (evaluate or predict without a checkpoint, on purpose). ``model.roi_size`` follows
``data.patch_size`` and ``model.class_names`` the manifest. The model class is
:class:`~medjdt.models.semi.SemiSupervisedModule`: a :class:`~medjdt.models.SegmentationModule` with the optional
argument group ``model.semi`` (mean-teacher settings; unset, training is plain supervised), so ``model:`` sections
need no ``class_path``.

With ``--ckpt_path``, Lightning replaces the model's settings by those saved in the checkpoint (so that the network
matches its weights); a model argument given explicitly on the command line (``--model.X``) still wins over the
checkpoint's, e.g. ``medjdt predict --ckpt_path ... --model.sw_batch_size 8``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import warnings
from argparse import ArgumentError
from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from medjdt.cli.session import RunSession
from medjdt.data import SegmentationDataModule
from medjdt.models import EvaluationTables, LastCheckpoint, NiftiPredictionWriter, StopOnSignal
from medjdt.models.semi import SemiSupervisedModule
from medjdt.validation import did_you_mean

__all__ = ["MedjdtCLI", "build_cli", "current_stop"]

# Lightning advertises a cloud logger on every run, and announces the seed before anything is checked (run.json
# records it): the command's output should be about the run, and a bad input's message the only line.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "💡" not in record.getMessage())
logging.getLogger("lightning_fabric.utilities.seed").addFilter(lambda record: "Seed set to" not in record.getMessage())

_STOP: list[StopOnSignal] = []


def current_stop() -> StopOnSignal | None:
    """The :class:`StopOnSignal` of the fit running in this process, if any."""
    return _STOP[-1] if _STOP else None


class Heartbeat(Callback):
    """Keeps the run folder's lock fresh while a command works in it (see :class:`medjdt.runs.RunLock`)."""

    def __init__(self, session: RunSession):
        self.session = session

    def _beat(self, *args: Any, **kwargs: Any) -> None:
        if self.session.lock is not None:
            self.session.lock.heartbeat()

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _beat


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` argument names of ``class_path`` (for suggestions; empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _explain(err: ArgumentError, parser: Any) -> str:
    """A one-line account of a command-line or config error, with a suggestion for a mistyped key."""
    text = " ".join(str(err).split())
    options = sorted(
        {opt for action in getattr(parser, "_actions", []) for opt in action.option_strings if opt.startswith("--")}
    )
    unknown = re.search(r"unrecognized arguments: (--[\w.\-]+)", text)
    if unknown:
        name = unknown.group(1).split("=", 1)[0]
        return f"unknown option {name}{did_you_mean(name, options)}; see medjdt <command> --help"
    nested = re.search(r"Problem with given class_path '([\w.]+)': Option '(\w+)' is not accepted", text)
    if nested:
        return f"{text}{did_you_mean(nested.group(2), _init_arguments(nested.group(1)))}"
    key = re.search(r"[Kk]ey ['\"]([\w.]+)['\"] is not expected", text) or re.search(
        r"(?:No action for key|does not accept option) ['\"]([\w.]+)['\"]", text
    )
    if key:
        name = "--" + key.group(1)
        return f"unknown config key {key.group(1)}{did_you_mean(name, options).replace('--', '')}"
    typed = re.search(r'Parser key "([\w.]+)": (.*)', text)
    if typed:
        name, problem = typed.groups()
        hint = (
            " (a list is written [a, b, c], or as separate numbers after the option)"
            if "Sequence" in problem or "list" in problem
            else ""
        )
        problem = re.sub(r"<class '([\w.]+)'>", r"\1", problem)
        return f"{name}: {problem}{hint}"
    return text


class MedjdtCLI(LightningCLI):
    """The training subcommands; see the module docstring. ``session`` holds the run's checks and folder."""

    def __init__(self, *args: Any, session: RunSession, **kwargs: Any) -> None:
        self.session = session
        self._explicit_model = {name.split(".")[1] for name in session.explicit if name.startswith("model.")}
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            # as LightningCLI.parse_arguments, without its warning about args given beside sys.argv: medjdt always
            # passes the (normalised) command line itself
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            command = self.session.command
            sub = getattr(self, "_subcommand_parsers", {}).get(command, parser)
            raise ValueError(_explain(err, sub)) from None

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        self.session.plan(self.config[subcommand])
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
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="the run folder itself (created if needed), instead of a new <root>/version_N",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate, test or predict without --ckpt_path, with the untrained network (on purpose)",
        )
        parser.link_arguments("data.patch_size", "model.roi_size")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Every data check runs here, before the trainer prints its banners: a bad input is the only output.
        self.session.prepare(self.model, self.datamodule)
        return super().instantiate_trainer(**{**kwargs, **self.session.trainer_overrides()})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if self.subcommand != "fit":
            # Evaluations never save checkpoints; pointing the checkpoint callbacks at the folder recorded in the
            # evaluated checkpoint lets Lightning restore their state without warning that the folder changed.
            for callback in callbacks:
                if isinstance(callback, ModelCheckpoint) and self.session.checkpoint_dirs.get(callback.state_key):
                    callback.dirpath = self.session.checkpoint_dirs[callback.state_key]
        else:
            if self.session.resuming:
                # resuming in the run's own folder: its checkpoints are expected to be there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            self.stop_on_signal = StopOnSignal()
            _STOP.append(self.stop_on_signal)
            callbacks = [*callbacks, self.stop_on_signal]
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if not any(isinstance(c, EvaluationTables) for c in [*configured, *callbacks]):
            # like Lightning's default ModelCheckpoint: a config without it still gets the per-case CSVs
            callbacks = [*callbacks, EvaluationTables()]
        return super()._instantiate_trainer(config, [*callbacks, Heartbeat(self.session)])


def build_cli(args: list[str], session: RunSession) -> MedjdtCLI:
    """Parse ``args`` (the subcommand first), run the subcommand and return the CLI (its trainer, model...)."""
    return MedjdtCLI(
        SemiSupervisedModule,
        SegmentationDataModule,
        session=session,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "medjdt",
            "description": "Train and evaluate soft-label segmentation models.",
            "exit_on_error": False,
            **{name: {"exit_on_error": False} for name in ("fit", "validate", "test", "predict")},
        },
    )

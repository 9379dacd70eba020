"""Reading a training command's parsed config: the settings that identify a run, where it goes, and the checks of
settings that Lightning would only refuse late (or with a traceback).

Plain functions over one subcommand's jsonargparse Namespace ``cfg`` (``cfg.data``, ``cfg.model``,
``cfg.trainer``, ``cfg.ckpt_path``, ``cfg.run_dir``); standard library and YAML only, besides the run records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medjdt._paths import writable_folder
from medjdt.runs import manifest_digest
from medjdt.runs.record import canonical, file_digest
from medjdt.validation import check_number

# The data and model settings that define what a run trains (``--ckpt_path last`` resumes only equal ones).
DATA_IDENTITY = (
    "fold",
    "fusion",
    "label_smoothing",
    "smoothing_mode",
    "patch_size",
    "spacing",
    "orientation",
    "intensity",
    "window",
)
MODEL_IDENTITY = ("network", "jdt", "ce_weight", "jdt_weight", "teacher", "semi")
# What else an evaluation's results depend on.
INFERENCE_SETTINGS = ("roi_size", "sw_batch_size", "overlap", "blend_mode", "temperature", "tta")

__all__ = [
    "DATA_IDENTITY",
    "MODEL_IDENTITY",
    "check_settings",
    "config_file_values",
    "evaluation_inputs",
    "explicit_version",
    "global_rank",
    "logger_specs",
    "normalise_data",
    "plain",
    "point_loggers_at",
    "run_identity",
    "run_root",
]


def global_rank() -> int:
    """This process's rank in a distributed run, from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    world_local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return node * world_local + local


def plain(value: Any) -> Any:
    """jsonargparse Namespaces (and anything nested) as plain data."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_file_values(files: Sequence[Path]) -> dict[str, Any]:
    """The ``data.manifest`` and ``data.demo`` values the config files set (later files win)."""
    values: dict[str, Any] = {}
    for path in files:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports an unreadable config itself
        data = loaded.get("data") if isinstance(loaded, dict) else None
        if isinstance(data, dict):
            for key in ("manifest", "demo"):
                if key in data:
                    values[f"data.{key}"] = data[key]
    return values


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.abspath(a) == os.path.abspath(b)


def normalise_data(cfg: Any, explicit: set[str], config_values: Mapping[str, Any]) -> None:
    """Apply the data rules of the command line to ``cfg`` in place.

    The manifest's fold column is the truth: a ``num_folds`` from a config file is dropped (the data module reads it
    from the manifest); one given on the command line (in ``explicit``) is checked against it. Phantoms are written
    only at the manifest path the config file itself names (``config_values``): another manifest drops ``demo``.
    """
    data = cfg.data
    if "data.num_folds" not in explicit:
        data.num_folds = None
    if data.demo is not None and not _same_path(data.manifest, config_values.get("data.manifest")):
        data.demo = None


def check_settings(cfg: Any, command: str) -> None:
    """Refuse absurd trainer settings and unusable folders, before anything is built.

    Raises:
        ValueError: one line naming the setting and the value.
    """
    trainer = cfg.trainer
    for key in ("max_epochs", "max_steps"):
        if getattr(trainer, key, None) is not None:
            setattr(trainer, key, check_number(f"trainer.{key}", getattr(trainer, key), low=-1, integer=True))
    if trainer.max_epochs == 0 and command == "fit":
        raise ValueError("trainer.max_epochs is 0: nothing would be trained")
    unlimited = trainer.max_epochs == -1 and trainer.max_steps in (None, -1)
    model = cfg.model
    if command == "fit" and unlimited and (model.schedule != "constant" or model.warmup_fraction > 0):
        raise ValueError(
            f"trainer.max_epochs -1 (no limit) leaves no training length for model.schedule {model.schedule!r} "
            f"and model.warmup_fraction {model.warmup_fraction}; set trainer.max_epochs or trainer.max_steps, or "
            "use model.schedule constant with model.warmup_fraction 0"
        )
    for key in ("check_val_every_n_epoch", "log_every_n_steps"):
        if getattr(trainer, key, None) is not None:
            setattr(trainer, key, check_number(f"trainer.{key}", getattr(trainer, key), low=1, integer=True))
    if trainer.default_root_dir is not None:
        writable_folder(trainer.default_root_dir, "run root (trainer.default_root_dir)", create=False)
    if getattr(cfg, "run_dir", None) is not None:
        writable_folder(cfg.run_dir, "run folder (--run_dir)", create=False)
    if cfg.data.cache_dir is not None:
        writable_folder(cfg.data.cache_dir, "cache folder (data.cache_dir)", create=False)
    writer = getattr(cfg, "prediction_writer", None)
    if command == "predict" and writer is not None and writer.output_dir is not None:
        writable_folder(writer.output_dir, "output folder (prediction_writer.output_dir)", create=False)


def run_identity(cfg: Any, manifest: Path) -> dict[str, Any]:
    """What defines a training run: the manifest's content (not its path: a dataset moved elsewhere is still the
    same dataset), the data and the model settings."""
    data, model = plain(cfg.data), plain(cfg.model)
    return canonical(
        {
            "manifest": {"sha256": manifest_digest(manifest)},
            "data": {key: data.get(key) for key in DATA_IDENTITY},
            "model": {key: model.get(key) for key in MODEL_IDENTITY},
        }
    )


def evaluation_inputs(cfg: Any, manifest: Path, checkpoint: Path | None) -> dict[str, Any]:
    """What an evaluation's results depend on (see :func:`medjdt.runs.evaluation_folder`): the checkpoint's and
    the manifest's content, the data settings and the inference settings."""
    data, model = plain(cfg.data), plain(cfg.model)
    return canonical(
        {
            "checkpoint": None
            if checkpoint is None
            else {"path": str(checkpoint.absolute()), "sha256": file_digest(checkpoint)},
            "manifest": {"path": str(manifest), "sha256": manifest_digest(manifest)},
            "data": {key: data.get(key) for key in (*DATA_IDENTITY, "predict_on")},
            "inference": {key: model.get(key) for key in INFERENCE_SETTINGS},
        }
    )


def logger_specs(cfg: Any) -> list[dict[str, Any]]:
    """The configured loggers as plain ``{class_path, init_args}`` mappings (none for the default or ``False``)."""
    logger = cfg.trainer.logger
    if logger is None or isinstance(logger, bool):
        return []
    specs = logger if isinstance(logger, list) else [logger]
    return [plain(s) for s in specs if hasattr(s, "class_path") or isinstance(s, Mapping)]


def run_root(cfg: Any, config_names: Sequence[str]) -> Path:
    """Where new run folders are claimed: a configured logger's ``save_dir/name``, else
    ``trainer.default_root_dir``, else ``runs/<last config file's name>``."""
    for spec in logger_specs(cfg):
        args = spec.get("init_args") or {}
        if args.get("save_dir"):
            return Path(args["save_dir"]) / (args.get("name") if args.get("name") is not None else "lightning_logs")
    if cfg.trainer.default_root_dir is not None:
        return Path(cfg.trainer.default_root_dir)
    return Path("runs") / (config_names[-1] if config_names else "medjdt")


def explicit_version(cfg: Any, config_names: Sequence[str]) -> Path | None:
    """The run folder a configured logger names with an explicit ``version``, if any."""
    for spec in logger_specs(cfg):
        args = spec.get("init_args") or {}
        if args.get("save_dir") and args.get("version") is not None:
            version = args["version"]
            name = f"version_{version}" if isinstance(version, int) else str(version)
            return run_root(cfg, config_names) / name
    return None


_LIGHTNING_CSV_LOGGERS = (
    "pytorch_lightning.loggers.CSVLogger",
    "pytorch_lightning.loggers.csv_logs.CSVLogger",
    "lightning.pytorch.loggers.CSVLogger",
)


def point_loggers_at(cfg: Any, folder: Path) -> None:
    """Point the configured file loggers (those with a ``save_dir``) at the run ``folder``, so that their
    ``log_dir`` is the folder: CSV and TensorBoard share it, and an evaluation logs next to its checkpoint's run.
    Lightning's CSV logger becomes :class:`medjdt.cli.loggers.RunCSVLogger`, the same logger except that it
    continues a resumed run's ``metrics.csv`` instead of deleting it (and does not warn about the run's files)."""
    if not logger_specs(cfg):
        return
    loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
    for logger in loggers:
        if getattr(logger, "class_path", None) in _LIGHTNING_CSV_LOGGERS:
            logger.class_path = "medjdt.cli.loggers.RunCSVLogger"
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and getattr(init_args, "save_dir", None):
            init_args.save_dir = str(folder.parent)
            init_args.name = ""
            init_args.version = folder.name

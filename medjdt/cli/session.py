"""``RunSession``: one ``medjdt fit|validate|test|predict`` from its checks to its summary.

The session decides where the command writes and records why, around LightningCLI (see
:mod:`medjdt.cli.lightning_app`):

1. :meth:`RunSession.plan`, right after the command line and config are parsed: the manifest (demo data only at
   the path the config file names), the settings, the checkpoint (``--ckpt_path last`` resolved among matching
   runs), and the run folder, claimed, locked and recorded in ``run.json`` (:mod:`medjdt.runs`).
2. :meth:`RunSession.prepare`, once the model and data module exist and before the trainer: model and data agree,
   and every case the stage uses is read, checked and cached.
3. :meth:`RunSession.finish` after the stage, or :meth:`RunSession.abort` on any error: the record's status, the
   summary, and no trace of a run that stopped before doing anything.

Where runs go. ``fit``: ``<root>/version_N`` claimed by exclusive creation, ``root`` being a configured logger's
``save_dir/name``, else ``trainer.default_root_dir``, else ``runs/<config name>``; ``--run_dir DIR`` names the
folder itself. A fit resumed from a run's checkpoint continues in that run's folder. ``validate``, ``test`` and
``predict`` of a checkpoint that belongs to a run write into ``<run>/<stage>/<checkpoint name>`` (see
:func:`medjdt.runs.evaluation_folder`), unless ``--run_dir`` or ``--trainer.default_root_dir`` is given on the
command line.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medjdt._paths import writable_folder
from medjdt.cli.arguments import config_files, explicit_options
from medjdt.cli.config_view import (
    check_settings,
    config_file_values,
    evaluation_inputs,
    explicit_version,
    global_rank,
    logger_specs,
    normalise_data,
    plain,
    point_loggers_at,
    run_identity,
    run_root,
)
from medjdt.cli.resume import (
    CheckpointPlan,
    plan_evaluation_checkpoint,
    plan_fit_checkpoint,
    remove_orphan_checkpoints,
)
from medjdt.runs import (
    RunLock,
    claim_version,
    environment,
    evaluation_folder,
    manifest_digest,
    read_record,
    run_folder_of_checkpoint,
    write_record,
)

RUN_DIR_ENV = "MEDJDT_RUN_DIR"

__all__ = ["CheckPassed", "RunSession"]


class CheckPassed(Exception):
    """Raised by :meth:`RunSession.prepare` under ``check_only`` when every check passed; the message says so."""


class RunSession:
    """The checks, the run folder and the record of one training command (see the module docstring).

    Args:
        command: ``fit``, ``validate``, ``test`` or ``predict``.
        argv: the command line after ``medjdt`` (the subcommand first).
        check_only: run the checks only (``medjdt check``): no run folder, and :meth:`prepare` ends the command
            by raising :class:`CheckPassed`.
    """

    def __init__(self, command: str, argv: Sequence[str], check_only: bool = False):
        self.command = command
        self.check_only = check_only
        self.argv = list(argv)
        self.explicit = explicit_options(self.argv[1:])
        self.config_names = [p.stem for p in config_files(self.argv)]
        self.config_values = config_file_values(config_files(self.argv))
        self.rank = global_rank()
        self.folder: Path | None = None
        self.created = False
        self.created_root: Path | None = None
        self.lock: RunLock | None = None
        self.record: dict[str, Any] = {}
        self.ckpt: CheckpointPlan | None = None
        self.user_loggers = False
        self.manifest_path: Path | None = None
        self.started = time.monotonic()
        self.prepared_cases = 0

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint the command resumes or evaluates, or None."""
        return self.ckpt.path if self.ckpt is not None else None

    @property
    def resuming(self) -> bool:
        """A fit that continues in its checkpoint's own run folder."""
        return self.ckpt is not None and self.ckpt.run is not None

    @property
    def checkpoint_dirs(self) -> dict[str, str]:
        """State key -> dirpath of the checkpoint callbacks that wrote the evaluated checkpoint."""
        return self.ckpt.callback_dirs if self.ckpt is not None else {}

    # ------------------------------------------------------------------ plan
    def plan(self, cfg: Any) -> None:
        """Check the parsed config ``cfg`` (one subcommand's Namespace), resolve the checkpoint and claim the run
        folder. Modifies ``cfg`` in place (``data.num_folds``, ``data.demo``, ``ckpt_path``, logger versions)."""
        normalise_data(cfg, self.explicit, self.config_values)
        check_settings(cfg, self.command)
        self._manifest(cfg)
        if self.command == "fit":
            self._plan_fit(cfg)
        else:
            self._plan_evaluation(cfg)
        if not self.check_only:
            self._claim(cfg)

    def _manifest(self, cfg: Any) -> None:
        from medjdt.data.demo import ensure_demo_data
        from medjdt.data.manifest import read_manifest

        data = cfg.data
        path = Path(data.manifest)
        if not path.exists():
            if data.demo is None:
                where = "given on the command line" if "data.manifest" in self.explicit else "data.manifest"
                raise ValueError(f"manifest {path} does not exist ({where})")
            if self.rank == 0:
                ensure_demo_data(path, plain(data.demo), num_folds=data.num_folds, fold=data.fold)
        manifest = read_manifest(path)
        self.manifest_path = manifest.path
        self.manifest = manifest

    def _plan_fit(self, cfg: Any) -> None:
        if cfg.model.temperature == "auto":
            raise ValueError(
                "--model.temperature auto applies to validate, test and predict of a trained checkpoint, not to fit"
            )
        self.identity_value = run_identity(cfg, self.manifest_path)
        if cfg.ckpt_path is None:
            return
        if cfg.run_dir is not None:
            root = Path(cfg.run_dir)
            candidates = [root]
        else:
            root = run_root(cfg, self.config_names)
            candidates = [p for p in root.glob("version_*") if p.is_dir()] if root.is_dir() else []
        self.ckpt = plan_fit_checkpoint(cfg.ckpt_path, self.identity_value, candidates, root)
        cfg.ckpt_path = str(self.ckpt.path)
        self.folder = self.ckpt.run

    def _plan_evaluation(self, cfg: Any) -> None:
        ckpt = cfg.ckpt_path
        if ckpt is None:
            if cfg.model.temperature == "auto":
                raise ValueError("--model.temperature auto needs --ckpt_path: it is fitted for a trained checkpoint")
            if not cfg.allow_untrained:
                raise ValueError(
                    f"medjdt {self.command} needs --ckpt_path (a trained checkpoint, e.g. "
                    "runs/<config>/version_N/checkpoints/last.ckpt); pass --allow_untrained true to use the "
                    "untrained network on purpose"
                )
            return
        self.ckpt = plan_evaluation_checkpoint(ckpt, self.command)
        if cfg.model.temperature == "auto":
            self._resolve_temperature(cfg)

    def _resolve_temperature(self, cfg: Any) -> None:
        """``--model.temperature auto``: the checkpoint's temperature, fitted on its run's validation fold."""
        from medjdt.cli.calibration import resolve_temperature

        if self.check_only:
            from medjdt.cli.calibration import _run_data

            _run_data(self.checkpoint)  # the run's validation data can be found: auto would work
            cfg.model.temperature = None
            return
        cfg.model.temperature = resolve_temperature(self.checkpoint, say=self.say)

    # ------------------------------------------------------------------ the run folder
    def _claim(self, cfg: Any) -> None:
        shared = os.environ.get(RUN_DIR_ENV)
        if self.rank != 0:
            # Other ranks of a distributed run use rank 0's folder (inherited through the environment on one node;
            # elsewhere Lightning broadcasts rank 0's log_dir) and write nothing themselves.
            self.folder = Path(shared) if shared else self.folder or run_root(cfg, self.config_names) / "pending"
            self._configure_loggers(cfg)
            return
        inputs = None
        if self.command == "fit":
            if self.folder is None:
                if cfg.run_dir is not None:
                    self.folder = writable_folder(cfg.run_dir, "run folder (--run_dir)")
                    self._check_foreign_run(self.folder)
                else:
                    explicit = explicit_version(cfg, self.config_names)
                    if explicit is not None:
                        self.folder = writable_folder(explicit, "run folder (logger version)")
                        self._check_foreign_run(self.folder)
                    else:
                        self.folder = self._claim_version(cfg)
        else:
            inputs = evaluation_inputs(cfg, self.manifest_path, self.checkpoint)
            run = run_folder_of_checkpoint(self.checkpoint) if self.checkpoint is not None else None
            if cfg.run_dir is not None:
                self.folder = writable_folder(cfg.run_dir, "run folder (--run_dir)")
            elif run is not None and "trainer.default_root_dir" not in self.explicit:
                self.folder, self.created = evaluation_folder(run, self.command, self.checkpoint, inputs)
            else:
                self.folder = self._claim_version(cfg)
        # Absolute, so that the checkpoint callbacks record a folder that a resume from another working directory
        # (a requeued cluster job) recognises as the same, and restores their best-score state.
        self.folder = Path(os.path.abspath(self.folder))
        self.lock = RunLock(self.folder).acquire()
        os.environ[RUN_DIR_ENV] = str(self.folder.absolute())
        self._configure_loggers(cfg)
        self._write_initial_record(cfg, inputs)

    def _claim_version(self, cfg: Any) -> Path:
        root = run_root(cfg, self.config_names)
        self.created_root = None if root.exists() else root
        self.created = True
        return claim_version(root, self._root_what(cfg))

    def _root_what(self, cfg: Any) -> str:
        if logger_specs(cfg):
            return "run root (the logger's save_dir)"
        if cfg.trainer.default_root_dir is not None:
            return "run root (trainer.default_root_dir)"
        return "run root"

    @staticmethod
    def _check_foreign_run(folder: Path) -> None:
        if (folder / "checkpoints" / "last.ckpt").is_file():
            raise ValueError(
                f"run folder {folder} already holds a trained run (checkpoints/last.ckpt); resume it with "
                "--ckpt_path last, or choose another folder"
            )

    def _configure_loggers(self, cfg: Any) -> None:
        self.user_loggers = bool(logger_specs(cfg)) or cfg.trainer.logger is False
        if self.folder is not None:
            point_loggers_at(cfg, self.folder)

    def _session_entry(self) -> dict[str, Any]:
        return {
            "command": ["medjdt", *self.argv],
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": "running",
            "resumed_from": str(self.checkpoint) if self.command == "fit" and self.checkpoint else None,
        }

    def _write_initial_record(self, cfg: Any, inputs: dict[str, Any] | None) -> None:
        previous = read_record(self.folder) or {}
        record = {
            "kind": self.command,
            "status": "running",
            "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            **environment(),
            "sessions": [*previous.get("sessions", []), self._session_entry()],
        }
        record["manifest"] = {"path": str(self.manifest_path), "sha256": manifest_digest(self.manifest_path)}
        if self.command == "fit":
            record["identity"] = self.identity_value
        else:
            record["inputs"] = inputs
        self.record = record
        write_record(self.folder, record)

    def _update(self, status: str, **fields: Any) -> None:
        if self.folder is None or self.rank != 0 or not self.record:
            return
        self.record["status"] = status
        self.record["sessions"][-1].update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.record.update(fields)
        write_record(self.folder, self.record)

    # ------------------------------------------------------------------ prepare
    def prepare(self, model: Any, datamodule: Any) -> None:
        """Model and data agree, and every case of the stage is read, checked and cached (rank 0 only)."""
        if getattr(model, "in_channels", None) is not None and model.in_channels != datamodule.in_channels:
            raise ValueError(
                f"the network takes in_channels={model.in_channels} but manifest {datamodule.manifest.path} declares "
                f"in_channels={datamodule.in_channels} image channel(s)"
            )
        if self.rank == 0:
            datamodule.prepare(self.command)
        if self.check_only:
            raise CheckPassed(self._check_summary(datamodule))
        if self.command == "fit" and self.ckpt is not None:
            where = f"in its run folder {self.folder}" if self.resuming else f"in a new run folder {self.folder}"
            self.say(
                f"medjdt fit: resuming {self.ckpt.path} (epoch {self.ckpt.epoch}, step {self.ckpt.global_step}) {where}"
            )
        if self.command == "fit" and self.resuming and self.ckpt.global_step is not None:
            from medjdt.cli.loggers import truncate_metrics

            truncate_metrics(self.folder, int(self.ckpt.global_step))
            remove_orphan_checkpoints(self.folder, self.ckpt, self.say)

    def trainer_overrides(self) -> dict[str, Any]:
        """Trainer arguments of the session: the run folder's loggers (unless loggers are configured)."""
        if self.user_loggers or self.folder is None:
            return {"default_root_dir": str(self.folder)} if self.folder is not None else {}
        if self.command == "predict":
            return {"logger": False, "default_root_dir": str(self.folder)}
        from medjdt.cli.loggers import run_loggers

        return {"logger": run_loggers(self.folder), "default_root_dir": str(self.folder)}

    def _check_summary(self, datamodule: Any) -> str:
        splits = datamodule.stage_records(self.command)
        counts = ", ".join(f"{name} {len(records)}" for name, records in splits.items())
        checkpoint = f"; checkpoint {self.checkpoint} readable" if self.checkpoint is not None else ""
        return (
            f"medjdt check: {self.command} can start: manifest {self.manifest_path} ({counts} case(s); "
            f"{datamodule.num_classes} classes {datamodule.class_names}, {datamodule.in_channels} image channel(s)); "
            f"every case read, checked and cached in {datamodule.cache_dir}{checkpoint}"
        )

    # ------------------------------------------------------------------ end
    def finish(self, fields: Mapping[str, Any] | None = None) -> None:
        """Mark the run finished and give the folder back."""
        self._update("finished", **dict(fields or {}))
        self._release()

    def abort(self, err: BaseException, stopped: bool = False) -> None:
        """After an error: a run that left nothing of value is removed; otherwise its record says how it ended."""
        try:
            if self.folder is not None and self.rank == 0 and self.created and not self._has_results():
                self._remove_folder()
            else:
                self._update("stopped" if stopped else "failed", error=" ".join(str(err).split())[:500])
        finally:
            self._release()

    def _has_results(self) -> bool:
        folder = self.folder
        if folder is None or not folder.is_dir():
            return False
        if any((folder / "checkpoints").glob("*.ckpt")) if (folder / "checkpoints").is_dir() else False:
            return True
        return any(folder.glob("*_probs.nii.gz")) or any(folder.glob("*_per_case.csv"))

    def _remove_folder(self) -> None:
        import shutil

        if self.lock is not None:
            self.lock.release()
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        # the <run>/<stage>/ folder of an evaluation, when this was its only content
        if self.command != "fit" and parent.name == self.command and not any(parent.iterdir()):
            parent.rmdir()
        # a run root this command created (runs/<config>), when nothing else is in it
        if self.created_root is not None:
            for root in (self.created_root, *self.created_root.parents):
                try:
                    root.rmdir()
                except OSError:
                    break
        self.folder = None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        os.environ.pop(RUN_DIR_ENV, None)

    def say(self, message: str) -> None:
        """A line of the summary (rank 0, stdout)."""
        if self.rank == 0:
            print(message, file=sys.stdout, flush=True)

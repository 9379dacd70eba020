"""``StopOnSignal``: SIGTERM (a cluster's pre-emption notice) and Ctrl-C stop a fit cleanly, with ``last.ckpt``."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["StopOnSignal"]


class StopOnSignal(Callback):
    """Stop ``fit`` at the end of the current training step on SIGTERM or Ctrl-C, after writing ``last.ckpt``.

    Lightning notes SIGTERM and raises ``SIGTERMException`` at the end of the next training batch (after the
    optimiser and learning-rate scheduler have stepped); this callback then writes ``<checkpoint dir>/last.ckpt``,
    from which ``--ckpt_path last`` resumes. A first Ctrl-C is turned into the same clean stop (SIGTERM to this
    process); a second one aborts at once. After ``trainer.fit`` the attributes tell what happened:

    Attributes:
        signal: ``"SIGTERM"``, ``"SIGINT"`` or None.
        checkpoint: the path written on the stop, or None.
        epoch, step: where the run stopped.
        started: training has started (Lightning's SIGTERM handler is in place).

    Lightning's ``fit`` re-raises ``SIGTERMException`` (a ``SystemExit`` with code 0 unless caught): the caller
    decides the exit code, e.g. ``medjdt fit`` exits with 143 (SIGTERM) or 130 (Ctrl-C).
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self.checkpoint: Path | None = None
        self.epoch: int | None = None
        self.step: int | None = None
        self.started = False
        self._previous: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True  # Lightning's SIGTERM handler is in place from here

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.signal = "SIGINT"
        print("\nCtrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to abort at once)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the stop writes: the folder of the trainer's checkpoints, ``last.ckpt``."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.log_dir or ".", "checkpoints")
        return Path(folder) / "last.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        if self.signal is None:
            self.signal = "SIGTERM"
        self.epoch, self.step = trainer.current_epoch, trainer.global_step
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

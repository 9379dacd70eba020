"""``medjdt fit|validate|test|predict``: quick checks of the command line, then LightningCLI inside a run session.

Before torch, MONAI and Lightning are imported, the command line is read as it is: list values written as several
numbers are joined (``--data.patch_size 96 96 96``), and the config files, an explicit ``--ckpt_path`` and an
explicit ``--data.manifest`` must exist. Then :func:`medjdt.cli.lightning_app.build_cli` parses, checks, claims the
run folder (:class:`~medjdt.cli.session.RunSession`) and runs the stage. The command ends with a short summary, or
with one line on stderr: SIGTERM and Ctrl-C during ``fit`` save ``last.ckpt`` and exit with 143 / 130 and the
command that resumes.
"""

from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medjdt.cli.arguments import config_files, join_list_values, option_value
from medjdt.cli.errors import EXIT_SIGINT, EXIT_SIGTERM, Stopped

__all__ = ["TRAINING_COMMANDS", "check_training_cli", "run_training_cli"]

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


def _early_checks(argv: Sequence[str]) -> None:
    """Paths that must exist, checked from the command line alone (one line each)."""
    for path in config_files(argv):
        if not path.is_file():
            raise ValueError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
    ckpt = option_value(argv, "ckpt_path")
    if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry", "null") and not Path(ckpt).is_file():
        raise ValueError(f"checkpoint {ckpt} {'is not a file' if Path(ckpt).exists() else 'does not exist'}")
    manifest = option_value(argv, "data.manifest")
    if manifest is not None and not Path(manifest).is_file():
        raise ValueError(f"manifest {manifest} {'is not a file' if Path(manifest).exists() else 'does not exist'}")


class _EarlySignals:
    """Until training starts, SIGTERM ends the command at once as a clean stop (the session then cleans up);
    once Lightning's own handler is installed (it calls this one too) it does nothing."""

    def __init__(self) -> None:
        self.previous: Any = None

    def __enter__(self) -> _EarlySignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self)
        return self

    def __call__(self, signum: int, frame: Any) -> None:
        import sys

        app = sys.modules.get("medjdt.cli.lightning_app")
        stop = app.current_stop() if app is not None else None
        if stop is not None and stop.started:
            return  # Lightning's own handler (which calls this one too) stops the fit at the next step
        raise Stopped("stopped by SIGTERM before training started; nothing was saved", EXIT_SIGTERM)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _resume_hint(argv: Sequence[str]) -> str:
    args = [a for a in argv]
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            del args[i : i + 2]
            break
        if arg.startswith("--ckpt_path="):
            del args[i]
            break
    return shlex.join(["medjdt", *args, "--ckpt_path", "last"])


def run_training_cli(argv: Sequence[str]) -> int:
    """Run ``medjdt <fit|validate|test|predict> ...`` (``argv``: the subcommand first); returns the exit code.

    Raises:
        ValueError: a bad command line, config, input file or setting (the message is one line).
        Stopped: a fit stopped by SIGTERM or Ctrl-C (``last.ckpt`` written; the message says how to resume).
    """
    argv = join_list_values(list(argv))
    _early_checks(argv)
    from medjdt.cli.session import RunSession

    session = RunSession(argv[0], argv)
    with _EarlySignals():
        try:
            from medjdt.cli.lightning_app import build_cli
            from medjdt.cli.summary import summarise

            cli = build_cli(argv, session)
        except BaseException as err:
            from medjdt.data.datasets import stop_data_workers

            stop_data_workers()  # they ignore SIGTERM, so the interpreter's exit would wait for them forever
            stopped = _stop_message(session, err, argv)
            session.abort(err, stopped=stopped is not None)
            if stopped is not None:
                raise stopped from None
            raise
    fields = summarise(cli, session)
    session.finish(fields)
    return 0


def _stop_message(session: Any, err: BaseException, argv: Sequence[str]) -> Stopped | None:
    """A :class:`Stopped` for a fit ended by SIGTERM or Ctrl-C, else None."""
    if isinstance(err, Stopped):
        return err
    sigterm = type(err).__name__ == "SIGTERMException"
    if not sigterm and not isinstance(err, SystemExit):
        return None
    from medjdt.cli.lightning_app import current_stop

    stop = current_stop()
    if stop is None or stop.signal is None:
        if sigterm:  # validate, test or predict
            return Stopped(f"stopped by SIGTERM; the {session.command} results are incomplete", EXIT_SIGTERM)
        return None
    where = f"at epoch {stop.epoch} (step {stop.step})"
    saved = f"; saved {stop.checkpoint}" if stop.checkpoint is not None else ""
    code = EXIT_SIGINT if stop.signal == "SIGINT" else EXIT_SIGTERM
    what = "Ctrl-C" if stop.signal == "SIGINT" else "SIGTERM"
    return Stopped(f"stopped by {what} {where}{saved}; resume with: {_resume_hint(argv)}", code)


def check_training_cli(argv: Sequence[str]) -> int:
    """Run the checks of ``medjdt <stage> ...`` only (``medjdt check``); prints what was checked, returns 0.

    Raises:
        ValueError: the first check that fails (one line), as the stage itself would.
    """
    argv = join_list_values(list(argv))
    _early_checks(argv)
    from medjdt.cli.lightning_app import build_cli
    from medjdt.cli.session import CheckPassed, RunSession

    session = RunSession(argv[0], argv, check_only=True)
    try:
        build_cli(argv, session)
    except CheckPassed as passed:
        print(str(passed))
        return 0
    raise RuntimeError("the checks ended without a verdict")  # pragma: no cover - prepare() always raises

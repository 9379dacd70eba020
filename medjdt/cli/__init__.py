"""The ``medjdt`` command line.

One entry point. ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`medjdt.cli.training`;
``medjdt fit --help`` lists their options). Tool subcommands (``manifest``, ``demo-data``, ``check``, ...) are plain
argparse commands registered in :data:`COMMANDS`; each is a ``(help, add_arguments, run)`` triple where
``add_arguments(parser)`` declares its options and ``run(args) -> int`` executes it. Their modules import torch,
MONAI and Lightning only inside ``run``, so ``--help`` and argument errors answer at once.

Every error ends the command with one line on stderr and a non-zero exit code (see :mod:`medjdt.cli.errors`);
``--debug`` (anywhere before a ``--``) or ``MEDJDT_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from medjdt import __version__
from medjdt.cli.arguments import split_debug
from medjdt.cli.check import COMMANDS as CHECK_COMMANDS
from medjdt.cli.errors import report
from medjdt.data.commands import COMMANDS as DATA_COMMANDS
from medjdt.planning.commands import COMMANDS as PLANNING_COMMANDS
from medjdt.reporting.commands import COMMANDS as REPORTING_COMMANDS
from medjdt.validation import did_you_mean

__all__ = ["COMMANDS", "TRAINING_COMMANDS", "main"]


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
COMMANDS.update({name: Command(*spec) for name, spec in DATA_COMMANDS.items()})
COMMANDS.update({name: Command(*spec) for name, spec in CHECK_COMMANDS.items()})
COMMANDS.update({name: Command(*spec) for name, spec in REPORTING_COMMANDS.items()})
COMMANDS.update({name: Command(*spec) for name, spec in PLANNING_COMMANDS.items()})

# Handled by LightningCLI (imported lazily: it pulls in torch, MONAI and Lightning).
TRAINING_COMMANDS = {
    "fit": "train a model (medjdt fit --config configs/demo.yaml)",
    "validate": "evaluate a checkpoint on the validation fold",
    "test": "evaluate a checkpoint on the test cases",
    "predict": "write NIfTI probability and label maps for a checkpoint",
}


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised (and reported in one line by :func:`main`), not printed with
    the whole usage and exited from."""

    def error(self, message: str) -> None:  # type: ignore[override]
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        raise ValueError(f"{message} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medjdt",
        description="Medical image segmentation with soft labels (multi-rater fusion, JML/DML losses, calibration).",
        epilog="Add --debug (or set MEDJDT_DEBUG=1) to see the traceback of an error.",
    )
    parser.add_argument("--version", action="version", version=f"medjdt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in TRAINING_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} [LightningCLI; see medjdt {name} --help]", add_help=False)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medjdt`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        if command in TRAINING_COMMANDS:
            from medjdt.cli.training import run_training_cli

            return run_training_cli(argv)
        parser = _build_parser()
        # Everything after the first "--" is medjdt fit options for the commands that pass them on (sweep, study,
        # check), kept apart before argparse sees them.
        head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
        args, unknown = parser.parse_known_args(head)
        passthrough = getattr(args, "passthrough", False)
        if unknown and not passthrough:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if tail and not hasattr(args, "overrides") and not passthrough:
            parser.error(f"medjdt {args.command} takes no options after --")
        if passthrough:
            args.overrides = [*unknown, *tail]
        elif hasattr(args, "overrides"):
            args.overrides = [*(args.overrides or []), *tail]
        if args.command is None:
            parser.print_help()
            return 0
        return int(COMMANDS[args.command].run(args) or 0)
    except SystemExit:
        raise
    except BaseException as err:  # every error ends in one line (see medjdt.cli.errors)
        return report(command if command in COMMANDS or command in TRAINING_COMMANDS else "", err, debug)

"""The ``medjdt`` command line.

One entry point. ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI
(:mod:`medjdt.lightning_cli`; ``medjdt fit --help`` lists their options). Tool subcommands
(``manifest``, ``demo-data``, ...) are plain argparse
commands registered in :data:`COMMANDS`; each is a ``(help, add_arguments, run)`` triple
where ``add_arguments(parser)`` declares its options and ``run(args) -> int`` executes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from medjdt import __version__
from medjdt.data.commands import COMMANDS as DATA_COMMANDS
from medjdt.reporting.commands import COMMANDS as REPORTING_COMMANDS


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
COMMANDS.update({name: Command(*spec) for name, spec in DATA_COMMANDS.items()})
COMMANDS.update({name: Command(*spec) for name, spec in REPORTING_COMMANDS.items()})

# Handled by LightningCLI (imported lazily: it pulls in torch, MONAI and Lightning).
TRAINING_COMMANDS = {
    "fit": "train a model (medjdt fit --config configs/demo.yaml)",
    "validate": "evaluate a checkpoint on the validation fold",
    "test": "evaluate a checkpoint on the test cases",
    "predict": "write NIfTI probability and label maps for a checkpoint",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medjdt",
        description="Medical image segmentation with soft labels (multi-rater fusion, JML/DML losses, calibration).",
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        from medjdt.lightning_cli import run_training_cli

        try:
            run_training_cli(argv)
        except (ValueError, FileNotFoundError) as err:
            print(f"medjdt {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"medjdt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

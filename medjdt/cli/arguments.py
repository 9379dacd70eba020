"""Reading the command line before any heavy import: options given explicitly, list values written as several
words, config files, and "did you mean" suggestions. Standard library only."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from medjdt.validation import did_you_mean

# Options whose value is a list of numbers; ``--data.patch_size 96 96 96`` (the form of ``demo-data --shape``) is
# accepted as ``--data.patch_size [96, 96, 96]``.
LIST_OPTIONS = ("data.patch_size", "data.spacing", "data.window", "model.roi_size")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

__all__ = [
    "LIST_OPTIONS",
    "config_files",
    "did_you_mean",
    "explicit_options",
    "join_list_values",
    "option_value",
    "split_debug",
]


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (before any ``--``), and whether it was there."""
    out, debug, passthrough = [], False, False
    for arg in argv:
        if arg == "--" and not passthrough:
            passthrough = True
        elif arg == "--debug" and not passthrough:
            debug = True
            continue
        out.append(arg)
    return out, debug


def _option(arg: str) -> str | None:
    if not arg.startswith("--") or arg == "--":
        return None
    return arg[2:].split("=", 1)[0]


def explicit_options(argv: Sequence[str]) -> set[str]:
    """Dotted names of the options given on the command line (``--data.fold 1`` and ``--data.fold=1`` give
    ``data.fold``), with every prefix (``model.network.init_args.channels`` also gives ``model.network``)."""
    names = set()
    for arg in argv:
        name = _option(arg)
        if name:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def option_value(argv: Sequence[str], name: str) -> str | None:
    """The value of the last ``--name VALUE`` or ``--name=VALUE`` in ``argv``, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def config_files(argv: Sequence[str]) -> list[Path]:
    """Every ``--config``/``-c`` file, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def join_list_values(argv: Sequence[str], options: Iterable[str] = LIST_OPTIONS) -> list[str]:
    """Rewrite ``--opt 1 2 3`` as ``--opt [1, 2, 3]`` for the list ``options`` (one number stays as it is)."""
    wanted = {f"--{o}" for o in options}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg in wanted:
            numbers = []
            while i < len(argv) and _NUMBER.match(argv[i]):
                numbers.append(argv[i])
                i += 1
            if len(numbers) >= 2:
                out.append("[" + ", ".join(numbers) + "]")
            else:
                out.extend(numbers)
    return out

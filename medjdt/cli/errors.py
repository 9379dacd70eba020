"""How a command ends on an error: one line on stderr, an exit code, and a traceback only when asked for.

Bad input (``ValueError``, missing or unwritable files, a command-line or config error, Lightning's own
configuration errors) exits with 2, a run stopped by SIGTERM with 143 and by Ctrl-C with 130, anything else (a
fault of medjdt itself) with 1. ``--debug`` or ``MEDJDT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

__all__ = [
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "Stopped",
    "debug_wanted",
    "one_line",
    "report",
]


class Stopped(Exception):
    """A run stopped on purpose (SIGTERM, Ctrl-C): ``message`` says what was saved and how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def debug_wanted(flag: bool = False) -> bool:
    """True with ``--debug`` or ``MEDJDT_DEBUG=1``."""
    return flag or os.environ.get("MEDJDT_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message; its last line is
    the original message.
    """
    text = str(err)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else text
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    text = " ".join(text.split())
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text or type(err).__name__


def _is_input_error(err: BaseException) -> bool:
    if isinstance(err, (ValueError, OSError)):
        return True
    # Lightning's configuration errors and jsonargparse's argument errors, without importing either here
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"MisconfigurationException", "ArgumentError", "ParserError"})


def report(command: str, err: BaseException, debug: bool = False) -> int:
    """Print ``err`` for ``medjdt <command>`` on stderr (one line) and return the exit code."""
    if debug_wanted(debug):
        traceback.print_exception(err, file=sys.stderr)
    prog = f"medjdt {command}".strip()
    if isinstance(err, Stopped):
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    if _is_input_error(err):
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_INPUT
    hint = "" if debug_wanted(debug) else " (run with --debug or MEDJDT_DEBUG=1 for the traceback)"
    print(f"{prog}: internal error: {type(err).__name__}: {one_line(err)}{hint}", file=sys.stderr)
    return EXIT_INTERNAL

"""Running one ``medjdt`` subprocess of a sweep or a study, with its output appended to the run's log."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

__all__ = ["run_logged"]


def run_logged(command: list[str], log_path: Path, what: str) -> None:
    """Run ``command``, appending the command line and its output to ``log_path``.

    Raises:
        RuntimeError: the command failed; the one-line message names ``what``, the exit code, the log and the
            log's last line (a medjdt command's own one-line error).
    """
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else ""
        raise RuntimeError(f"{what} failed (exit code {code}; see {log_path}): {last}")

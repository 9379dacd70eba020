"""Atomic file writes: a temp file in the destination folder, then ``os.replace``.

A crash mid-write leaves at most a hidden temp file, never a half-written file under the final name. Temp files
are named ``.<name>.<host>.<pid>-<random>.tmp<suffix>``; the next write into the same folder deletes those whose
process is gone (same host) or that are older than a day, so a killed write leaves nothing behind for long.
Finished files get the permissions the umask gives a new file (``0644`` under the usual ``022``), like any other
tool's output, not the ``0600`` of a temp file.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_TEMP_RE = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)-[^.]+\.tmp")
_STALE_AGE_S = 86_400.0
_cleaned: set[str] = set()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of killed atomic writes in ``folder``; returns what was deleted."""
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        mine = match["host"] == host
        if (mine and int(match["pid"]) != os.getpid() and not process_alive(int(match["pid"]))) or age > _STALE_AGE_S:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then move it onto ``path`` atomically.

    ``suffix`` is kept at the end of the temp name so that writers that pick a format from the file
    name (``.nii.gz`` for nibabel) see the right one. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    if folder not in _cleaned:
        _cleaned.add(folder)
        clean_stale_temporaries(folder)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{_host()}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

"""``RunLock``: one process at a time works in a run folder.

The lock is a file created exclusively (``O_CREAT | O_EXCL``) that names its holder (host, pid). A lock left by a
killed process is stale and taken over: on the same host when its process no longer exists, on another host (a
requeued cluster job) when it has not been refreshed for :data:`STALE_AFTER_S` seconds; the holder refreshes it
with :meth:`RunLock.heartbeat` while it works.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from medjdt.data.atomic import process_alive

LOCK_FILE = ".medjdt.lock"
STALE_AFTER_S = 900.0
_HEARTBEAT_EVERY_S = 60.0

__all__ = ["LOCK_FILE", "RunLock"]


class RunLock:
    """Exclusive use of ``folder`` by this process (a context manager; ``acquire`` / ``release``).

    Raises:
        ValueError: from :meth:`acquire`, when another live process holds the folder (the message names it).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False
        self._last_beat = 0.0

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not process_alive(holder["pid"])
        return age > STALE_AFTER_S  # another host, or a lock file cut short by a kill: judge by its age

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; see the class docstring."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if not self._stale(holder):
                    raise ValueError(
                        f"run folder {self.folder} is in use by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('since')}); wait for it to end, or delete {self.path} if that process "
                        "is gone"
                    ) from None
                # Move the stale lock out of the way; of several processes doing so, one wins the next O_EXCL.
                aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            self._last_beat = time.monotonic()
            return self
        raise ValueError(f"could not lock run folder {self.folder}: {self.path} keeps changing")

    def heartbeat(self) -> None:
        """Refresh the lock's modification time (at most once a minute), so other hosts see it is alive."""
        now = time.monotonic()
        if self.held and now - self._last_beat >= _HEARTBEAT_EVERY_S:
            self._last_beat = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Give the lock back (only if this process holds it)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

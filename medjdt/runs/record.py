"""``run.json``: what made a run (command, identity, versions, git commit) and how it went.

Layout of the record (JSON object):

* ``kind``: ``fit``, ``validate``, ``test`` or ``predict``; ``status``: ``running``, ``finished``, ``stopped``
  (SIGTERM or Ctrl-C; resumable) or ``failed``;
* ``manifest``: ``path`` and ``sha256`` (of the CSV and its metadata JSON) of the dataset manifest;
* ``identity`` (fit): ``manifest`` (its ``sha256``: a dataset moved elsewhere stays the same), ``data`` and ``model``
  (the settings that define what is trained: fold, fusion, label smoothing, patch and preprocessing; network,
  losses, teacher): ``--ckpt_path last`` resumes only runs whose identity equals the command's;
* ``inputs`` (evaluations): the checkpoint (path, ``sha256``), the manifest and the data settings;
* ``sessions``: one entry per command that worked in the folder (``command``, ``cwd``, ``host``, ``started``,
  ``ended``, ``status``, ``resumed_from``), the first one being the run's creation;
* ``versions`` (python, medjdt, torch, monai, pytorch-lightning) and ``git`` (``commit``, ``dirty``, ``root``) of the
  working tree the command ran in, when it is a git repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from medjdt._documents import read_json_object

RUN_RECORD = "run.json"
_PACKAGES = ("medjdt", "torch", "monai", "pytorch-lightning", "torchmetrics")

__all__ = [
    "RUN_RECORD",
    "canonical",
    "describe_mismatch",
    "environment",
    "file_digest",
    "find_resumable",
    "manifest_digest",
    "read_record",
    "write_record",
]


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists, keys sorted), for comparing settings."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: str | os.PathLike) -> str:
    """SHA-256 over a manifest CSV and its metadata JSON (``<name>.json``; absent counts as empty)."""
    csv = Path(manifest)
    digest = hashlib.sha256(csv.read_bytes())
    meta = csv.with_suffix(".json")
    digest.update(b"\0" + (meta.read_bytes() if meta.is_file() else b""))
    return digest.hexdigest()


def _git(cwd: Path) -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"root": root, "commit": commit, "dirty": dirty}


def environment(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Library versions and the git state of the working tree ``cwd`` (default: the current folder)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git": _git(Path(cwd or os.getcwd()))}


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of ``folder``, or None when it has none.

    Raises:
        ValueError: the file exists but is not a JSON object (the message names it).
    """
    path = Path(folder) / RUN_RECORD
    return read_json_object(path, "run record") if path.is_file() else None


def write_record(folder: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``folder/run.json`` atomically."""
    from medjdt.data.atomic import atomic_write_text

    return atomic_write_text(Path(folder) / RUN_RECORD, json.dumps(canonical(dict(record)), indent=2) + "\n")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_mismatch(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any], limit: int = 2) -> str | None:
    """None when the identities are equal, else a short account of the first ``limit`` differences."""
    if recorded is None:
        return "no recorded identity"
    have, want = _flatten(canonical(dict(recorded)), ""), _flatten(canonical(dict(wanted)), "")
    keys = sorted(set(have) | set(want), key=lambda k: (not k.startswith("manifest"), k))
    differences = []
    for key in keys:
        if have.get(key) != want.get(key):
            if key == "manifest.sha256":
                differences.append(f"manifest content {str(have.get(key))[:8]} vs {str(want.get(key))[:8]}")
            else:
                differences.append(f"{key} {_short(have.get(key))} vs {_short(want.get(key))}")
    if not differences:
        return None
    more = f" (+{len(differences) - limit} more)" if len(differences) > limit else ""
    return ", ".join(differences[:limit]) + more


def find_resumable(candidates: Iterable[Path], identity: Mapping[str, Any], root: Path) -> Path:
    """The newest ``last.ckpt`` among run folders ``candidates`` whose recorded identity equals ``identity``.

    Args:
        candidates: run folders (``version_N``) to consider.
        identity: this command's identity (see the module docstring).
        root: where they were looked for (named in the error).

    Raises:
        ValueError: none matches; the one-line message lists each run found and why it does not match.
    """
    found = []
    reasons = []
    for folder in sorted(candidates):
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        try:
            record = read_record(folder)
        except ValueError as err:
            reasons.append(f"{folder.name}: {err}")
            continue
        if record is None:
            reasons.append(f"{folder.name}: no {RUN_RECORD} (pass its checkpoint path to resume it)")
            continue
        why = describe_mismatch(record.get("identity"), identity)
        if why is None:
            found.append(last)
        else:
            reasons.append(f"{folder.name}: {why}")
    if found:
        return max(found, key=lambda p: p.stat().st_mtime_ns)
    if not reasons:
        raise ValueError(f"--ckpt_path last: no run with a checkpoints/last.ckpt under {root}")
    raise ValueError(f"--ckpt_path last: no run under {root} matches this command; found {'; '.join(reasons)}")

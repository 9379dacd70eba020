"""Claiming run folders: a new ``version_N`` by exclusive creation, the run folder a checkpoint belongs to, and
the folder an evaluation of a checkpoint writes into."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medjdt._paths import writable_folder
from medjdt.runs.record import RUN_RECORD, canonical, read_record

__all__ = ["claim_version", "evaluation_folder", "is_run_folder", "run_folder_of_checkpoint", "version_number"]


def version_number(folder: Path) -> int:
    """``N`` of a ``version_N`` folder, or -1 for any other name."""
    head, _, number = folder.name.partition("_")
    return int(number) if head == "version" and number.isdigit() else -1


def claim_version(root: str | os.PathLike, what: str = "run root") -> Path:
    """Create and return ``root/version_N`` for the smallest free ``N`` above every existing one.

    ``os.mkdir`` either creates the folder or fails because it exists, so two processes (two shells, a SLURM
    array, a sweep) that claim under the same root at the same moment always get different folders.

    Raises:
        ValueError: ``root`` is a file or cannot be created or written (``what`` names it in the message).
    """
    root = writable_folder(root, what)
    number = max((version_number(p) for p in root.iterdir() if p.is_dir()), default=-1) + 1
    while True:
        candidate = root / f"version_{number}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            number += 1
            continue
        return candidate


def is_run_folder(folder: Path) -> bool:
    """True when ``folder`` holds a ``run.json``."""
    return (folder / RUN_RECORD).is_file()


def run_folder_of_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder that wrote ``checkpoint`` (``<run>/checkpoints/<name>.ckpt`` with ``<run>/run.json``), or
    None for a checkpoint kept anywhere else."""
    path = Path(os.path.abspath(checkpoint))
    if path.parent.name != "checkpoints":
        return None
    run = path.parent.parent
    return run if is_run_folder(run) else None


def evaluation_folder(run: Path, stage: str, checkpoint: Path, inputs: Mapping[str, Any]) -> tuple[Path, bool]:
    """The folder where ``stage`` (validate, test or predict) of ``checkpoint`` writes, inside its run folder.

    ``<run>/<stage>/<checkpoint stem>`` when it is new or was written from the same ``inputs`` (checkpoint hash,
    manifest hash, data settings: the results would be the same, so they are replaced), else the first
    ``<stem>-2``, ``<stem>-3``, ... that is new or matches: earlier results of other inputs are never overwritten.
    Returns ``(folder, created)``; a new folder is created exclusively.
    """
    parent = writable_folder(run / stage, f"{stage} folder")
    wanted = canonical(dict(inputs))
    for k in range(1, 10_000):
        folder = parent / (checkpoint.stem if k == 1 else f"{checkpoint.stem}-{k}")
        try:
            os.mkdir(folder)
            return folder, True
        except FileExistsError:
            pass
        try:
            record = read_record(folder)
        except ValueError:
            continue
        if record is not None and canonical(record.get("inputs")) == wanted:
            return folder, False
    raise ValueError(f"no free evaluation folder under {parent}")  # pragma: no cover - 10,000 evaluations

"""What a checkpoint given to ``--ckpt_path`` means for a run: which file ``last`` is, what its callbacks kept,
which run it belongs to, and the checkpoints an interrupted run left behind that the resumed state does not know.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medjdt.runs import describe_mismatch, find_resumable, read_record, run_folder_of_checkpoint

# Values of Lightning's ckpt_path that are not files.
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")

__all__ = [
    "CKPT_KEYWORDS",
    "CheckpointPlan",
    "plan_evaluation_checkpoint",
    "plan_fit_checkpoint",
    "remove_orphan_checkpoints",
]


@dataclass
class CheckpointPlan:
    """A readable checkpoint and what the command does with it.

    Attributes:
        path: the checkpoint file.
        epoch, global_step: where it was saved.
        kept: checkpoints its callbacks' state refers to (best, top-k, last): a resume keeps them.
        callback_dirs: state key -> ``dirpath`` of the checkpoint callbacks that wrote it.
        run: the run folder a fit resumes in (the checkpoint's own run), or None for a new folder.
    """

    path: Path
    epoch: int | None = None
    global_step: int | None = None
    kept: set[str] = field(default_factory=set)
    callback_dirs: dict[str, str] = field(default_factory=dict)
    run: Path | None = None


def _kept_checkpoints(callbacks: dict[str, Any]) -> set[str]:
    return {
        str(path)
        for state in callbacks.values()
        if isinstance(state, dict)
        for path in (
            state.get("best_model_path"),
            state.get("kth_best_model_path"),
            state.get("last_model_path"),
            *(state.get("best_k_models") or {}),
        )
        if path
    }


def plan_fit_checkpoint(ckpt: str, identity: dict[str, Any], candidates: Iterable[Path], root: Path) -> CheckpointPlan:
    """The checkpoint ``medjdt fit --ckpt_path ckpt`` resumes.

    ``last`` is the newest ``last.ckpt`` among ``candidates`` (run folders under ``root``) whose recorded
    identity equals ``identity``. A checkpoint of a run made with other settings is refused.

    Raises:
        ValueError: a keyword other than ``last``, no matching run, an unreadable or foreign checkpoint, or a
            run made with other settings (the message says which).
    """
    if ckpt == "last":
        ckpt = str(find_resumable(list(candidates), identity, root))
    elif ckpt in CKPT_KEYWORDS:
        raise ValueError(f"--ckpt_path {ckpt}: medjdt fit resumes from 'last' or from a checkpoint file")
    from medjdt.models.checkpoints import read_checkpoint

    info = read_checkpoint(ckpt, training_state=True)
    plan = CheckpointPlan(
        Path(ckpt), info.get("epoch"), info.get("global_step"), _kept_checkpoints(info.get("callbacks") or {})
    )
    run = run_folder_of_checkpoint(ckpt)
    if run is not None:
        why = describe_mismatch(read_record(run).get("identity"), identity)
        if why is not None:
            raise ValueError(
                f"checkpoint {ckpt} belongs to run {run}, made with other settings ({why}); resume it with the "
                "settings it was trained with, or start a new run without --ckpt_path"
            )
        plan.run = run
    return plan


def plan_evaluation_checkpoint(ckpt: str, command: str) -> CheckpointPlan:
    """The checkpoint ``medjdt validate|test|predict --ckpt_path ckpt`` evaluates.

    Raises:
        ValueError: a keyword instead of a file, or an unreadable or foreign checkpoint.
    """
    if ckpt in CKPT_KEYWORDS:
        raise ValueError(f"--ckpt_path {ckpt}: medjdt {command} needs the path of a checkpoint file")
    from medjdt.models.checkpoints import read_checkpoint

    info = read_checkpoint(ckpt)
    states = info.get("callbacks") or {}
    dirs = {
        key: state.get("dirpath") for key, state in states.items() if isinstance(state, dict) and "dirpath" in state
    }
    return CheckpointPlan(Path(ckpt), info.get("epoch"), info.get("global_step"), callback_dirs=dirs)


def remove_orphan_checkpoints(folder: Path, plan: CheckpointPlan, say: Callable[[str], None]) -> None:
    """Delete the checkpoints in ``folder/checkpoints`` that a killed run wrote after the resumed one and that the
    resumed state does not know (a best checkpoint of an epoch that will be trained again): they would stay as a
    second "best" beside the real one."""
    resumed = plan.path.stat().st_mtime_ns
    kept = {os.path.realpath(p) for p in plan.kept} | {os.path.realpath(plan.path)}
    for path in sorted((folder / "checkpoints").glob("*.ckpt")):
        if os.path.realpath(path) not in kept and path.stat().st_mtime_ns > resumed:
            path.unlink()
            say(f"medjdt fit: removed {path}, written after {plan.path.name} by the interrupted run")

"""Reading medjdt checkpoints with a clear error for a file that is missing, truncated or not one of ours."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_checkpoint"]


def read_checkpoint(
    path: str | os.PathLike, what: str = "checkpoint", *, training_state: bool = False
) -> dict[str, Any]:
    """Load a Lightning checkpoint written by medjdt (on the CPU) and check that it is one.

    Args:
        path: the ``.ckpt`` file.
        what: how the message names it (``"checkpoint"``, ``"teacher checkpoint"``).
        training_state: also require what resuming needs (epoch, global step, loop and optimizer states).

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters`` with the ``network`` spec, ...).

    Raises:
        ValueError: naming the file, when it is missing, a folder, truncated or unreadable (not a PyTorch file),
            not a Lightning checkpoint of a medjdt model, or lacks the training state asked for.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zip, pickle and torch raise many types for truncated or foreign files
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"{what} {path} cannot be read: it is truncated or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{reason})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{what} {path} is not a Lightning checkpoint (no state_dict)")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "network" not in hparams:
        raise ValueError(f"{what} {path} is not a medjdt checkpoint (its hyper-parameters hold no network spec)")
    if training_state:
        missing = [key for key in ("epoch", "global_step", "loops", "optimizer_states") if key not in ckpt]
        if missing:
            raise ValueError(f"{what} {path} cannot resume training: it lacks {missing} (a weights-only checkpoint?)")
    return ckpt

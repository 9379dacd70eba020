"""``--model.temperature auto``: the temperature of a checkpoint, fitted once on its run's validation fold.

The fit is stored beside the checkpoint as ``<checkpoint stem>.temperature.json`` (the temperature, the NLL before
and after, the voxels and validation cases used, the manifest and fold, the checkpoint's SHA-256) and reused while
the checkpoint is unchanged. The data come from the run that made the checkpoint (its ``run.json`` and
``config.yaml``): the manifest it was trained on (checked against the recorded SHA-256) and its validation fold,
never the data of the command asking for the temperature, so a test set can never be used to fit it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from medjdt.data.atomic import atomic_write_text
from medjdt.runs import manifest_digest, read_record, run_folder_of_checkpoint
from medjdt.runs.record import file_digest

__all__ = ["resolve_temperature", "temperature_file"]


def temperature_file(checkpoint: str | os.PathLike) -> Path:
    """Where the temperature of ``checkpoint`` is stored: ``<stem>.temperature.json`` beside it."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.temperature.json")


def _stored(path: Path, digest: str) -> float | None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(stored, dict) and stored.get("checkpoint", {}).get("sha256") == digest:
        return float(stored["temperature"])
    return None


def _run_data(checkpoint: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """The data settings, manifest path and record of the run that made ``checkpoint``."""
    run = run_folder_of_checkpoint(checkpoint)
    if run is None or not (run / "config.yaml").is_file():
        raise ValueError(
            f"cannot fit a temperature for {checkpoint}: it belongs to no medjdt run folder (no run.json and "
            "config.yaml beside its checkpoints/ folder), so its validation data are unknown; give "
            "--model.temperature a number instead"
        )
    record = read_record(run) or {}
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    data = dict(config.get("data") or {})
    manifest = Path((record.get("manifest") or {}).get("path") or data.get("manifest", ""))
    if not manifest.is_file():
        raise ValueError(f"cannot fit a temperature for {checkpoint}: its run's manifest {manifest} is gone")
    recorded = ((record.get("identity") or {}).get("manifest") or {}).get("sha256")
    if recorded is not None and manifest_digest(manifest) != recorded:
        raise ValueError(
            f"cannot fit a temperature for {checkpoint}: manifest {manifest} changed since the run was trained"
        )
    sessions = record.get("sessions") or [{}]
    cwd = Path(sessions[0].get("cwd") or os.getcwd())
    if data.get("cache_dir") and not os.path.isabs(data["cache_dir"]):
        data["cache_dir"] = str(cwd / data["cache_dir"])
    return data, manifest, record


def resolve_temperature(checkpoint: str | os.PathLike, say: Callable[[str], None] = print) -> float:
    """The temperature of ``checkpoint``: read from beside it, or fitted on its run's validation fold and stored.

    Raises:
        ValueError: the checkpoint belongs to no run folder, or its run's manifest is gone or changed.
    """
    checkpoint = Path(checkpoint)
    digest = file_digest(checkpoint)
    path = temperature_file(checkpoint)
    stored = _stored(path, digest)
    if stored is not None:
        return stored
    import torch

    from medjdt.data import SegmentationDataModule
    from medjdt.models.semi import SemiSupervisedModule
    from medjdt.models.temperature import collect_validation_logits, fit_temperature

    data, manifest, _ = _run_data(checkpoint)
    settings = {**data, "manifest": str(manifest), "demo": None, "num_folds": None}
    datamodule = SegmentationDataModule(**settings)
    datamodule.setup("validate")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = SemiSupervisedModule.load_from_checkpoint(checkpoint, map_location=device)
    module.temperature = None
    logits, target, n_cases = collect_validation_logits(
        module,
        datamodule.val_dataloader(),
        fusion=datamodule.fusion,
        num_classes=datamodule.num_classes,
        seed=int(data.get("seed") or 0),
    )
    fit = fit_temperature(logits, target, n_cases=n_cases)
    cases = [record.case_id for record in datamodule.datasets["val"].data]
    payload = {
        **fit.as_dict(),
        "fitted_on": {"manifest": str(manifest), "fold": datamodule.fold, "fusion": datamodule.fusion, "cases": cases},
        "checkpoint": {"path": str(checkpoint.absolute()), "sha256": digest},
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    say(
        f"medjdt: temperature {fit.temperature:.4f} fitted on {n_cases} validation case(s) of {manifest} (fold "
        f"{datamodule.fold}, {datamodule.fusion} target): NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}; saved "
        f"{path}"
    )
    return fit.temperature

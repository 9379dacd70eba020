"""``medjdt fuse``: precompute one fused training target per case as NIfTI, plus an index CSV.

Output folder:

* ``fusion.json``: the settings (manifest, method, seed of ``random``, classes), written first; a folder never
  mixes settings.
* ``<case_id>_fused.nii.gz`` per case, on the grid and affine of the case's image: soft methods (mean, weighted,
  STAPLE) write float32 probabilities with the C classes on the last axis (NIfTI order); hard methods (majority,
  random) write the uint8 label map.
* ``index.csv``: ``case_id, fold, method, seed, target, format`` (``target`` relative to the folder; ``seed`` only
  for ``random``), written last.

Every file is written atomically. Re-running with the same settings keeps each case file that reads back
completely with the expected shape and (re)writes the missing or damaged ones, so an interrupted run resumes.
``random`` draws its rater with a generator seeded by ``(seed, case_id)``: the draw of a case does not depend on
which other cases are fused, or in which order.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from medjdt._documents import read_json_object
from medjdt._paths import child_path
from medjdt._progress import progress as progress_bar
from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.data.io import load_case, write_nifti
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest
from medjdt.labels import FUSION_METHODS, fuse
from medjdt.validation import check_choice, check_number

SOFT_METHODS = ("mean", "weighted", "staple")
SETTINGS_FILE = "fusion.json"
INDEX_FILE = "index.csv"
TARGET_SUFFIX = "_fused.nii.gz"


@dataclass(frozen=True)
class FusionOutput:
    """What :func:`write_fused_targets` did: the index CSV, and how many case files it wrote or found complete."""

    index: Path
    written: int
    kept: int


def target_path(out_dir: str | os.PathLike, case_id: str) -> Path:
    """The fused target file of ``case_id`` in ``out_dir``."""
    return child_path(out_dir, f"{case_id}{TARGET_SUFFIX}", "case_id")


def case_generator(seed: int, case_id: str) -> torch.Generator:
    """The generator of ``random`` fusion for one case, seeded by ``seed`` and the case id."""
    state = np.random.SeedSequence([seed, zlib.crc32(case_id.encode("utf-8"))]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _expected_shape(record: CaseRecord, manifest: Manifest, method: str) -> tuple[int, ...]:
    """The shape of the case's target file, from its image header."""
    try:
        spatial = tuple(nib.load(record.image).shape[: manifest.spatial_dims])
    except Exception as err:  # nibabel raises many types for missing or unreadable files
        raise ValueError(f"case {record.case_id!r}: cannot read image {record.image}: {err}") from err
    return (*spatial, manifest.num_classes) if method in SOFT_METHODS else spatial


def _is_complete(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether ``path`` reads back completely (every byte decompressed) with ``shape``."""
    try:
        data = np.asarray(nib.load(path).dataobj)
    except Exception:  # a damaged file of any kind is redone
        return False
    return data.shape == shape


def _write_target(record: CaseRecord, manifest: Manifest, method: str, seed: int, path: Path) -> None:
    case = load_case(record, num_classes=manifest.num_classes, spatial_dims=manifest.spatial_dims)
    generator = case_generator(seed, record.case_id) if method == "random" else None
    target = fuse(case["raters"].as_tensor(), method, manifest.num_classes, generator=generator)
    affine = np.asarray(case["image"].affine, dtype=np.float64)
    if method in SOFT_METHODS:
        write_nifti(np.moveaxis(target.numpy(), 0, -1), affine, path, dtype=np.float32)
    else:
        write_nifti(target.argmax(0).numpy(), affine, path, dtype=np.uint8)


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        existing = read_json_object(path, "fusion settings")
        if existing != settings:
            raise ValueError(
                f"{out} already holds targets fused with other settings ({existing}); not mixing them with "
                f"{settings}: choose another output folder"
            )
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def write_fused_targets(
    manifest: str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> FusionOutput:
    """Fuse the raters of every case of ``manifest`` with ``method`` and write the targets to ``out_dir``.

    Args:
        manifest: the dataset manifest CSV.
        method: one of ``medjdt.labels.FUSION_METHODS``.
        out_dir: output folder (layout in the module docstring); created if needed.
        seed: seed of ``random`` fusion (the other methods are deterministic and ignore it); >= 0.
        progress: called with one line per case written.

    Returns:
        :class:`FusionOutput`.

    Raises:
        ValueError: unknown method, negative seed, a bad manifest, a case id that is not a plain file name, an
            output folder holding other settings, or any case that cannot be loaded (naming the case).
    """
    check_choice("method", method, FUSION_METHODS)
    seed = check_number("seed", seed, low=0, integer=True)
    data = read_manifest(manifest)
    records = data.cases()
    for record in records:
        if Path(record.case_id).name != record.case_id or record.case_id in (".", ".."):
            raise ValueError(f"case id {record.case_id!r} cannot be used as a file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_used = seed if method == "random" else None  # the other methods are deterministic
    settings = {
        "manifest": str(data.path),
        "method": method,
        "seed": seed_used,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
    }
    _check_settings(out, settings)
    written = kept = 0
    for record in progress_bar(records, desc=f"fuse ({method})"):
        path = target_path(out, record.case_id)
        if path.is_file() and _is_complete(path, _expected_shape(record, data, method)):
            kept += 1
            continue
        _write_target(record, data, method, seed, path)
        written += 1
        if progress is not None:
            progress(f"{record.case_id}: {path}")
    index = pd.DataFrame(
        {
            "case_id": [r.case_id for r in records],
            "fold": [r.fold for r in records],
            "method": method,
            "seed": seed_used,
            "target": [target_path(out, r.case_id).name for r in records],
            "format": "probabilities" if method in SOFT_METHODS else "labels",
        }
    )
    index_path = atomic_write(out / INDEX_FILE, lambda tmp: index.to_csv(tmp, index=False), suffix=".csv")
    return FusionOutput(index=index_path, written=written, kept=kept)

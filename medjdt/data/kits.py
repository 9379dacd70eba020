"""KiTS21/KiTS23 per-instance annotation files: names, classes and region priority.

Each case folder holds ``segmentations/`` (KiTS21) or ``instances/`` (KiTS23) with one binary mask per
region instance and annotation: ``{kidney,tumor,cyst}_instance-I_annotation-J.nii.gz``. Rater ``J``'s
label map is assembled from every instance's annotation ``J``. Where regions overlap in one annotation,
the higher-priority region wins: **tumor over cyst over kidney** (the KiTS hierarchy
kidney+masses > masses > tumor). Classes: 0 background, 1 kidney, 2 tumor, 3 cyst.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CLASS_NAMES = ["background", "kidney", "tumor", "cyst"]
REGION_LABELS = {"kidney": 1, "tumor": 2, "cyst": 3}
# Painting order: later regions overwrite earlier ones.
PAINT_ORDER = ("kidney", "cyst", "tumor")
INSTANCE_DIRS = ("instances", "segmentations")

_INSTANCE_RE = re.compile(r"^(kidney|tumor|cyst)_instance-(\d+)_annotation-(\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class InstanceFile:
    """One instance annotation file: ``region`` (kidney/tumor/cyst), ``instance`` and ``annotation`` numbers."""

    path: Path
    region: str
    instance: int
    annotation: int


def find_instance_dir(case_dir: Path) -> Path | None:
    """The case's instance folder (``instances/`` or ``segmentations/``), or ``None`` when it has neither."""
    for name in INSTANCE_DIRS:
        if (case_dir / name).is_dir():
            return case_dir / name
    return None


def list_instance_files(instance_dir: Path) -> list[InstanceFile]:
    """All instance annotation files in ``instance_dir`` (other files are ignored), sorted by name."""
    files = []
    for p in sorted(instance_dir.iterdir()):
        m = _INSTANCE_RE.match(p.name)
        if m and p.is_file():
            files.append(InstanceFile(p, m.group(1), int(m.group(2)), int(m.group(3))))
    return files


def annotation_files(instance_dir: Path, annotation: int, case_id: str) -> list[InstanceFile]:
    """The files of annotation ``annotation``, one per instance, in painting order.

    Raises ``ValueError`` naming the case when the folder has no such annotation, or when some instance
    lacks annotation ``annotation`` (that rater's map would silently miss a region).
    """
    files = list_instance_files(instance_dir)
    instances = {(f.region, f.instance) for f in files}
    chosen = [f for f in files if f.annotation == annotation]
    if not chosen:
        raise ValueError(f"case {case_id!r}: no annotation-{annotation} instance files in {instance_dir}")
    missing = sorted(instances - {(f.region, f.instance) for f in chosen})
    if missing:
        names = [f"{r}_instance-{i}_annotation-{annotation}" for r, i in missing]
        raise ValueError(f"case {case_id!r}: {instance_dir} lacks {names} (other annotations of those instances exist)")
    return sorted(chosen, key=lambda f: (PAINT_ORDER.index(f.region), f.instance))


def annotation_numbers(instance_dir: Path) -> list[int]:
    """The sorted annotation numbers present in ``instance_dir``."""
    return sorted({f.annotation for f in list_instance_files(instance_dir)})

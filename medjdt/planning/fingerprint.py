"""A dataset's fingerprint: what every case of a manifest looks like, read once and kept beside the plan.

Per case (one row of ``fingerprint.csv``): the stored grid (``shape_i``, ``spacing_i`` in mm, per stored axis), its
orientation code (nibabel ``aff2axcodes``, e.g. ``LPS``), the number of raters, per foreground class the size of
the **mean-fused** target (the average over raters of each rater's volume, i.e. the volume of the soft target
that ``data.fusion: mean`` trains on; mL in 3D, mm² in 2D), and the image intensities inside the union of the
raters' foreground (percentiles 0.5, 50, 99.5, mean and std, per image channel). ``fingerprint.json`` holds the
dataset-level summary and the key of the manifest it was made from: a SHA-256 of the manifest's path, CSV and
metadata JSON. A later call with an unchanged manifest reuses the files instead of reading the cases again.

Everything here is standard library and numpy at import time; nibabel, torch and MONAI (through
:func:`medjdt.data.io.load_case`) are imported when cases are read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medjdt._documents import read_json_object
from medjdt._progress import progress
from medjdt.data.atomic import atomic_write_text
from medjdt.validation import check_number

__all__ = ["FORMAT_VERSION", "PERCENTILES", "Fingerprint", "fingerprint_case", "make_fingerprint", "manifest_key"]

FORMAT_VERSION = 1
PERCENTILES = (0.5, 50.0, 99.5)
CSV_NAME = "fingerprint.csv"
JSON_NAME = "fingerprint.json"
_RAS_PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))


class Fingerprint:
    """The fingerprint of a manifest: ``rows`` (one dict per case, as in ``fingerprint.csv``) and ``summary``
    (the dataset-level ``fingerprint.json``). ``reused`` says whether it came from the cache."""

    def __init__(self, rows: list[dict[str, Any]], summary: dict[str, Any], reused: bool = False):
        self.rows = rows
        self.summary = summary
        self.reused = reused

    @property
    def spatial_dims(self) -> int:
        return int(self.summary["spatial_dims"])

    def ras(self, key: str) -> np.ndarray:
        """``(N, D)`` per-case ``"shape"`` or ``"spacing"`` in the axis order of RAS-reoriented data (the order
        ``data.spacing`` and ``data.patch_size`` use with ``data.orientation: RAS``). 2D cases keep their stored
        order, as the data module's header checks do."""
        dims = self.spatial_dims
        out = []
        for row in self.rows:
            stored = [float(row[f"{key}_{i}"]) for i in range(dims)]
            order = ras_order(str(row["orientation"]), dims) if dims == 3 else list(range(dims))
            out.append([stored[i] for i in order])
        return np.asarray(out, dtype=np.float64).reshape(len(self.rows), dims)


def ras_order(code: str, dims: int) -> list[int]:
    """For each axis of RAS-reoriented data, the stored axis it comes from (``"SPL"`` -> ``[2, 1, 0]``).

    A code that does not name one axis of each RAS pair (a 2D slice that is not axial) keeps the stored order.
    """
    order = []
    for pair in _RAS_PAIRS[:dims]:
        hits = [i for i, letter in enumerate(code[:dims]) if letter in pair]
        if len(hits) != 1:
            return list(range(dims))
        order.append(hits[0])
    return order if sorted(order) == list(range(dims)) else list(range(dims))


def manifest_key(manifest_path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the fingerprint format, the manifest's absolute path, its CSV and its metadata JSON."""
    path = Path(os.path.abspath(manifest_path))
    digest = hashlib.sha256(f"medjdt-fingerprint-{FORMAT_VERSION}\0{path}\0".encode())
    for part in (path, path.with_suffix(".json")):
        digest.update(part.read_bytes() if part.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def _intensity_prefix(channel: int, channels: int) -> str:
    return "fg_" if channels == 1 else f"fg_c{channel}_"


def _size_column(name: str, dims: int) -> str:
    return f"volume_ml_{name}" if dims == 3 else f"area_mm2_{name}"


def fingerprint_case(record: Any, *, class_names: Sequence[str], spatial_dims: int, in_channels: int) -> dict:
    """Read one case (a :class:`~medjdt.data.manifest.CaseRecord`) and describe it: one ``fingerprint.csv`` row.

    The image ``(K, *spatial)`` and rater maps ``(R, *spatial)`` are read with :func:`medjdt.data.io.load_case`
    (the training loader, with its geometry checks); an unlabelled case has ``raters`` 0 and empty sizes and
    intensities. Raises ``ValueError`` naming the case for unreadable or inconsistent files.
    """
    import nibabel as nib

    from medjdt.data.io import load_case, read_image

    num_classes = len(class_names)
    if record.labels:
        case = load_case(record, num_classes=num_classes, spatial_dims=spatial_dims, in_channels=in_channels)
        image, raters = case["image"], case["raters"].numpy()
    else:
        image = read_image(record.image, case_id=record.case_id, spatial_dims=spatial_dims, in_channels=in_channels)
        raters = np.zeros((0, *image.shape[1:]), dtype=np.uint8)
    affine = np.asarray(image.affine, dtype=np.float64)
    axes = affine[:3, :spatial_dims]
    spacing = np.sqrt((axes**2).sum(0))
    if spatial_dims == 3:
        codes = nib.aff2axcodes(affine)
        voxel = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0  # mm³ -> mL
    else:
        sub = affine[np.ix_([0, 1, 3], [0, 1, 3])]
        codes = nib.aff2axcodes(sub)
        voxel = abs(float(np.linalg.det(affine[:2, :2])))  # mm²
    row: dict[str, Any] = {"case_id": record.case_id, "fold": record.fold, "raters": int(raters.shape[0])}
    row["orientation"] = "".join(c if c is not None else "?" for c in codes[:spatial_dims])
    for i in range(spatial_dims):
        row[f"shape_{i}"] = int(image.shape[1 + i])
    for i in range(spatial_dims):
        row[f"spacing_{i}"] = round(float(spacing[i]), 6)
    for c in range(1, num_classes):
        size = float((raters == c).sum(axis=tuple(range(1, raters.ndim))).mean()) * voxel if len(raters) else ""
        row[_size_column(class_names[c], spatial_dims)] = size if size == "" else round(size, 6)
    foreground = (raters > 0).any(axis=0) if len(raters) else np.zeros(image.shape[1:], dtype=bool)
    row["fg_voxels"] = int(foreground.sum())
    data = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    for k in range(data.shape[0]):
        prefix = _intensity_prefix(k, data.shape[0])
        values = data[k][foreground].astype(np.float64)
        stats = [""] * (len(PERCENTILES) + 2)
        if values.size:
            stats = [*np.percentile(values, PERCENTILES).tolist(), float(values.mean()), float(values.std())]
        for name, value in zip([*(f"p{p:g}" for p in PERCENTILES), "mean", "std"], stats):
            row[prefix + name] = value if value == "" else round(float(value), 4)
    return row


def _median_min_max(values: Sequence[float]) -> dict[str, float] | None:
    values = [float(v) for v in values if v != "" and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def summarise(rows: list[dict[str, Any]], manifest: Any, key: str) -> dict[str, Any]:
    """The dataset-level summary (``fingerprint.json``) of the case rows of ``manifest``."""
    dims, names = manifest.spatial_dims, manifest.class_names
    fp = Fingerprint(rows, {"spatial_dims": dims})
    spacing, shape = fp.ras("spacing"), fp.ras("shape")
    labelled = [r for r in rows if int(r["raters"]) > 0]
    orientations: dict[str, int] = {}
    for r in rows:
        orientations[str(r["orientation"])] = orientations.get(str(r["orientation"]), 0) + 1
    channels = manifest.in_channels
    intensity = []
    for k in range(channels):
        prefix = _intensity_prefix(k, channels)
        stats = {
            name: _median_min_max([r[prefix + name] for r in labelled])
            for name in [*(f"p{p:g}" for p in PERCENTILES), "mean", "std"]
        }
        intensity.append(stats)
    unit = "mL" if dims == 3 else "mm2"
    return {
        "format_version": FORMAT_VERSION,
        "manifest": str(manifest.path),
        "manifest_key": key,
        "modality": manifest.modality,
        "spatial_dims": dims,
        "in_channels": channels,
        "num_classes": manifest.num_classes,
        "class_names": list(names),
        "cases": len(rows),
        "labelled_cases": len(labelled),
        "folds": sorted({int(r["fold"]) for r in rows}),
        "raters": _median_min_max([r["raters"] for r in labelled]),
        "orientations": orientations,
        "axis_order": "RAS (the order of data.spacing and data.patch_size after data.orientation: RAS)",
        "spacing_mm": {
            "median": np.median(spacing, 0).tolist(),
            "p10": np.percentile(spacing, 10, axis=0).tolist(),
            "min": spacing.min(0).tolist(),
            "max": spacing.max(0).tolist(),
        },
        "shape": {"median": np.median(shape, 0).tolist(), "min": shape.min(0).tolist(), "max": shape.max(0).tolist()},
        "size_unit": unit,
        "size_fusion": "mean of the raters (each rater's class size, averaged): the soft target of fusion 'mean'",
        "sizes": {name: _median_min_max([r[_size_column(name, dims)] for r in labelled]) for name in names[1:]},
        "intensity_region": "union of the raters' foreground",
        "intensity": intensity,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _read_cached(out: Path, key: str) -> Fingerprint | None:
    """The fingerprint in ``out`` when it was made from the manifest with ``key``; None otherwise."""
    csv_path, json_path = out / CSV_NAME, out / JSON_NAME
    if not (csv_path.is_file() and json_path.is_file()):
        return None
    try:
        summary = read_json_object(json_path, "fingerprint")
    except ValueError:
        return None
    if summary.get("manifest_key") != key or summary.get("format_version") != FORMAT_VERSION:
        return None
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != summary.get("cases"):
        return None
    return Fingerprint(rows, summary, reused=True)


def make_fingerprint(
    manifest_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    refresh: bool = False,
    reader: Callable[..., dict] | None = None,
) -> Fingerprint:
    """The fingerprint of a manifest, written to ``out/fingerprint.csv`` and ``out/fingerprint.json``.

    Args:
        manifest_path: the manifest CSV (its metadata JSON beside it).
        out: folder for the two files; when they hold the fingerprint of this very manifest (same path, same
            CSV and JSON bytes) they are reused and no case is read.
        workers: cases read at once (threads; reading NIfTI and computing statistics release the GIL).
        refresh: read the cases even when the files in ``out`` match the manifest.
        reader: the per-case function (default :func:`fingerprint_case`).

    Raises:
        ValueError: a bad manifest, or a case that cannot be read (naming the case and file).
    """
    workers = check_number("--workers", workers, low=1, integer=True)
    out = Path(out)
    key = manifest_key(manifest_path)
    if not refresh:
        cached = _read_cached(out, key)
        if cached is not None:
            return cached
    from medjdt.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    records = manifest.cases()
    read = reader or fingerprint_case
    options = {
        "class_names": manifest.class_names,
        "spatial_dims": manifest.spatial_dims,
        "in_channels": manifest.in_channels,
    }

    def one(record: Any) -> dict[str, Any]:
        return read(record, **options)

    if workers == 1:
        rows = list(progress(map(one, records), total=len(records), desc="fingerprint"))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(progress(pool.map(one, records), total=len(records), desc="fingerprint"))
    summary = summarise(rows, manifest, key)
    _write_csv(out / CSV_NAME, rows)
    atomic_write_text(out / JSON_NAME, json.dumps(summary, indent=2) + "\n")  # last: it marks the pair complete
    return Fingerprint(rows, summary)

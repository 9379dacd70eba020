"""Dataset manifests: a long-format CSV (one row per case x rater annotation) plus a JSON metadata file.

The schema is documented in ``data_manifests/README.md``. In short, ``<name>.csv`` has the columns
``case_id, image, label, rater, fold`` (extra columns are kept), paths are relative to the CSV's folder
or absolute, and ``<name>.json`` next to it holds ``num_classes``, ``class_names``, ``modality``,
``spatial_dims`` and optionally ``in_channels``, ``num_folds`` and provenance fields.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medjdt.data.atomic import atomic_write, atomic_write_text

REQUIRED_COLUMNS = ("case_id", "image", "label", "rater", "fold")
REQUIRED_METADATA = ("num_classes", "class_names", "modality", "spatial_dims")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CaseRecord:
    """One case of a manifest: its image, and one label source per rater (in manifest row order).

    ``labels[i]`` is the label map of rater ``raters[i]``: a NIfTI file, or for KiTS21/23 the case's
    instance folder, from which the annotation numbered ``raters[i]`` is assembled.
    """

    case_id: str
    image: Path
    labels: tuple[Path, ...]
    raters: tuple[str, ...]
    fold: int


@dataclass
class Manifest:
    """A parsed manifest: ``frame`` has absolute paths; metadata comes from the JSON file next to the CSV."""

    frame: pd.DataFrame
    num_classes: int
    class_names: list[str]
    modality: str
    spatial_dims: int
    path: Path
    in_channels: int = 1
    num_folds: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def cases(self, folds: Iterable[int] | None = None) -> list[CaseRecord]:
        """The cases (in order of first appearance), optionally only those whose fold is in ``folds``."""
        wanted = None if folds is None else {int(f) for f in folds}
        records = []
        for case_id, rows in self.frame.groupby("case_id", sort=False):
            fold = int(rows["fold"].iloc[0])
            if wanted is not None and fold not in wanted:
                continue
            records.append(
                CaseRecord(
                    case_id=str(case_id),
                    image=Path(rows["image"].iloc[0]),
                    labels=tuple(Path(p) for p in rows["label"]),
                    raters=tuple(str(r) for r in rows["rater"]),
                    fold=fold,
                )
            )
        return records

    def check_files(self) -> None:
        """Raise ``ValueError`` naming every case whose image or label path does not exist."""
        problems = []
        for col in ("image", "label"):
            for case_id, p in zip(self.frame["case_id"], self.frame[col]):
                if not Path(p).exists():
                    problems.append(f"case {case_id!r}: {col} file {p} does not exist")
        if problems:
            shown = "; ".join(sorted(set(problems))[:10])
            raise ValueError(f"manifest {self.path}: {len(set(problems))} missing file(s): {shown}")


def metadata_path(manifest_path: str | os.PathLike) -> Path:
    """The metadata JSON that belongs to a manifest CSV: same folder and name, ``.json`` suffix."""
    return Path(manifest_path).with_suffix(".json")


def assign_folds(case_ids: Sequence[str], folds: int, seed: int = 0) -> dict[str, int]:
    """Deterministic K-fold split by case: shuffle the sorted unique ids with ``seed``, deal them round-robin.

    Every case lands in exactly one fold and fold sizes differ by at most one. Raises ``ValueError`` when
    ``folds < 1`` or there are fewer cases than folds.
    """
    unique = sorted(set(case_ids))
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if len(unique) < folds:
        raise ValueError(f"cannot split {len(unique)} case(s) into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: pos % folds for pos, i in enumerate(order)}


def _check_metadata(meta: Mapping[str, Any], where: str) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks {missing}")
    n = meta["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"{where}: num_classes must be an integer >= 2, got {n!r}")
    names = meta["class_names"]
    if not isinstance(names, list) or len(names) != n or not all(isinstance(s, str) for s in names):
        raise ValueError(f"{where}: class_names must be a list of {n} strings, got {names!r}")
    if meta["spatial_dims"] not in (2, 3):
        raise ValueError(f"{where}: spatial_dims must be 2 or 3, got {meta['spatial_dims']!r}")
    if not isinstance(meta["modality"], str):
        raise ValueError(f"{where}: modality must be a string, got {meta['modality']!r}")
    in_channels = meta.get("in_channels", 1)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{where}: in_channels must be a positive integer, got {in_channels!r}")
    num_folds = meta.get("num_folds")
    if num_folds is not None and (not isinstance(num_folds, int) or num_folds < 1):
        raise ValueError(f"{where}: num_folds must be a positive integer, got {num_folds!r}")


def _check_frame(frame: pd.DataFrame, where: str, num_folds: int | None) -> pd.DataFrame:
    """Validate the rows; return a copy with ``case_id``/``rater`` as str and ``fold`` as int."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    if len(frame) == 0:
        raise ValueError(f"{where}: the manifest is empty (no rows)")
    frame = frame.copy()
    if frame["case_id"].isna().any():
        raise ValueError(f"{where}: row(s) {list(np.flatnonzero(frame['case_id'].isna()) + 2)} have no case_id")
    frame["case_id"] = frame["case_id"].astype(str)
    for col, what in (("image", "no image"), ("label", "no annotation"), ("rater", "no rater name")):
        empty = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if empty.any():
            cases = sorted(set(frame.loc[empty, "case_id"]))
            raise ValueError(f"{where}: case(s) {cases} have {what} (empty '{col}')")
    frame["rater"] = frame["rater"].astype(str)
    folds = pd.to_numeric(frame["fold"], errors="coerce")
    bad = folds.isna() | (folds != np.floor(folds))
    if bad.any():
        cases = sorted(set(frame.loc[bad, "case_id"]))
        raise ValueError(f"{where}: case(s) {cases} have a non-integer fold {list(frame.loc[bad, 'fold'])[:5]}")
    frame["fold"] = folds.astype(int)
    out_of_range = (frame["fold"] < 0) | (frame["fold"] >= num_folds if num_folds is not None else False)
    if out_of_range.any():
        cases = sorted(set(frame.loc[out_of_range, "case_id"]))
        limit = f"0..{num_folds - 1}" if num_folds is not None else ">= 0"
        values = sorted(set(frame.loc[out_of_range, "fold"]))
        raise ValueError(f"{where}: fold index out of range ({limit}) for case(s) {cases}: {values}")
    dup = frame.duplicated(["case_id", "rater"], keep=False)
    if dup.any():
        pairs = sorted(set(zip(frame.loc[dup, "case_id"], frame.loc[dup, "rater"])))
        raise ValueError(f"{where}: duplicated (case_id, rater) rows: {pairs[:10]}")
    per_case = frame.groupby("case_id", sort=False).agg(images=("image", "nunique"), folds=("fold", "nunique"))
    for col, what in (("images", "more than one image"), ("folds", "raters in more than one fold")):
        bad_cases = list(per_case.index[per_case[col] > 1])
        if bad_cases:
            raise ValueError(f"{where}: case(s) {bad_cases} have {what}")
    return frame


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest CSV and its metadata JSON; return a :class:`Manifest` with absolute paths.

    Raises ``ValueError`` (naming the file and the offending cases) for: a missing CSV or JSON, missing columns,
    an empty manifest, a case without image or annotation, duplicated (case_id, rater) rows, a non-integer or
    out-of-range fold, a case whose raters span several folds or images, and inconsistent metadata.
    """
    path = _absolute(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise ValueError(f"manifest {path}: metadata file {meta_file} does not exist")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"manifest metadata {meta_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"manifest metadata {meta_file} must hold a JSON object")
    _check_metadata(meta, str(meta_file))
    try:
        frame = pd.read_csv(path, dtype={"case_id": str, "rater": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {path} cannot be parsed as CSV: {err}") from err
    frame = _check_frame(frame, f"manifest {path}", meta.get("num_folds"))
    for col in ("image", "label"):
        frame[col] = [str(_absolute(p if os.path.isabs(p) else path.parent / p)) for p in frame[col]]
    return Manifest(
        frame=frame.reset_index(drop=True),
        num_classes=meta["num_classes"],
        class_names=list(meta["class_names"]),
        modality=meta["modality"],
        spatial_dims=meta["spatial_dims"],
        path=path,
        in_channels=meta.get("in_channels", 1),
        num_folds=meta.get("num_folds"),
        metadata=dict(meta),
    )


def _absolute(p: str | os.PathLike) -> Path:
    """Absolute, normalised path; symbolic links are kept as they are (not resolved)."""
    return Path(os.path.abspath(p))


def _relative_if_inside(p: str | os.PathLike, folder: Path) -> str:
    p = Path(p)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return _absolute(p).relative_to(folder).as_posix()
    except ValueError:
        return str(p)


def write_manifest(
    rows: pd.DataFrame | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    num_classes: int,
    class_names: Sequence[str],
    modality: str,
    spatial_dims: int,
    in_channels: int = 1,
    num_folds: int | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Validate ``rows`` and write ``path`` (CSV) and its metadata JSON atomically; returns ``path``.

    Absolute paths under the manifest's folder are stored relative to it, others are kept as given.
    The JSON is written before the CSV, so an existing CSV always has its metadata.
    """
    path = _absolute(path)
    frame = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "num_classes": int(num_classes),
        "class_names": [str(c) for c in class_names],
        "modality": str(modality),
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
    }
    if num_folds is not None:
        meta["num_folds"] = int(num_folds)
    meta.update(extra_metadata or {})
    _check_metadata(meta, f"metadata for {path}")
    frame = _check_frame(frame, f"manifest {path}", meta.get("num_folds"))
    for col in ("image", "label"):
        frame[col] = [_relative_if_inside(p, path.parent) for p in frame[col]]
    columns = list(REQUIRED_COLUMNS) + [c for c in frame.columns if c not in REQUIRED_COLUMNS]
    atomic_write_text(metadata_path(path), json.dumps(meta, indent=2) + "\n")
    atomic_write(path, lambda tmp: frame[columns].to_csv(tmp, index=False))
    return path

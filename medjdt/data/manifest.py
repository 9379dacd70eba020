"""Dataset manifests: a long-format CSV (one row per case x rater annotation) plus a JSON metadata file.

The schema is documented in ``data_manifests/README.md``. In short, ``<name>.csv`` has the columns
``case_id, image, label, rater, fold`` (extra columns are kept), paths are relative to the CSV's folder
or absolute, and ``<name>.json`` next to it holds ``num_classes``, ``class_names``, ``modality``,
``spatial_dims`` and optionally ``in_channels``, ``num_folds`` and provenance fields. An unlabelled case
(an image without annotation, for semi-supervised training) is one row whose ``label`` and ``rater`` are empty.
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

from medjdt._paths import check_name
from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.validation import check_number

REQUIRED_COLUMNS = ("case_id", "image", "label", "rater", "fold")
REQUIRED_METADATA = ("num_classes", "class_names", "modality", "spatial_dims")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CaseRecord:
    """One case of a manifest: its image, and one label source per rater (in manifest row order).

    ``labels[i]`` is the label map of rater ``raters[i]``: a NIfTI file, or for KiTS21/23 the case's
    instance folder, from which the annotation numbered ``raters[i]`` is assembled. An unlabelled case has
    no labels and no raters.
    """

    case_id: str
    image: Path
    labels: tuple[Path, ...]
    raters: tuple[str, ...]
    fold: int

    @property
    def labelled(self) -> bool:
        """True when the case has at least one rater annotation."""
        return bool(self.labels)


@dataclass
class Manifest:
    """A parsed manifest: ``frame`` has absolute paths; metadata comes from the JSON file next to the CSV.

    ``num_folds`` is the metadata's, else one more than the largest fold index of the rows: the fold column is
    the truth the data module reads its fold count from.
    """

    frame: pd.DataFrame
    num_classes: int
    class_names: list[str]
    modality: str
    spatial_dims: int
    path: Path
    in_channels: int = 1
    num_folds: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def cases(self, folds: Iterable[int] | None = None, labelled: bool | None = None) -> list[CaseRecord]:
        """The cases (in order of first appearance).

        Args:
            folds: only the cases whose fold is in ``folds`` (None: every fold).
            labelled: only the labelled (True) or the unlabelled (False) cases; None: both.
        """
        wanted = None if folds is None else {int(f) for f in folds}
        records = []
        for case_id, rows in self.frame.groupby("case_id", sort=False):
            fold = int(rows["fold"].iloc[0])
            if wanted is not None and fold not in wanted:
                continue
            annotated = rows[rows["label"] != ""]
            record = CaseRecord(
                case_id=str(case_id),
                image=Path(rows["image"].iloc[0]),
                labels=tuple(Path(p) for p in annotated["label"]),
                raters=tuple(str(r) for r in annotated["rater"]),
                fold=fold,
            )
            if labelled is None or record.labelled == labelled:
                records.append(record)
        return records

    def check_files(self) -> None:
        """Raise ``ValueError`` naming every case whose image or label path does not exist."""
        problems = []
        for col in ("image", "label"):
            for case_id, p in zip(self.frame["case_id"], self.frame[col]):
                if p != "" and not Path(p).exists():
                    problems.append(f"case {case_id!r}: {col} file {p} does not exist")
        if problems:
            shown = "; ".join(sorted(set(problems))[:10])
            raise ValueError(f"manifest {self.path}: {len(set(problems))} missing file(s): {shown}")


def metadata_path(manifest_path: str | os.PathLike) -> Path:
    """The metadata JSON that belongs to a manifest CSV: same folder and name, ``.json`` suffix."""
    return Path(manifest_path).with_suffix(".json")


def assign_folds(case_ids: Sequence[str], folds: int, seed: int = 0, allow_empty_folds: bool = False) -> dict[str, int]:
    """Deterministic K-fold split by case: shuffle the sorted unique ids with ``seed``, deal them round-robin.

    Every case lands in exactly one fold and fold sizes differ by at most one. Raises ``ValueError`` when
    ``folds < 1`` or there are fewer cases than folds (unless ``allow_empty_folds``).
    """
    unique = sorted(set(case_ids))
    folds = check_number("folds", folds, low=1, integer=True, where="assign_folds")
    if len(unique) < folds and not allow_empty_folds:
        raise ValueError(f"cannot split {len(unique)} case(s) into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: pos % folds for pos, i in enumerate(order)}


def hide_annotations(
    manifest: Manifest, labelled_fraction: float, *, keep_folds: Iterable[int] = (), seed: int = 0
) -> pd.DataFrame:
    """Simulate a partly annotated dataset: the rows of ``manifest`` with most training cases made unlabelled.

    Among the labelled cases whose fold is not in ``keep_folds`` (typically the validation fold), a seeded
    random ``round(labelled_fraction * n)`` (at least one) keep their annotation rows; every other one becomes a single
    unlabelled row (same ``case_id``, ``image`` and ``fold``; empty ``label`` and ``rater``). Cases in
    ``keep_folds`` and cases already unlabelled are unchanged. The result (absolute paths) can be written with
    :func:`write_manifest`.

    Raises ``ValueError`` when ``labelled_fraction`` is not in (0, 1] or there is no labelled case outside
    ``keep_folds``.
    """
    labelled_fraction = check_number("labelled_fraction", labelled_fraction, low=0, high=1, low_inclusive=False)
    kept_folds = {int(f) for f in keep_folds}
    eligible = sorted(r.case_id for r in manifest.cases(labelled=True) if r.fold not in kept_folds)
    if not eligible:
        raise ValueError(f"manifest {manifest.path}: no labelled case outside folds {sorted(kept_folds)}")
    n_keep = max(1, round(labelled_fraction * len(eligible)))
    order = np.random.default_rng(seed).permutation(len(eligible))
    hidden = {eligible[i] for i in order[n_keep:]}
    frame = manifest.frame
    keep = ~frame["case_id"].isin(hidden)
    unlabelled = frame[~keep].drop_duplicates("case_id").copy()
    unlabelled[["label", "rater"]] = ""
    out = pd.concat([frame[keep], unlabelled])
    # Keep the manifest's case order (first appearance) and, within a case, its rater order.
    position = {case_id: i for i, case_id in enumerate(frame["case_id"].drop_duplicates())}
    out = out.assign(_case_pos=out["case_id"].map(position)).sort_values("_case_pos", kind="stable")
    return out.drop(columns="_case_pos").reset_index(drop=True)


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


def _check_names(frame: pd.DataFrame, where: str) -> None:
    """Case ids and rater names name output files (predictions, fused targets): each must be a plain file name."""
    for column, what in (("case_id", "case_id"), ("rater", "rater name")):
        for position, value in enumerate(frame[column]):
            if column == "rater" and value == "":
                continue  # the rater of an unlabelled case
            try:
                check_name(value, what)
            except ValueError as err:
                raise ValueError(f"{where}, line {position + 2}: {err}") from None


def _check_frame(frame: pd.DataFrame, where: str, num_folds: int | None) -> pd.DataFrame:
    """Validate the rows; return a copy with ``case_id``/``rater`` as str and ``fold`` as int."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    if len(frame) == 0:
        raise ValueError(f"{where}: the manifest is empty (no rows)")
    frame = frame.copy()
    if frame["case_id"].isna().any():
        lines = ", ".join(str(int(i) + 2) for i in np.flatnonzero(frame["case_id"].isna()))
        raise ValueError(f"{where}: line(s) {lines} have no case_id")
    frame["case_id"] = frame["case_id"].astype(str)
    empty = {col: frame[col].isna() | (frame[col].astype(str).str.strip() == "") for col in ("image", "label", "rater")}
    unlabelled = empty["label"] & empty["rater"]
    for col, what in (("image", "no image"), ("label", "no annotation"), ("rater", "no rater name")):
        bad = empty[col] & ~unlabelled if col != "image" else empty[col]
        if bad.any():
            cases = sorted(set(frame.loc[bad, "case_id"]))
            raise ValueError(
                f"{where}: case(s) {cases} have {what} (empty '{col}'); an unlabelled case is a single row with "
                "both 'label' and 'rater' empty"
            )
    rows_per_case = frame.groupby("case_id")["case_id"].transform("size")
    mixed = unlabelled & (rows_per_case > 1)
    if mixed.any():
        cases = sorted(set(frame.loc[mixed, "case_id"]))
        raise ValueError(
            f"{where}: case(s) {cases} have a row without annotation (empty 'label' and 'rater') besides other "
            "rows; an unlabelled case must be a single row"
        )
    for col in ("label", "rater"):
        # object dtype first: an all-empty column is read as float NaN
        frame[col] = frame[col].astype(object).where(~unlabelled, "")
    frame["rater"] = frame["rater"].astype(str)
    _check_names(frame, where)
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
        frame[col] = [p if p == "" else str(_absolute(p if os.path.isabs(p) else path.parent / p)) for p in frame[col]]
    return Manifest(
        frame=frame.reset_index(drop=True),
        num_classes=meta["num_classes"],
        class_names=list(meta["class_names"]),
        modality=meta["modality"],
        spatial_dims=meta["spatial_dims"],
        path=path,
        in_channels=meta.get("in_channels", 1),
        num_folds=meta.get("num_folds") or int(frame["fold"].max()) + 1,
        metadata=dict(meta),
    )


def _absolute(p: str | os.PathLike) -> Path:
    """Absolute, normalised path; symbolic links are kept as they are (not resolved)."""
    return Path(os.path.abspath(p))


def _relative_if_inside(p: str | os.PathLike, folder: Path) -> str:
    if p == "":
        return p  # the empty label of an unlabelled case
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


def write_partly_labelled(
    source: str | os.PathLike,
    out: str | os.PathLike,
    labelled_fraction: float,
    *,
    keep_folds: Iterable[int] = (),
    seed: int = 0,
) -> Path:
    """Write manifest ``out`` (CSV and JSON): ``source`` with annotations hidden by :func:`hide_annotations`.

    The metadata is the source's plus ``labelled_fraction``, ``labelled_seed``, ``labelled_keep_folds`` and
    ``source_manifest``. ``out`` is written atomically, after its metadata; returns ``out``.
    """
    manifest = read_manifest(source)
    frame = hide_annotations(manifest, labelled_fraction, keep_folds=keep_folds, seed=seed)
    extra = {
        **manifest.metadata,
        "labelled_fraction": float(labelled_fraction),
        "labelled_seed": int(seed),
        "labelled_keep_folds": sorted(int(f) for f in keep_folds),
        "source_manifest": str(manifest.path),
    }
    return write_manifest(
        frame,
        out,
        num_classes=manifest.num_classes,
        class_names=manifest.class_names,
        modality=manifest.modality,
        spatial_dims=manifest.spatial_dims,
        in_channels=manifest.in_channels,
        num_folds=manifest.num_folds,
        extra_metadata=extra,
    )

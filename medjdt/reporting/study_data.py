"""The cases of a study: a training manifest (with folds) and a held-out test manifest, checked to be disjoint.

Either the study file names both manifests, or the study builds them from a dataset in its published layout
(:func:`medjdt.data.build_manifest`) into ``<out>/data/``: a seeded choice of ``test_cases`` held-out cases, the
rest dealt into ``folds`` folds. With ``groups`` (a CSV beside the data mapping each case to a group, e.g. a
patient) the cases of one group are never split between training and test, nor between folds. A case of the
manifest matches a row of the groups file when its id equals the row's case or ends with ``-<case>`` (QUBIQ case
ids are ``training-<case>``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from medjdt.data.manifest import Manifest, read_manifest, write_manifest
from medjdt.reporting.study_spec import DataSpec

__all__ = ["check_disjoint", "study_manifests"]


def _groups(frame: pd.DataFrame, spec: DataSpec) -> dict[str, str]:
    """Case id -> group (each case its own group without ``spec.groups``)."""
    cases = list(dict.fromkeys(frame["case_id"]))
    if spec.groups is None:
        return {c: c for c in cases}
    path = spec.root / spec.groups["file"]
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"groups file {path} cannot be read: {err}") from None
    for column in (spec.groups["case"], spec.groups["group"]):
        if column not in table.columns:
            raise ValueError(f"groups file {path} has no column {column!r}")
    group_of = dict(zip(table[spec.groups["case"]], table[spec.groups["group"]]))
    out = {}
    for case in cases:
        key = case if case in group_of else next((k for k in group_of if case.endswith(f"-{k}")), None)
        if key is None:
            raise ValueError(f"groups file {path} has no row for case {case!r}")
        out[case] = group_of[key]
    return out


def _split(groups: dict[str, str], test_cases: int, folds: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """Held-out cases (whole groups, as close to ``test_cases`` as whole groups allow) and folds of the rest."""
    members: dict[str, list[str]] = defaultdict(list)
    for case, group in groups.items():
        members[group].append(case)
    names = sorted(members)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    test: list[str] = []
    for group in order:
        if len(test) + len(members[group]) <= test_cases:
            test += members[group]
    if not test:
        raise ValueError(f"no whole group fits in {test_cases} test case(s)")
    train_groups = [g for g in order if members[g][0] not in test]
    if len(train_groups) < folds:
        raise ValueError(f"{len(train_groups)} training group(s) cannot fill {folds} folds")
    fold_sizes = [0] * folds
    fold_of: dict[str, int] = {}
    # largest groups first (stable within equal sizes: the seeded order), each to the smallest fold so far
    for group in sorted(train_groups, key=lambda g: -len(members[g])):
        fold = int(np.argmin(fold_sizes))
        fold_sizes[fold] += len(members[group])
        for case in members[group]:
            fold_of[case] = fold
    return sorted(test), fold_of


def _write(manifest: Manifest, frame: pd.DataFrame, path: Path, num_folds: int, extra: dict) -> Path:
    return write_manifest(
        frame, path, num_classes=manifest.num_classes, class_names=manifest.class_names, modality=manifest.modality,
        spatial_dims=manifest.spatial_dims, in_channels=manifest.in_channels, num_folds=num_folds,
        extra_metadata={**{k: v for k, v in manifest.metadata.items() if k not in ("num_folds",)}, **extra},
    )


def _build(spec: DataSpec, folder: Path) -> tuple[Path, Path]:
    from medjdt.data.layouts import build_manifest

    paths = build_manifest(spec.layout, spec.root, folder / "all.csv", folds=1, seed=spec.split_seed,
                           unlabelled="skip")
    chosen = [p for p in paths if p.stem == f"all{spec.manifest_suffix}"]
    if len(chosen) != 1:
        raise ValueError(
            f"layout {spec.layout!r} under {spec.root} gives the manifests {[p.name for p in paths]}; set "
            f"data.manifest_suffix to choose one (the part after 'all')"
        )
    manifest = read_manifest(chosen[0])
    frame = manifest.frame
    test, fold_of = _split(_groups(frame, spec), spec.test_cases, spec.folds, spec.split_seed)
    extra = {"study_split": {"test_cases": test, "seed": spec.split_seed, "folds": spec.folds,
                             "groups": dict(spec.groups) if spec.groups else None}}
    train_rows = frame[~frame["case_id"].isin(test)].assign(fold=lambda f: f["case_id"].map(fold_of))
    test_rows = frame[frame["case_id"].isin(test)].assign(fold=0)
    train = _write(manifest, train_rows, folder / "train.csv", spec.folds, extra)
    held_out = _write(manifest, test_rows, folder / "test.csv", 1, extra)
    return train, held_out


def check_disjoint(train: Manifest, test: Manifest) -> None:
    """Raise ``ValueError`` when a test case appears in the training manifest (by case id or image file)."""
    shared_ids = sorted(set(train.frame["case_id"]) & set(test.frame["case_id"]))
    images = {os.path.realpath(p) for p in train.frame["image"]}
    shared_images = sorted(p for p in test.frame["image"].unique() if os.path.realpath(p) in images)
    if shared_ids or shared_images:
        raise ValueError(
            f"test manifest {test.path} shares case(s) {shared_ids[:5]} / image(s) {shared_images[:3]} with training "
            f"manifest {train.path}: held-out cases must never be trained on"
        )
    if train.class_names != test.class_names:
        raise ValueError(f"test manifest {test.path} has classes {test.class_names}, training {train.class_names}")


def study_manifests(spec: DataSpec, out: Path, test_manifest: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The training and test manifests of a study (built under ``out/data`` from a layout when needed).

    Args:
        spec: the study's data section.
        out: the study's output folder.
        test_manifest: a held-out manifest that replaces the study file's (``--test-manifest``).

    Returns:
        ``(training manifest, test manifest)``, checked to be readable and disjoint.

    Raises:
        ValueError: no test manifest, unreadable manifests, a split that cannot be made, shared cases.
    """
    if spec.layout is not None:
        train, test = _build(spec, out / "data")
    else:
        train, test = spec.manifest, spec.test_manifest
    if test_manifest is not None:
        test = Path(test_manifest)
    if test is None:
        raise ValueError("the study has no test manifest: give data.test_manifest or --test-manifest")
    train_manifest, test_data = read_manifest(train), read_manifest(test)
    check_disjoint(train_manifest, test_data)
    return train_manifest.path, test_data.path

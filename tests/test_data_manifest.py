"""Manifest schema: round trip, validation errors, and the K-fold split by case."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import KFold

from medjdt.data import assign_folds, read_manifest, write_manifest
from medjdt.data.manifest import metadata_path

META = {"num_classes": 3, "class_names": ["background", "organ", "lesion"], "modality": "CT", "spatial_dims": 3}


def _rows(tmp_path, n_cases=3, raters=2):
    rows = []
    for c in range(n_cases):
        for r in range(1, raters + 1):
            rows.append({"case_id": f"c{c}", "image": tmp_path / f"c{c}.nii.gz",
                         "label": tmp_path / f"c{c}_r{r}.nii.gz", "rater": str(r), "fold": c % 2})
    return rows


def test_round_trip_relative_paths_and_metadata(tmp_path):
    rows = _rows(tmp_path / "data")
    rows[0]["image"] = rows[1]["image"] = "/elsewhere/c0.nii.gz"
    for r in rows:
        r["site"] = "A"
    path = write_manifest(rows, tmp_path / "m.csv", num_folds=2, extra_metadata={"layout": "demo"}, **META)
    raw = pd.read_csv(path)
    assert list(raw.columns) == ["case_id", "image", "label", "rater", "fold", "site"]
    assert raw["label"].iloc[0] == "data/c0_r1.nii.gz"  # relative to the manifest's folder
    assert raw["image"].iloc[0] == "/elsewhere/c0.nii.gz"  # outside it: kept absolute
    meta = json.loads(metadata_path(path).read_text())
    assert meta["num_folds"] == 2 and meta["layout"] == "demo" and meta["in_channels"] == 1

    m = read_manifest(path)
    assert (m.num_classes, m.class_names, m.modality, m.spatial_dims, m.num_folds) == (
        3, META["class_names"], "CT", 3, 2)
    assert m.frame["label"].iloc[0] == str(tmp_path / "data" / "c0_r1.nii.gz")
    assert m.frame["image"].iloc[2] == str(tmp_path / "data" / "c1.nii.gz")
    cases = m.cases()
    assert [c.case_id for c in cases] == ["c0", "c1", "c2"]
    assert cases[1].raters == ("1", "2") and cases[1].fold == 1
    assert [c.case_id for c in m.cases(folds=[0])] == ["c0", "c2"]


def test_single_rater_and_numeric_looking_ids_stay_strings(tmp_path):
    rows = [{"case_id": "007", "image": "a.nii.gz", "label": "b.nii.gz", "rater": "01", "fold": 0}]
    m = read_manifest(write_manifest(rows, tmp_path / "m.csv", **META))
    assert m.cases()[0].case_id == "007" and m.cases()[0].raters == ("01",)


def _write_raw(tmp_path, frame: pd.DataFrame, meta=None):
    path = tmp_path / "raw.csv"
    frame.to_csv(path, index=False)
    metadata_path(path).write_text(json.dumps(meta or {**META, "num_folds": 2}))
    return path


def test_empty_manifest(tmp_path):
    path = _write_raw(tmp_path, pd.DataFrame(columns=["case_id", "image", "label", "rater", "fold"]))
    with pytest.raises(ValueError, match="manifest is empty"):
        read_manifest(path)


def test_duplicated_case_rater_rows(tmp_path):
    rows = _rows(tmp_path)
    rows.append(dict(rows[2]))
    with pytest.raises(ValueError, match=r"duplicated \(case_id, rater\) rows: \[\('c1', '1'\)\]"):
        read_manifest(_write_raw(tmp_path, pd.DataFrame(rows)))


def test_case_with_no_annotation(tmp_path):
    rows = _rows(tmp_path)
    rows[3]["label"] = ""
    with pytest.raises(ValueError, match=r"\['c1'\] have no annotation"):
        read_manifest(_write_raw(tmp_path, pd.DataFrame(rows)))


def test_fold_out_of_range_and_split_case(tmp_path):
    rows = _rows(tmp_path)
    rows[4]["fold"] = rows[5]["fold"] = 2
    with pytest.raises(ValueError, match=r"fold index out of range \(0..1\) for case\(s\) \['c2'\]"):
        read_manifest(_write_raw(tmp_path, pd.DataFrame(rows)))
    rows = _rows(tmp_path)
    rows[1]["fold"] = 1
    with pytest.raises(ValueError, match=r"\['c0'\] have raters in more than one fold"):
        read_manifest(_write_raw(tmp_path, pd.DataFrame(rows)))
    rows = _rows(tmp_path)
    rows[1]["fold"] = -1
    with pytest.raises(ValueError, match="fold index out of range"):
        read_manifest(_write_raw(tmp_path, pd.DataFrame(rows)))


def test_missing_column_metadata_and_files(tmp_path):
    frame = pd.DataFrame(_rows(tmp_path)).drop(columns=["rater"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rater'\]"):
        read_manifest(_write_raw(tmp_path, frame))
    path = _write_raw(tmp_path, pd.DataFrame(_rows(tmp_path)), meta={**META, "class_names": ["bg", "x"]})
    with pytest.raises(ValueError, match="class_names must be a list of 3 strings"):
        read_manifest(path)
    metadata_path(path).unlink()
    with pytest.raises(ValueError, match=r"metadata file .*raw\.json does not exist"):
        read_manifest(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "nothing.csv")
    ok = _write_raw(tmp_path, pd.DataFrame(_rows(tmp_path)))
    with pytest.raises(ValueError, match=r"case 'c0': image file .*c0\.nii\.gz does not exist"):
        read_manifest(ok).check_files()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_folds_partition_cases_evenly_and_deterministically(n, k, seed):
    ids = [f"case{i}" for i in range(n)]
    if n < k:
        with pytest.raises(ValueError, match=f"cannot split {n} case"):
            assign_folds(ids, k, seed)
        return
    folds = assign_folds(ids * 3, k, seed)  # repeated ids (several raters) count once
    assert set(folds) == set(ids)
    sizes = pd.Series(folds).value_counts().reindex(range(k), fill_value=0)
    assert sizes.max() - sizes.min() <= 1
    if k > 1:  # same fold sizes as scikit-learn's KFold on the same number of cases
        assert sorted(sizes) == sorted(len(test) for _, test in KFold(k).split(ids))
    assert assign_folds(list(reversed(ids)), k, seed) == folds  # input order does not matter


def test_folds_depend_on_seed():
    ids = [f"case{i}" for i in range(30)]
    assert assign_folds(ids, 5, 0) != assign_folds(ids, 5, 1)

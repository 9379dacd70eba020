"""Manifests built from miniature copies of the published dataset layouts, checked row by row."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from _layouts import REALDATA, make_kits19, make_kits21, make_lits, make_qubiq, save

from medjdt.cli import main
from medjdt.data import build_manifest, load_case, read_manifest


def _rows(manifest: Path) -> pd.DataFrame:
    return read_manifest(manifest).frame


def test_kits21_layout_rows_and_assembled_raters(tmp_path):
    expected = make_kits21(tmp_path / "kits21" / "data", instance_dir="segmentations")
    (out,) = build_manifest("kits21", tmp_path / "kits21" / "data", tmp_path / "m" / "kits21.csv", folds=2, seed=3)
    m = read_manifest(out)
    assert (m.num_classes, m.class_names, m.modality, m.spatial_dims) == (
        4, ["background", "kidney", "tumor", "cyst"], "CT", 3)
    frame = m.frame
    assert list(frame["case_id"]) == ["case_00000"] * 3 + ["case_00001"] * 3
    assert list(frame["rater"]) == ["1", "2", "3"] * 2
    root = tmp_path / "kits21" / "data"
    for _, row in frame.iterrows():
        assert Path(row["image"]) == root / row["case_id"] / "imaging.nii.gz"
        assert Path(row["label"]) == root / row["case_id"] / "segmentations"
    assert frame.groupby("case_id")["fold"].nunique().max() == 1
    assert sorted(frame.groupby("case_id")["fold"].first()) == [0, 1]
    for case in m.cases():
        loaded = load_case(case, num_classes=m.num_classes, spatial_dims=3)
        assert loaded["raters"].dtype.is_floating_point is False
        for r, rater in enumerate(case.raters):
            np.testing.assert_array_equal(loaded["raters"][r].numpy(), expected[case.case_id][rater])


def test_kits23_instances_folder_and_cli(tmp_path, capsys):
    make_kits21(tmp_path / "dataset", instance_dir="instances")
    out = tmp_path / "kits23.csv"
    assert main(["manifest", "--layout", "kits23", "--root", str(tmp_path / "dataset"), "--out", str(out),
                 "--folds", "2"]) == 0
    assert "2 cases, 6 annotations, 4 classes" in capsys.readouterr().out
    frame = _rows(out)
    assert all(Path(p).name == "instances" for p in frame["label"])
    # paths under the manifest's folder are stored relative to it
    raw = pd.read_csv(out)
    assert raw["image"].iloc[0] == "dataset/case_00000/imaging.nii.gz"


def test_kits21_missing_annotation_of_one_instance_is_an_error(tmp_path):
    make_kits21(tmp_path)
    (tmp_path / "case_00001" / "instances" / "cyst_instance-1_annotation-3.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case_00001.*cyst_instance-1_annotation-3"):
        build_manifest("kits21", tmp_path, tmp_path / "out.csv", folds=2)


def test_kits19_layout_rows(tmp_path):
    labels = make_kits19(tmp_path / "kits19")
    (out,) = build_manifest("kits19", tmp_path / "kits19", tmp_path / "kits19.csv", folds=3)
    frame = _rows(out)
    assert list(frame["case_id"]) == sorted(labels)
    assert set(frame["rater"]) == {"1"}
    assert sorted(frame["fold"]) == [0, 1, 2]
    for _, row in frame.iterrows():
        assert Path(row["label"]).name == "segmentation.nii.gz"
        assert Path(row["label"]).parent.name == row["case_id"]
    assert read_manifest(out).class_names == ["background", "kidney", "tumor"]


def test_kits19_unlabelled_cases_fail_or_are_listed(tmp_path):
    make_kits19(tmp_path, unlabelled=2)
    with pytest.raises(ValueError, match=r"case_00003.*no annotation"):
        build_manifest("kits19", tmp_path, tmp_path / "out.csv", folds=3)
    (out,) = build_manifest("kits19", tmp_path, tmp_path / "out.csv", folds=3, unlabelled="skip")
    assert _rows(out)["case_id"].nunique() == 3
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["unlabelled_cases"] == ["case_00003", "case_00004"]
    skipped_folds = dict(zip(_rows(out)["case_id"], _rows(out)["fold"], strict=True))

    # "include": the same labelled rows and folds, plus one unlabelled row per case that the loader reads.
    (out,) = build_manifest("kits19", tmp_path, tmp_path / "with.csv", folds=3, unlabelled="include")
    manifest = read_manifest(out)
    assert sorted(r.case_id for r in manifest.cases(labelled=False)) == ["case_00003", "case_00004"]
    labelled = manifest.cases(labelled=True)
    assert {r.case_id: r.fold for r in labelled} == skipped_folds
    for record in manifest.cases(labelled=False):
        assert record.image == tmp_path / record.case_id / "imaging.nii.gz" and 0 <= record.fold < 3
    assert json.loads(out.with_suffix(".json").read_text())["unlabelled_cases"] == ["case_00003", "case_00004"]
    with pytest.raises(ValueError, match="unlabelled must be one of"):
        build_manifest("kits19", tmp_path, tmp_path / "bad.csv", folds=3, unlabelled="keep")


def test_lits_layout_rows(tmp_path):
    files = make_lits(tmp_path / "lits")
    (out,) = build_manifest("lits", tmp_path / "lits", tmp_path / "lits.csv", folds=3)
    frame = _rows(out)
    assert list(frame["case_id"]) == ["volume-0", "volume-1", "volume-10"]
    for _, row in frame.iterrows():
        vol, seg = files[row["case_id"]]
        assert Path(row["image"]) == vol and Path(row["label"]) == seg
    assert read_manifest(out).class_names == ["background", "liver", "tumor"]


def test_lits_segmentation_without_volume_is_an_error(tmp_path):
    make_lits(tmp_path)
    (tmp_path / "Training Batch 2" / "volume-10.nii").unlink()
    with pytest.raises(ValueError, match="segmentation-10.nii has no volume-10"):
        build_manifest("lits", tmp_path, tmp_path / "out.csv", folds=2)


def test_qubiq_layout_one_manifest_per_dataset_and_task(tmp_path):
    summary = make_qubiq(tmp_path / "qubiq")
    paths = build_manifest("qubiq", tmp_path / "qubiq", tmp_path / "m" / "qubiq.csv", folds=2)
    names = sorted(p.name for p in paths)
    assert names == ["qubiq_brain-tumor_task01.csv", "qubiq_brain-tumor_task02.csv", "qubiq_kidney_task01.csv",
                     "qubiq_pancreas_task01.csv"]
    geometry = {"kidney": (2, 1, "CT"), "pancreas": (3, 1, "CT"), "brain-tumor": (2, 4, "MRI")}
    for path in paths:
        m = read_manifest(path)
        dataset, task = m.metadata["dataset"], m.metadata["task"]
        assert (m.spatial_dims, m.in_channels, m.modality) == geometry[dataset]
        assert m.num_classes == 2
        got = {c: list(rows["rater"]) for c, rows in m.frame.groupby("case_id", sort=False)}
        assert got == summary[(dataset, task)]
        for _, row in m.frame.iterrows():
            subset, case = row["case_id"].split("-")
            assert Path(row["image"]).parts[-3:] == (subset.capitalize(), case, "image.nii.gz")
            assert Path(row["label"]).name == f"task{task}_seg{row['rater']}.nii.gz"
            assert row["subset"] == subset.capitalize()


def test_qubiq_single_dataset_root_and_loading_2d_multichannel(tmp_path):
    make_qubiq(tmp_path)
    paths = build_manifest("qubiq", tmp_path / "brain-tumor", tmp_path / "bt.csv", folds=2)
    assert [p.name for p in paths] == ["bt_brain-tumor_task01.csv", "bt_brain-tumor_task02.csv"]
    m = read_manifest(paths[0])
    case = m.cases()[0]
    loaded = load_case(case, num_classes=2, spatial_dims=2)
    assert tuple(loaded["image"].shape) == (4, 16, 16)
    assert tuple(loaded["raters"].shape) == (3, 16, 16)
    # channels-last NIfTI: channel c of the loaded image is the stored [..., c] plane
    stored = np.asarray(nib.load(case.image).dataobj)
    np.testing.assert_allclose(loaded["image"][2].numpy(), stored[..., 2])


def test_qubiq_case_without_a_task_follows_the_unlabelled_policy(tmp_path):
    make_qubiq(tmp_path)
    for mask in (tmp_path / "brain-tumor" / "Training" / "case02").glob("task02_seg*.nii.gz"):
        mask.unlink()
    with pytest.raises(ValueError, match=r"training-case02.*task02_seg"):
        build_manifest("qubiq", tmp_path / "brain-tumor", tmp_path / "bt.csv", folds=2)
    task1, task2 = build_manifest("qubiq", tmp_path / "brain-tumor", tmp_path / "bt.csv", folds=2,
                                  unlabelled="include")
    assert read_manifest(task1).cases(labelled=False) == []
    (unlabelled,) = read_manifest(task2).cases(labelled=False)
    assert unlabelled.case_id == "training-case02" and unlabelled.image.parts[-3:] == ("Training", "case02",
                                                                                        "image.nii.gz")
    assert read_manifest(task2).frame.set_index("case_id").loc["training-case02", "subset"] == "Training"


def test_demo_layout_rows(tmp_path):
    for case, raters in (("case_000", 3), ("case_001", 2)):
        save(np.zeros((8, 8, 8), np.int16), np.eye(4), tmp_path / case / "image.nii.gz")
        for j in range(1, raters + 1):
            save(np.zeros((8, 8, 8), np.uint8), np.eye(4), tmp_path / case / f"rater-{j}.nii.gz")
    (out,) = build_manifest("demo", tmp_path, tmp_path / "manifest.csv", folds=2)
    frame = _rows(out)
    assert list(zip(frame["case_id"], frame["rater"])) == [
        ("case_000", "1"), ("case_000", "2"), ("case_000", "3"), ("case_001", "1"), ("case_001", "2")]


def test_folders_layout_takes_your_raters_names_classes_and_modality(tmp_path, capsys):
    root = tmp_path / "my_data"
    raters = {"p01": ["alice", "bob", "rater2", "rater10"], "p02": ["alice", "bob"], "p03": []}
    for case, names in raters.items():
        save(np.zeros((8, 8, 4), np.int16), np.diag([0.8, 0.8, 5.0, 1.0]), root / case / "image.nii.gz")
        for name in names:
            save(np.zeros((8, 8, 4), np.uint8), np.diag([0.8, 0.8, 5.0, 1.0]), root / case / f"rater-{name}.nii.gz")
    (root / "p01" / "notes.txt").write_text("not a rater")
    out = tmp_path / "manifest.csv"
    args = ["manifest", "--layout", "folders", "--root", str(root), "--out", str(out), "--classes", "background",
            "kidney", "tumour", "--modality", "MR", "--folds", "2"]
    assert main(args) == 2  # p03 has no rater: the unlabelled policy applies
    assert "p03" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--allow-unlabelled"]) == 0
    frame = _rows(out)
    assert list(zip(frame["case_id"], frame["rater"])) == [
        ("p01", "alice"), ("p01", "bob"), ("p01", "rater2"), ("p01", "rater10"), ("p02", "alice"), ("p02", "bob")]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["class_names"] == ["background", "kidney", "tumour"] and meta["num_classes"] == 3
    assert meta["modality"] == "MR" and meta["unlabelled_cases"] == ["p03"]
    assert read_manifest(out).class_names == ["background", "kidney", "tumour"]
    with pytest.raises(ValueError, match="layout 'folders' needs --classes"):
        build_manifest("folders", root, tmp_path / "x.csv", unlabelled="skip")
    with pytest.raises(ValueError, match="layout 'folders' needs --classes"):
        build_manifest("folders", root, tmp_path / "x.csv", unlabelled="skip", classes=["background", "background"])
    with pytest.raises(ValueError, match="names its own classes"):
        build_manifest("demo", root, tmp_path / "x.csv", classes=["background", "x"])


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of .*got 'brats'"):
        build_manifest("brats", tmp_path, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="is not a folder"):
        build_manifest("lits", tmp_path / "nowhere", tmp_path / "x.csv")
    assert main(["manifest", "--layout", "kits19", "--root", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real KiTS23 sample folder {REALDATA} is absent")
def test_real_kits23_case_builds_and_loads(tmp_path):
    real_case = REALDATA / "kits23" / "dataset" / "case_00257"
    case_dir = tmp_path / "dataset" / "case_00257"
    case_dir.mkdir(parents=True)
    (case_dir / "instances").symlink_to(real_case / "instances", target_is_directory=True)
    seg = nib.load(real_case / "segmentation.nii.gz")
    # The CT is not distributed with the sample: synthesise one on the same grid.
    rng = np.random.default_rng(0)
    save(rng.normal(0, 50, size=seg.shape).astype(np.int16), seg.affine, case_dir / "imaging.nii.gz")

    (out,) = build_manifest("kits23", tmp_path / "dataset", tmp_path / "kits23.csv", folds=1)
    m = read_manifest(out)
    assert list(m.frame["rater"]) == ["1", "2", "3"]
    (case,) = m.cases()
    loaded = load_case(case, num_classes=4, spatial_dims=3)
    raters = loaded["raters"].numpy()
    assert raters.shape == (3, *seg.shape) and raters.dtype == np.uint8
    np.testing.assert_allclose(np.asarray(loaded["image"].affine), seg.affine, atol=1e-6)

    reference = np.asarray(seg.dataobj)
    votes = np.stack([(raters == k).sum(0, dtype=np.uint8) for k in range(4)])
    majority = votes.argmax(0)
    union = (reference > 0) | (majority > 0)
    # The published aggregate is a per-region majority vote of the same annotations.
    assert (majority[union] == reference[union]).mean() > 0.999
    assert set(np.unique(raters)) == {0, 1, 2, 3}

    for j in (1,):  # rater 1's foreground is the union of its instance masks (read independently with SimpleITK)
        union_j = np.zeros(seg.shape, bool)
        for f in sorted((real_case / "instances").glob(f"*_annotation-{j}.nii.gz")):
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).transpose(2, 1, 0) > 0.5
            union_j |= mask
            if f.name.startswith("tumor"):
                assert (raters[j - 1][mask] == 2).all()
        np.testing.assert_array_equal(raters[j - 1] > 0, union_j)

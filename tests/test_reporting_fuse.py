"""``medjdt fuse``: fused targets on disk against NumPy references, seeding, resuming and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest, write_manifest
from medjdt.labels import fuse
from medjdt.reporting.fused_targets import target_path, write_fused_targets


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, cases=4, raters=3, shape=(16, 16, 16), dims=3, seed=1, folds=2)


def _raters(manifest: Path) -> dict[str, np.ndarray]:
    """Case id -> the raters' label maps ``(R, *spatial)``, read with nibabel."""
    frame = read_manifest(manifest).frame
    return {
        case_id: np.stack([np.asarray(nib.load(p).dataobj).astype(np.int64) for p in rows["label"]])
        for case_id, rows in frame.groupby("case_id")
    }


def _images(manifest: Path) -> dict[str, nib.Nifti1Image]:
    frame = read_manifest(manifest).frame
    return {case_id: nib.load(rows["image"].iloc[0]) for case_id, rows in frame.groupby("case_id")}


def test_mean_and_majority_targets_match_numpy_references(phantoms, tmp_path):
    assert main(["fuse", "--manifest", str(phantoms), "--method", "mean", "--out", str(tmp_path / "mean")]) == 0
    assert main(["fuse", "--manifest", str(phantoms), "--method", "majority", "--out", str(tmp_path / "maj")]) == 0
    images = _images(phantoms)
    for case_id, raters in _raters(phantoms).items():
        one_hot = np.stack([raters == c for c in range(3)], axis=-1)  # (R, *spatial, C)
        soft = nib.load(target_path(tmp_path / "mean", case_id))
        assert soft.get_data_dtype() == np.float32
        assert soft.shape == (*raters.shape[1:], 3)
        np.testing.assert_allclose(soft.affine, images[case_id].affine, atol=1e-5)
        np.testing.assert_allclose(np.asarray(soft.dataobj), one_hot.mean(0), atol=1e-6)

        hard = nib.load(target_path(tmp_path / "maj", case_id))
        assert hard.get_data_dtype() == np.uint8 and hard.shape == raters.shape[1:]
        np.testing.assert_allclose(hard.affine, images[case_id].affine, atol=1e-5)
        votes = one_hot.sum(0)
        np.testing.assert_array_equal(np.asarray(hard.dataobj), votes.argmax(-1))  # ties: lowest label

    index = pd.read_csv(tmp_path / "mean" / "index.csv", dtype={"case_id": str})
    manifest = read_manifest(phantoms)
    assert list(index["case_id"]) == [r.case_id for r in manifest.cases()]
    assert list(index["fold"]) == [r.fold for r in manifest.cases()]
    assert set(index["format"]) == {"probabilities"} and set(index["method"]) == {"mean"}
    assert all((tmp_path / "mean" / name).is_file() for name in index["target"])
    assert set(pd.read_csv(tmp_path / "maj" / "index.csv")["format"]) == {"labels"}


@pytest.mark.parametrize("method", ["weighted", "staple"])
def test_other_soft_methods_write_the_fusion_of_the_raters(phantoms, tmp_path, method):
    write_fused_targets(phantoms, method, tmp_path)
    for case_id, raters in _raters(phantoms).items():
        written = np.asarray(nib.load(target_path(tmp_path, case_id)).dataobj)
        expected = np.moveaxis(fuse(raters, method, 3).numpy(), 0, -1)
        np.testing.assert_allclose(written, expected, atol=1e-6)
        np.testing.assert_allclose(written.sum(-1), 1.0, atol=1e-5)


def test_random_draws_one_rater_per_case_reproducibly_and_independently_of_other_cases(phantoms, tmp_path):
    write_fused_targets(phantoms, "random", tmp_path / "a", seed=5)
    write_fused_targets(phantoms, "random", tmp_path / "b", seed=5)
    # The same draw for a case when fusing a manifest without the first case.
    manifest = read_manifest(phantoms)
    first = manifest.cases()[0].case_id
    subset = write_manifest(
        manifest.frame[manifest.frame["case_id"] != first], tmp_path / "subset.csv",
        num_classes=3, class_names=manifest.class_names, modality="CT", spatial_dims=3,
    )
    write_fused_targets(subset, "random", tmp_path / "c", seed=5)
    assert not target_path(tmp_path / "c", first).exists()
    for case_id, raters in _raters(phantoms).items():
        a = np.asarray(nib.load(target_path(tmp_path / "a", case_id)).dataobj)
        np.testing.assert_array_equal(a, np.asarray(nib.load(target_path(tmp_path / "b", case_id)).dataobj))
        assert any(np.array_equal(a, r) for r in raters)
        if case_id != first:
            np.testing.assert_array_equal(a, np.asarray(nib.load(target_path(tmp_path / "c", case_id)).dataobj))
    assert set(pd.read_csv(tmp_path / "a" / "index.csv")["seed"]) == {5}


def test_rerun_keeps_complete_cases_and_redoes_missing_or_damaged_ones(phantoms, tmp_path):
    first = write_fused_targets(phantoms, "mean", tmp_path)
    assert (first.written, first.kept) == (4, 0)
    case_ids = [r.case_id for r in read_manifest(phantoms).cases()]
    paths = {c: target_path(tmp_path, c) for c in case_ids}
    before = {c: p.stat().st_mtime_ns for c, p in paths.items()}
    expected = {c: np.asarray(nib.load(p).dataobj) for c, p in paths.items()}
    paths[case_ids[0]].unlink()
    damaged = paths[case_ids[1]].read_bytes()
    paths[case_ids[1]].write_bytes(damaged[: len(damaged) // 2])  # a truncated file, as after a crash
    (tmp_path / "index.csv").unlink()

    again = write_fused_targets(phantoms, "mean", tmp_path)
    assert (again.written, again.kept) == (2, 2)
    for c in case_ids[2:]:
        assert paths[c].stat().st_mtime_ns == before[c]
    for c in case_ids:
        np.testing.assert_array_equal(np.asarray(nib.load(paths[c]).dataobj), expected[c])
    assert (tmp_path / "index.csv").is_file()
    # The seed does not matter to deterministic methods: still the same settings.
    assert write_fused_targets(phantoms, "mean", tmp_path, seed=9).kept == 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_other_settings_in_the_same_folder_are_an_error(phantoms, tmp_path, capsys):
    write_fused_targets(phantoms, "random", tmp_path, seed=1)
    with pytest.raises(ValueError, match="other settings"):
        write_fused_targets(phantoms, "random", tmp_path, seed=2)
    assert main(["fuse", "--manifest", str(phantoms), "--method", "majority", "--out", str(tmp_path)]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "median"], "invalid choice: 'median'"),
        (["--method", "mean", "--seed", "-1"], "seed must be a finite integer >= 0"),
    ],
)
def test_bad_arguments_are_clear_errors(phantoms, tmp_path, capsys, args, message):
    assert main(["fuse", "--manifest", str(phantoms), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_manifest_and_unreadable_case_are_named(phantoms, tmp_path, capsys):
    assert main(["fuse", "--manifest", str(tmp_path / "none.csv"), "--method", "mean", "--out", str(tmp_path)]) == 2
    assert "none.csv" in capsys.readouterr().err

    manifest = read_manifest(phantoms)
    frame = manifest.frame.copy()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    frame.loc[frame.index[-1], "label"] = str(broken)
    bad = write_manifest(frame, tmp_path / "bad.csv", num_classes=3, class_names=manifest.class_names,
                         modality="CT", spatial_dims=3)
    last_case = frame["case_id"].iloc[-1]
    with pytest.raises(ValueError, match=f"case '{last_case}'"):
        write_fused_targets(bad, "mean", tmp_path / "out")
    assert not (tmp_path / "out" / "index.csv").exists()

"""Synthetic multi-rater phantoms: determinism, CT-like content, realistic rater disagreement, 2D variant, CLI."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import f1_score

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, cases=6, raters=3, shape=(32, 32, 24), dims=3, seed=5, folds=3)


def _arrays(manifest):
    m = read_manifest(manifest)
    for case in m.cases():
        image = nib.load(case.image)
        labels = [np.asarray(nib.load(p).dataobj) for p in case.labels]
        yield case, image, labels


def test_manifest_and_files(phantoms):
    m = read_manifest(phantoms)
    assert (m.num_classes, m.class_names, m.modality, m.spatial_dims, m.num_folds) == (
        3, ["background", "organ", "lesion"], "CT", 3, 3)
    assert m.frame["case_id"].nunique() == 6
    assert list(m.frame.groupby("case_id").size()) == [3] * 6
    assert sorted(m.frame.groupby("case_id")["fold"].first().value_counts()) == [2, 2, 2]


def test_ct_like_volumes_on_an_anisotropic_grid(phantoms):
    for _, image, labels in _arrays(phantoms):
        hu = np.asarray(image.dataobj)
        assert hu.dtype == np.int16 and hu.shape == (32, 32, 24)
        zooms = image.header.get_zooms()
        assert zooms[0] == pytest.approx(zooms[1]) and zooms[2] >= 2 * zooms[0]  # thick slices
        assert np.linalg.det(image.affine[:3, :3]) != 0
        assert abs(np.median(hu[0, 0]) + 1000) < 60  # air in the corners
        consensus = np.stack(labels)
        organ = (consensus == 1).all(0)
        lesion = (consensus == 2).all(0)
        assert 70 < hu[organ].mean() < 130  # enhanced parenchyma
        assert lesion.any() and hu[lesion].mean() < hu[organ].mean() - 20  # hypodense lesion
        assert set(np.unique(consensus)) <= {0, 1, 2}


def test_raters_disagree_like_real_raters(phantoms):
    organ_dice, lesion_dice = [], []
    for _, _, labels in _arrays(phantoms):
        organ_volumes = [(lab > 0).sum() for lab in labels]
        assert organ_volumes == sorted(organ_volumes)  # rater 1 under-, rater 3 over-segments
        assert organ_volumes[0] < organ_volumes[-1]
        for a, b in itertools.combinations(labels, 2):
            organ_dice.append(f1_score((a > 0).ravel(), (b > 0).ravel()))
            lesion_dice.append(f1_score((a == 2).ravel(), (b == 2).ravel(), zero_division=0.0))
    assert 0.8 < np.mean(organ_dice) < 0.99  # raters agree on the organ, but not perfectly
    assert np.mean(lesion_dice) < np.mean(organ_dice) - 0.05  # and disagree more on the small lesion


def test_deterministic_for_a_seed(phantoms, tmp_path):
    again = make_phantom_dataset(tmp_path / "a", cases=6, raters=3, shape=(32, 32, 24), dims=3, seed=5, folds=3)
    other = make_phantom_dataset(tmp_path / "b", cases=6, raters=3, shape=(32, 32, 24), dims=3, seed=6, folds=3)
    for (c1, i1, l1), (c2, i2, l2), (_, i3, _) in zip(_arrays(phantoms), _arrays(again), _arrays(other)):
        assert c1.case_id == c2.case_id and c1.fold == c2.fold
        np.testing.assert_array_equal(np.asarray(i1.dataobj), np.asarray(i2.dataobj))
        np.testing.assert_array_equal(i1.affine, i2.affine)
        for a, b in zip(l1, l2):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(np.asarray(i1.dataobj), np.asarray(i3.dataobj))


def test_2d_variant(tmp_path):
    manifest = make_phantom_dataset(tmp_path, cases=3, raters=4, shape=(40, 36), dims=2, seed=0, folds=3)
    m = read_manifest(manifest)
    assert m.spatial_dims == 2 and list(m.frame["rater"][:4]) == ["1", "2", "3", "4"]
    for _, image, labels in _arrays(manifest):
        assert image.shape == (40, 36) and all(lab.shape == (40, 36) for lab in labels)
        assert (labels[-1] > 0).sum() > (labels[0] > 0).sum()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="must have 3 entries"):
        make_phantom_dataset(tmp_path, shape=(32, 32), dims=3)
    with pytest.raises(ValueError, match="cannot split 2 case"):
        make_phantom_dataset(tmp_path, cases=2, folds=5)
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(ValueError, match=r"already holds other folders \['unrelated'\]"):
        make_phantom_dataset(tmp_path, cases=2, folds=2, shape=(16, 16, 16))


def test_demo_data_command(tmp_path, capsys):
    code = main(["demo-data", "--out", str(tmp_path / "demo"), "--cases", "3", "--raters", "2", "--shape", "16", "16",
                 "--dims", "2", "--folds", "3", "--seed", "1"])
    assert code == 0
    assert "3 cases, 6 annotations, 3 classes" in capsys.readouterr().out
    assert read_manifest(tmp_path / "demo" / "manifest.csv").spatial_dims == 2
    assert main(["demo-data", "--out", str(tmp_path / "bad"), "--shape", "16", "16", "--dims", "3"]) == 2

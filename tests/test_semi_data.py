"""Unlabelled cases: manifest schema, simulated partial annotation, image-only loading, weak/strong views."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from medjdt.data import (
    PreprocessedCases,
    PreprocessSettings,
    ensure_demo_data,
    make_phantom_dataset,
    read_manifest,
    write_manifest,
)
from medjdt.data.datamodule import SegmentationDataModule, UnlabelledCases
from medjdt.data.manifest import hide_annotations, metadata_path, write_partly_labelled
from medjdt.data.transforms import unlabelled_transform

META = {"num_classes": 3, "class_names": ["background", "organ", "lesion"], "modality": "CT", "spatial_dims": 3}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("semi_phantoms")
    return make_phantom_dataset(out, cases=9, raters=2, shape=(24, 24, 16), dims=3, seed=0, folds=3)


@pytest.fixture(scope="module")
def semi_manifest(phantoms) -> Path:
    """Fold 0 fully labelled; half of the 6 training cases (3) keep their annotations."""
    return write_partly_labelled(phantoms, phantoms.parent / "semi.csv", 0.5, keep_folds=[0], seed=0)


def _dm(manifest, tmp_path, **kwargs):
    args = {"num_folds": 3, "patch_size": [16, 16, 8], "batch_size": 2, "samples_per_volume": 2, "num_workers": 0,
            "cache_dir": str(tmp_path / "cache")}
    return SegmentationDataModule(manifest=str(manifest), **{**args, **kwargs})


# ---------------------------------------------------------------------------------------------- manifest schema
def test_unlabelled_rows_round_trip(tmp_path):
    rows = [
        {"case_id": "a", "image": "a.nii.gz", "label": "a_r1.nii.gz", "rater": "1", "fold": 0},
        {"case_id": "a", "image": "a.nii.gz", "label": "a_r2.nii.gz", "rater": "2", "fold": 0},
        {"case_id": "u", "image": "u.nii.gz", "label": None, "rater": None, "fold": 1},
        {"case_id": "v", "image": "v.nii.gz", "label": "", "rater": "", "fold": 0},
    ]
    path = write_manifest(rows, tmp_path / "m.csv", num_folds=2, **META)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert raw.loc[raw["case_id"] == "u", ["label", "rater"]].values.tolist() == [["", ""]]
    m = read_manifest(path)
    assert [(c.case_id, c.labelled, c.raters, c.labels) for c in m.cases()] == [
        ("a", True, ("1", "2"), (tmp_path / "a_r1.nii.gz", tmp_path / "a_r2.nii.gz")),
        ("u", False, (), ()),
        ("v", False, (), ()),
    ]
    assert [c.case_id for c in m.cases(labelled=True)] == ["a"]
    assert [c.case_id for c in m.cases(folds=[0], labelled=False)] == ["v"]
    assert m.cases(folds=[1])[0].image == tmp_path / "u.nii.gz"
    # check_files looks for the images of unlabelled cases and for no label file.
    for name in ("a.nii.gz", "a_r1.nii.gz", "a_r2.nii.gz", "u.nii.gz"):
        (tmp_path / name).touch()
    with pytest.raises(ValueError, match=r"1 missing file\(s\): case 'v': image file .*v.nii.gz"):
        m.check_files()
    (tmp_path / "v.nii.gz").touch()
    m.check_files()
    # A manifest of unlabelled cases only (its label and rater columns are entirely empty).
    only = read_manifest(write_manifest(rows[2:], tmp_path / "only.csv", num_folds=2, **META))
    assert [(c.case_id, c.labelled) for c in only.cases()] == [("u", False), ("v", False)]


def _raw(tmp_path, rows):
    path = tmp_path / "raw.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    metadata_path(path).write_text(json.dumps({**META, "num_folds": 2}))
    return path


@pytest.mark.parametrize(
    ("label", "rater", "message"),
    [
        ("", "2", r"\['c'\] have no annotation \(empty 'label'\)"),
        ("c_r2.nii.gz", "", r"\['c'\] have no rater name \(empty 'rater'\)"),
        ("", "", r"\['c'\] have a row without annotation .* besides other rows"),
    ],
)
def test_half_empty_or_mixed_unlabelled_rows_are_rejected(tmp_path, label, rater, message):
    rows = [
        {"case_id": "c", "image": "c.nii.gz", "label": "c_r1.nii.gz", "rater": "1", "fold": 0},
        {"case_id": "c", "image": "c.nii.gz", "label": label, "rater": rater, "fold": 0},
    ]
    with pytest.raises(ValueError, match=message):
        read_manifest(_raw(tmp_path, rows))


def test_two_unlabelled_rows_for_one_case_are_rejected(tmp_path):
    rows = [{"case_id": "c", "image": "c.nii.gz", "label": "", "rater": "", "fold": 0}] * 2
    with pytest.raises(ValueError, match=r"\['c'\] have a row without annotation"):
        read_manifest(_raw(tmp_path, rows))


@settings(max_examples=25, deadline=None)
@given(
    n_cases=st.integers(4, 30),
    raters=st.integers(1, 3),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_hide_annotations_keeps_the_fraction_and_the_kept_folds(tmp_path_factory, n_cases, raters, fraction, seed):
    tmp_path = tmp_path_factory.mktemp("hide")
    rows = [{"case_id": f"c{c:02d}", "image": f"c{c}.nii.gz", "label": f"c{c}_{r}.nii.gz", "rater": str(r),
             "fold": c % 3} for c in range(n_cases) for r in range(raters)]
    m = read_manifest(write_manifest(rows, tmp_path / "m.csv", num_folds=3, **META))
    eligible = [c for c in range(n_cases) if c % 3 != 0]
    n_keep = max(1, round(fraction * len(eligible)))  # a small fraction still keeps one labelled case
    frame = hide_annotations(m, fraction, keep_folds=[0], seed=seed)
    out = read_manifest(write_manifest(frame, tmp_path / "out.csv", num_folds=3, **META))
    before = {c.case_id: c for c in m.cases()}
    after = {c.case_id: c for c in out.cases()}
    assert list(after) == list(before)  # same cases, same order
    for case_id, case in after.items():
        assert (case.image, case.fold) == (before[case_id].image, before[case_id].fold)
        assert case == before[case_id] or not case.labelled  # annotations are kept whole or dropped whole
    assert all(after[c.case_id].labelled for c in m.cases(folds=[0]))
    assert sum(after[f"c{c:02d}"].labelled for c in eligible) == n_keep
    again = hide_annotations(m, fraction, keep_folds=[0], seed=seed)
    pd.testing.assert_frame_equal(frame, again)  # deterministic for a seed


def test_hide_annotations_argument_checks(phantoms):
    m = read_manifest(phantoms)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"labelled_fraction must be a finite number in \(0, 1\]"):
            hide_annotations(m, bad)


def test_write_partly_labelled_records_its_provenance(phantoms, semi_manifest):
    meta = json.loads(metadata_path(semi_manifest).read_text())
    assert meta["labelled_fraction"] == 0.5 and meta["labelled_keep_folds"] == [0] and meta["labelled_seed"] == 0
    assert meta["source_manifest"] == str(phantoms) and meta["num_folds"] == 3
    m = read_manifest(semi_manifest)
    assert len(m.cases(folds=[1, 2], labelled=True)) == 3 and len(m.cases(folds=[1, 2], labelled=False)) == 3
    assert len(m.cases(folds=[0], labelled=False)) == 0


# ---------------------------------------------------------------------------------------------- loading
def test_unlabelled_images_are_preprocessed_and_cached_like_labelled_ones(phantoms, tmp_path):
    """The image-only loader must give the labelled loader's image, including resampling and reorientation."""
    settings = PreprocessSettings(orientation="LPS", spacing=(1.5, 1.5, 2.0), intensity="ct", window=(-200, 300))
    record = read_manifest(phantoms).cases()[0]
    reference = PreprocessedCases(3, 3, settings, cache_dir=None)(record)
    unlabelled = type(record)(record.case_id, record.image, (), (), record.fold)
    loader = UnlabelledCases(3, settings, cache_dir=tmp_path / "cache")
    first = loader(unlabelled)
    assert set(first) == {"image", "case_id"} and first["case_id"] == record.case_id
    torch.testing.assert_close(first["image"].as_tensor(), reference["image"].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(first["image"].affine, reference["image"].affine)
    assert (first["image"].meta["spatial_shape"] == reference["image"].meta["spatial_shape"]).all()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    cached = loader(unlabelled)
    torch.testing.assert_close(cached["image"].as_tensor(), reference["image"].as_tensor(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="is labelled"):
        loader(record)


# ---------------------------------------------------------------------------------------------- weak / strong views
def _interior(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Voxels of ``mask`` (1, *spatial) whose (2r+1)^3 neighbourhood lies inside ``mask`` (binary erosion)."""
    size = 2 * radius + 1
    return -F.max_pool3d(-mask.float()[None], size, stride=1, padding=radius)[0] > 0.5


def test_weak_and_strong_views_are_aligned_voxel_for_voxel():
    """A constant-prediction case: a two-region image on which a threshold classifier predicts one constant class per
    region. The strong view's intensity changes (noise, blur, contrast, scale, shift) must keep that prediction
    for every voxel well inside a region of the weak view, which holds only if both views share the spatial
    transform (flips and rotations are on)."""
    image = torch.zeros(1, 16, 16, 16)
    image[:, :6] = 1.0  # asymmetric along axis 0: a flip of one view alone would swap most voxels
    image[:, :, :5, :4] = 1.0
    transform = unlabelled_transform(spatial_dims=3, patch_size=(16, 16, 16), samples_per_volume=16, augment=True)
    transform.set_random_state(seed=0)
    views = transform({"image": image, "case_id": "x"})
    changed = flipped_weak = 0
    for view in views:
        weak, strong = view["weak"], view["strong"]
        assert weak.shape == strong.shape == (1, 16, 16, 16) and strong.dtype == torch.float32
        ones, zeros = _interior(weak > 0.99, 2), _interior(weak < 0.01, 2)
        assert ones.sum() > 100 and zeros.sum() > 100
        # The threshold classifier's constant prediction per region, on the strong view.
        assert strong[ones].min() > strong[zeros].max()
        changed += int(not torch.allclose(weak, strong))
        flipped_weak += int(not torch.equal(weak[:, :6] > 0.5, image[:, :6] > 0.5))
        # Negative control: a strong view flipped on its own breaks the region prediction.
        misaligned = strong.flip(1)
        assert not misaligned[ones].min() > misaligned[zeros].max()
    assert changed >= len(views) // 2  # intensity augmentation did happen on the strong views
    assert flipped_weak >= 1  # and spatial augmentation on the (shared) weak views


# ---------------------------------------------------------------------------------------------- data module
def test_training_batches_pair_labelled_and_unlabelled_views(semi_manifest, tmp_path):
    dm = _dm(semi_manifest, tmp_path, unlabelled_ratio=1.0)
    dm.setup("fit")
    manifest = read_manifest(semi_manifest)
    assert [r.case_id for r in dm.datasets["train"].data] == [c.case_id for c in manifest.cases([1, 2], True)]
    assert [r.case_id for r in dm.datasets["unlabelled"].data] == [c.case_id for c in manifest.cases([1, 2], False)]
    assert [r.case_id for r in dm.datasets["val"].data] == [c.case_id for c in manifest.cases([0])]
    loader = dm.train_dataloader()
    batches = [batch for batch, _, _ in loader]
    assert len(batches) == len(loader) == 2  # one epoch = one pass over the 3 labelled cases, 2 per batch
    first = batches[0]
    assert set(first) == {"labelled", "unlabelled"}
    assert first["labelled"]["image"].shape == (4, 1, 16, 16, 8)
    assert first["labelled"]["label"].shape == (4, 3, 16, 16, 8)
    # unlabelled_ratio 1 x batch_size 2 = 2 unlabelled volumes x 2 patches each
    assert first["unlabelled"]["weak"].shape == first["unlabelled"]["strong"].shape == (4, 1, 16, 16, 8)
    assert batches[1]["unlabelled"]["weak"].shape[0] == 4  # also next to the last, smaller labelled batch

    half = _dm(semi_manifest, tmp_path, unlabelled_ratio=0.5)
    half.setup("fit")
    assert next(iter(half.train_dataloader()))[0]["unlabelled"]["weak"].shape[0] == 2  # 1 volume x 2 patches

    # Labelled-only training on the same manifest: plain batches, unlabelled cases unused.
    plain = _dm(semi_manifest, tmp_path)
    plain.setup("fit")
    assert set(next(iter(plain.train_dataloader()))) == {"image", "label"} and "unlabelled" not in plain.datasets


def test_unlabelled_batches_are_reproducible(semi_manifest, tmp_path):
    def first():
        dm = _dm(semi_manifest, tmp_path, unlabelled_ratio=1.0, seed=5)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]["unlabelled"]

    a, b = first(), first()
    torch.testing.assert_close(a["weak"], b["weak"])
    torch.testing.assert_close(a["strong"], b["strong"])


def test_prediction_includes_unlabelled_cases(semi_manifest, tmp_path):
    dm = _dm(semi_manifest, tmp_path, predict_on="all")
    dm.setup("predict")
    items = {item["case_id"]: item for item in dm.datasets["predict"]}
    assert sorted(items) == sorted(c.case_id for c in read_manifest(semi_manifest).cases())
    unlabelled = read_manifest(semi_manifest).cases(labelled=False)[0].case_id
    assert set(items[unlabelled]) == {"image", "case_id"} and items[unlabelled]["image"].ndim == 4


def test_unlabelled_ratio_checks(phantoms, semi_manifest, tmp_path):
    with pytest.raises(ValueError, match="unlabelled_ratio must be a finite number >= 0"):
        _dm(semi_manifest, tmp_path, unlabelled_ratio=-1.0)
    with pytest.raises(ValueError, match="rounds to 0 unlabelled volumes"):
        _dm(semi_manifest, tmp_path, unlabelled_ratio=0.2)
    dm = _dm(phantoms, tmp_path, unlabelled_ratio=1.0)  # fully labelled manifest
    with pytest.raises(ValueError, match=r"no unlabelled cases in train folds \[1, 2\]"):
        dm.setup("fit")
    # Nothing labelled left to train on.
    frame = read_manifest(semi_manifest).frame.copy()
    frame.loc[frame["fold"] != 0, ["label", "rater"]] = ""
    frame = frame.drop_duplicates(["case_id", "rater"])
    unlabelled_only = write_manifest(frame, tmp_path / "unlabelled_only.csv", num_folds=3, **META)
    dm = _dm(unlabelled_only, tmp_path, unlabelled_ratio=1.0)
    with pytest.raises(ValueError, match=r"no labelled cases \(only unlabelled ones\) in train folds \[1, 2\]"):
        dm.setup("fit")


def test_demo_with_labelled_fraction_derives_a_partly_labelled_manifest(tmp_path):
    demo = {"cases": 6, "raters": 2, "shape": [16, 16, 16], "seed": 0, "labelled_fraction": 0.25}
    manifest = tmp_path / "demo" / "labelled.csv"
    ensure_demo_data(manifest, demo, num_folds=3, fold=1)
    dm = SegmentationDataModule(manifest=str(manifest), demo=demo, num_folds=3, patch_size=[8, 8, 8],
                                num_workers=0, fold=1)
    full = read_manifest(tmp_path / "demo" / "manifest.csv")
    assert all(c.labelled for c in full.cases())
    assert dm.manifest.path == manifest
    assert all(c.labelled for c in dm.manifest.cases(folds=[1]))  # the validation fold stays labelled
    assert len(dm.manifest.cases(folds=[0, 2], labelled=True)) == 1  # round(0.25 * 4)
    with pytest.raises(ValueError, match="so validation fold 0 is partly unlabelled"):
        SegmentationDataModule(manifest=str(manifest), demo=demo, num_folds=3, fold=0)  # derived for fold 1
    with pytest.raises(ValueError, match="must not be named manifest.csv"):
        ensure_demo_data(tmp_path / "other" / "manifest.csv", demo, num_folds=3, fold=0)

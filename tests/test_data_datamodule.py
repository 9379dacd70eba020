"""SegmentationDataModule: batch contracts, patch sampling, joint augmentation, per-epoch fusion, 2D/3D."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medjdt.data import (
    PreprocessedCases,
    SegmentationDataModule,
    ensure_demo_data,
    make_phantom_dataset,
    read_manifest,
    restore_original_grid,
    write_manifest,
)
from medjdt.data import transforms as data_transforms

SHAPE = (24, 24, 16)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm_phantoms")
    return make_phantom_dataset(out, cases=6, raters=3, shape=SHAPE, dims=3, seed=0, folds=3)


def _dm(manifest, tmp_path, **kwargs):
    args = {"num_folds": 3, "patch_size": [16, 16, 8], "batch_size": 2, "samples_per_volume": 2, "num_workers": 0,
            "cache_dir": str(tmp_path / "cache")}
    args.update(kwargs)
    return SegmentationDataModule(manifest=str(manifest), **args)


def test_properties_before_setup_and_argument_checks(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path)
    assert (dm.num_classes, dm.class_names, dm.spatial_dims, dm.in_channels) == (
        3, ["background", "organ", "lesion"], 3, 1)
    bad = {
        "fold": (3, r"data.fold must be a finite integer in \[0, 2\], got 3"),
        "num_folds": (5, "num_folds=5 disagrees with manifest .* split into 3 folds"),
        "fusion": ("median", "fusion must be one of"),
        "patch_size": ([16, 16], "must have 3 positive entries"),
        "spacing": ([1.0, 1.0], "must have 3 values for 3D"),
        "label_smoothing": (1.0, r"label_smoothing must be a finite number in \[0, 1\)"),
        "smoothing_mode": ("gaussian", "smoothing_mode must be one of"),
        "foreground_ratio": (1.5, "foreground_ratio"),
        "intensity": ("mri", "intensity must be one of"),
        "window": ([300, -200], "low < high"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            _dm(phantoms, tmp_path, **{name: value})


def test_train_batches(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path, fusion="mean", label_smoothing=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 1, 16, 16, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 3, 16, 16, 8) and batch["label"].dtype == torch.float32
    label = batch["label"]
    torch.testing.assert_close(label.sum(1), torch.ones_like(label[:, 0]))
    # mean of three hard raters: multiples of 1/3, even after augmentation (raters resampled nearest)
    torch.testing.assert_close(label * 3, (label * 3).round(), atol=1e-5, rtol=0)
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2


def test_label_smoothing_is_applied(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path, fusion="majority", label_smoothing=0.3, augment=False)
    dm.setup("fit")
    label = next(iter(dm.train_dataloader()))["label"]
    assert label.min() >= 0.1 - 1e-6 and label.max() <= 1 - 0.2 + 1e-6  # (1 - eps) * onehot + eps / C


def test_foreground_ratio_one_centres_every_patch_on_rater_foreground(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path, foreground_ratio=1.0, augment=False, patch_size=[5, 5, 5], samples_per_volume=8)
    dm.setup("fit")
    for _ in range(2):
        for batch in dm.train_dataloader():
            centre = batch["label"][:, 0, 2, 2, 2]  # background probability at the patch centre
            assert (centre < 1).all()
    dm0 = _dm(phantoms, tmp_path, foreground_ratio=0.0, augment=False, patch_size=[5, 5, 5], samples_per_volume=8)
    dm0.setup("fit")
    centres = torch.cat([b["label"][:, 0, 2, 2, 2] for b in dm0.train_dataloader()])
    # Centres drawn near the volume's edge move inward so the patch fits, sometimes onto foreground.
    assert (centres == 1).float().mean() > 0.75


def _rater_choice(label: torch.Tensor, raters: torch.Tensor) -> int:
    """Index of the rater whose one-hot map equals ``label`` (C, *spatial)."""
    matches = [r for r in range(raters.shape[0]) if torch.equal(label.argmax(0), raters[r].long())]
    assert len(matches) == 1 and torch.equal(label.max(0).values, torch.ones_like(label[0]))
    return matches[0]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_rater_union_is_the_voxels_any_rater_labels_foreground(dtype):
    raters = torch.randint(0, 4, (3, 9, 8, 7), generator=torch.Generator().manual_seed(0)).to(dtype)
    raters[:, 0] = 0  # a slab every rater leaves as background
    union = data_transforms.RaterUniond(keys="raters")({"raters": raters})["foreground"]
    assert union.dtype == torch.uint8 and union.shape == (1, 9, 8, 7)
    torch.testing.assert_close(union, (raters > 0).any(0, keepdim=True).to(torch.uint8), rtol=0, atol=0)
    assert union[:, 0].sum() == 0


def test_random_fusion_draws_a_rater_per_sample_per_epoch(phantoms, tmp_path):
    def choices(seed):
        dm = _dm(phantoms, tmp_path, fusion="random", augment=False, patch_size=list(SHAPE), samples_per_volume=2,
                 seed=seed)
        dm.setup(None)
        train, val = dm.datasets["train"], dm.datasets["val"]
        loaded = PreprocessedCases(dm.num_classes, dm.spatial_dims, dm.settings, dm.cache_dir)(train.data[0])
        raters = loaded["raters"]  # the whole volume is the patch
        out = []
        for epoch in range(6):
            for sample in train[(epoch, 0, 0)]:  # the key EpochSampler yields: (epoch, draw, case index)
                out.append(_rater_choice(sample["label"], raters))
        assert len(val) == 2
        return out

    first = choices(seed=0)
    assert len(set(first)) >= 2  # a new draw per sample and epoch, not one rater per case
    assert choices(seed=0) == first  # reproducible
    assert choices(seed=1) != first


def test_joint_augmentation_keeps_image_and_raters_aligned(tmp_path, monkeypatch):
    # One rater; intensity = 100 HU x label on an asymmetric layout, so a misaligned flip/rotation shows.
    rows = []
    for c in range(3):
        label = np.zeros(SHAPE, np.uint8)
        label[2 + c : 14, 3:12, 2:10] = 1
        label[4:8, 5:8, 3:6] = 2
        affine = np.diag([-0.8, -0.8, 2.0, 1.0])
        nib.save(nib.Nifti1Image(label.astype(np.int16) * 100, affine), tmp_path / f"c{c}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / f"c{c}_r1.nii.gz")
        rows.append({"case_id": f"c{c}", "image": f"c{c}.nii.gz", "label": f"c{c}_r1.nii.gz", "rater": "1", "fold": c})
    manifest = write_manifest(rows, tmp_path / "m.csv", num_classes=3, class_names=["bg", "a", "b"], modality="CT",
                              spatial_dims=3, num_folds=3)
    # every patch rotated/scaled strongly, no intensity change: the image must still read as its label
    for name, value in (("AFFINE_PROB", 1.0), ("MAX_ROTATION_RAD", 0.5), ("MAX_SCALE", 0.2),
                        ("INTENSITY_SCALE", 0.0), ("INTENSITY_SHIFT", 0.0)):
        monkeypatch.setattr(data_transforms, name, value)
    dm = _dm(manifest, tmp_path, window=[0, 200], samples_per_volume=4, foreground_ratio=0.8)
    dm.setup("fit")
    agreement = []
    for batch in list(dm.train_dataloader()) * 3:
        for image, label in zip(batch["image"][:, 0], batch["label"]):
            # image = label / 2 before augmentation; bilinear vs nearest differ only on boundaries
            agreement.append(((image * 2).round() == label.argmax(0)).float().mean().item())
    assert min(agreement) > 0.95


def test_val_and_test_batches_keep_every_rater(phantoms, tmp_path):
    m = read_manifest(phantoms)
    frame = m.frame[~((m.frame["case_id"] == "case_001") & (m.frame["rater"] == "3"))]
    manifest = write_manifest(frame, tmp_path / "two_raters.csv", num_classes=3, class_names=m.class_names,
                              modality="CT", spatial_dims=3, num_folds=3)
    dm = _dm(manifest, tmp_path, fold=int(m.frame.set_index("case_id").loc["case_001", "fold"].iloc[0]))
    dm.setup("validate")
    dm.setup("test")
    seen = {}
    for batch in dm.val_dataloader():
        image, raters, (case_id,) = batch["image"], batch["raters"], batch["case_id"]
        assert isinstance(image, MetaTensor) and image.shape == (1, 1, *SHAPE) and image.dtype == torch.float32
        assert raters.dtype == torch.int64 and raters.shape[2:] == image.shape[2:]
        seen[case_id] = raters.shape[1]
        # stored rater files, reoriented with nibabel (RAS), must equal the delivered raters
        case = next(c for c in read_manifest(manifest).cases() if c.case_id == case_id)
        for r, path in enumerate(case.labels):
            ras = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
            np.testing.assert_array_equal(raters[0, r].numpy(), ras)
    assert seen["case_001"] == 2 and set(seen.values()) == {2, 3}
    assert [b["case_id"] for b in dm.test_dataloader()] == [[c] for c in seen]
    assert list((tmp_path / "cache").rglob("*.pt"))  # preprocessed cases were cached


def test_predict_batches_restore_to_the_stored_grid(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path, predict_on="all", spacing=[1.2, 1.2, 3.0])
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert len(batches) == 6 and set(batches[0]) == {"image", "case_id"}
    case = read_manifest(phantoms).cases()[0]
    batch = batches[0]
    assert batch["case_id"] == [case.case_id]
    probs = torch.softmax(torch.randn(1, 3, *batch["image"].shape[2:]), 1)
    restored, affine = restore_original_grid(probs, batch["image"])
    stored = nib.load(case.image)
    assert restored.shape == (3, *stored.shape)
    np.testing.assert_allclose(affine, stored.affine, atol=1e-5)


def test_2d_datamodule(tmp_path):
    manifest = make_phantom_dataset(tmp_path / "p2d", cases=3, raters=2, shape=(32, 28), dims=2, seed=0, folds=3)
    dm = _dm(manifest, tmp_path, patch_size=[16, 16], spacing=[1.0, 1.0])
    assert dm.spatial_dims == 2
    dm.setup(None)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["label"].shape == (4, 3, 16, 16)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].ndim == 4 and val["raters"].shape[:2] == (1, 2)


def test_worker_processes_are_seeded_reproducibly(phantoms, tmp_path):
    def first_batch():
        dm = _dm(phantoms, tmp_path, num_workers=2, fusion="random", seed=3)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["label"], b["label"])


def test_ensure_demo_data_writes_the_phantoms_when_missing_and_the_data_module_only_reads(tmp_path):
    manifest = tmp_path / "demo" / "manifest.csv"
    demo = {"cases": 3, "raters": 2, "shape": [16, 16, 16], "seed": 0}  # folds follow num_folds
    with pytest.raises(ValueError, match="from Python call medjdt.data.ensure_demo_data first"):
        SegmentationDataModule(manifest=str(manifest), demo=demo, num_folds=3, patch_size=[8, 8, 8], num_workers=0)
    assert not (tmp_path / "demo").exists()  # the data module never writes a dataset
    ensure_demo_data(manifest, demo, num_folds=3, fold=0)
    dm = SegmentationDataModule(manifest=str(manifest), demo=demo, num_folds=3, patch_size=[8, 8, 8], num_workers=0)
    assert manifest.is_file() and dm.num_classes == 3 and dm.manifest.num_folds == 3
    assert dm.cache_dir == manifest.parent / ".cache"
    before = manifest.stat().st_mtime_ns
    ensure_demo_data(manifest, demo, num_folds=3, fold=0)  # present: left alone
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="must be named manifest.csv"):
        ensure_demo_data(tmp_path / "other" / "x.csv", demo, num_folds=3, fold=0)
    assert not (tmp_path / "other").exists()

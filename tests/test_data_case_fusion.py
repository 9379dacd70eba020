"""Whole-case STAPLE: fused once per case on the preprocessed grid, cached on disk, cropped and augmented as a
soft target together with the image."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import medjdt.labels.fusion as fusion_module
from medjdt.data import (
    CaseFusedTargets,
    CaseRecord,
    PreprocessedCases,
    SegmentationDataModule,
    make_phantom_dataset,
)
from medjdt.data import transforms as data_transforms
from medjdt.data.cache import CaseCache
from medjdt.data.transforms import FillBackgroundd, train_transform
from medjdt.labels import fuse

SHAPE = (24, 24, 16)
PATCH = [16, 16, 8]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("staple_phantoms")
    return make_phantom_dataset(out, cases=6, raters=3, shape=SHAPE, dims=3, seed=0, folds=3)


@pytest.fixture
def staple_calls(monkeypatch):
    """Counts the STAPLE fusions (every ``fuse(..., "staple", ...)`` goes through ``staple_probabilities``)."""
    calls = []
    original = fusion_module.staple_probabilities

    def counting(stack, num_classes):
        calls.append(tuple(stack.shape))
        return original(stack, num_classes)

    monkeypatch.setattr(fusion_module, "staple_probabilities", counting)
    return calls


def _dm(manifest, cache_dir, **kwargs):
    args = {"num_folds": 3, "patch_size": PATCH, "batch_size": 2, "samples_per_volume": 2, "num_workers": 0,
            "cache_dir": str(cache_dir), "fusion": "staple"}
    args.update(kwargs)
    return SegmentationDataModule(manifest=str(manifest), **args)


def _epoch(dm) -> list[dict]:
    return list(dm.train_dataloader())


def _locate(patch: torch.Tensor, volume: torch.Tensor) -> tuple[slice, ...]:
    """The unique window of ``volume`` (K, *spatial) equal to ``patch`` (K, *patch)."""
    size = patch.shape[1:]
    windows = volume[0].unfold(0, size[0], 1).unfold(1, size[1], 1).unfold(2, size[2], 1)
    hits = (windows == patch[0]).flatten(3).all(-1).nonzero()
    assert len(hits) == 1, f"patch found at {len(hits)} places"
    return tuple(slice(int(o), int(o) + s) for o, s in zip(hits[0], size))


def _assert_simplex(label: torch.Tensor) -> None:
    """``label`` (B, C, *spatial): every voxel a probability vector."""
    assert label.min() >= 0 and label.max() <= 1
    torch.testing.assert_close(label.sum(1), torch.ones_like(label[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["staple", "weighted"])
def test_patch_labels_are_crops_of_the_whole_case_target(phantoms, tmp_path, staple_calls, method):
    dm = _dm(phantoms, tmp_path / "cache", augment=False, samples_per_volume=3, fusion=method)
    dm.setup("fit")
    train = dm.datasets["train"]
    reference_cases = PreprocessedCases(dm.num_classes, dm.spatial_dims, dm.settings, cache_dir=None)
    patch_fusion_differs = []
    for index, record in enumerate(train.data):
        case = reference_cases(record)
        whole = fuse(case["raters"], method, dm.num_classes)  # (C, *spatial) on the whole preprocessed case
        for sample in train[index]:
            window = _locate(sample["image"], case["image"].as_tensor())
            torch.testing.assert_close(sample["label"], whole[(slice(None), *window)], atol=1e-6, rtol=0)
            per_patch = fuse(case["raters"][(slice(None), *window)], method, dm.num_classes)
            patch_fusion_differs.append(not torch.allclose(per_patch, sample["label"], atol=1e-3))
    # STAPLE's rater performances and the weighted method's rater weights estimated on a patch alone give a
    # different target.
    assert any(patch_fusion_differs)


def test_staple_runs_once_per_case_across_epochs_and_data_modules(phantoms, tmp_path, staple_calls):
    cache = tmp_path / "cache"
    dm = _dm(phantoms, cache)
    dm.setup("fit")
    cases = len(dm.datasets["train"])
    first = _epoch(dm)
    assert len(staple_calls) == cases and all(shape == (3, *SHAPE) for shape in staple_calls)  # whole cases only
    _epoch(dm)
    assert len(staple_calls) == cases
    again = _dm(phantoms, cache, seed=1)
    again.setup("fit")
    _epoch(again)
    assert len(staple_calls) == cases and again.datasets["train"].load.fused == 0
    assert sum(b["image"].shape[0] for b in first) == cases * 2
    # a fresh cache fuses again: the count above comes from the cache, not from a broken counter
    fresh = _dm(phantoms, tmp_path / "fresh")
    fresh.setup("fit")
    _epoch(fresh)
    assert len(staple_calls) == 2 * cases


def _target_dirs(cache) -> list:
    return [p.parent for p in cache.glob("*/settings.json")
            if json.loads(p.read_text()).get("content") == "fused target"]


def test_other_methods_neither_compute_nor_invalidate_the_staple_targets(phantoms, tmp_path, staple_calls):
    cache = tmp_path / "cache"
    for method in ("mean", "majority", "random"):
        dm = _dm(phantoms, cache, fusion=method)
        dm.setup("fit")
        _epoch(dm)
    assert staple_calls == [] and _target_dirs(cache) == []
    staple = _dm(phantoms, cache)
    staple.setup("fit")
    _epoch(staple)
    # the preprocessed cases written by the other methods are reused as they are
    assert staple.datasets["train"].load.cases.misses == 0
    (target_dir,) = _target_dirs(cache)
    entries = {p: p.stat().st_mtime_ns for p in target_dir.glob("*.pt")}
    assert len(entries) == len(staple.datasets["train"]) == len(staple_calls)
    dm = _dm(phantoms, cache, fusion="mean")
    dm.setup("fit")
    _epoch(dm)
    assert {p: p.stat().st_mtime_ns for p in target_dir.glob("*.pt")} == entries
    staple = _dm(phantoms, cache)
    staple.setup("fit")
    _epoch(staple)
    assert len(staple_calls) == len(entries)


def test_staple_labels_are_on_the_simplex_with_augmentation(phantoms, tmp_path, monkeypatch):
    # every patch rotated and scaled strongly, so interpolation and out-of-volume voxels occur in most patches
    for name, value in (("AFFINE_PROB", 1.0), ("MAX_ROTATION_RAD", 0.6), ("MAX_SCALE", 0.3)):
        monkeypatch.setattr(data_transforms, name, value)
    dm = _dm(phantoms, tmp_path / "cache", samples_per_volume=4)
    dm.setup("fit")
    labels = torch.cat([b["label"] for _ in range(2) for b in _epoch(dm)])
    assert labels.shape[1:] == (3, *PATCH)
    _assert_simplex(labels)
    # soft STAPLE probabilities survive (not only hard 0/1 labels)
    assert ((labels > 0.05) & (labels < 0.95)).any()

    smoothed = _dm(phantoms, tmp_path / "cache", samples_per_volume=4, label_smoothing=0.3)
    smoothed.setup("fit")
    labels = torch.cat([b["label"] for b in _epoch(smoothed)])
    _assert_simplex(labels)
    assert labels.min() >= 0.1 - 1e-6  # (1 - eps) * target + eps / C


def test_staple_in_2d(tmp_path, staple_calls):
    manifest = make_phantom_dataset(tmp_path / "p2d", cases=3, raters=3, shape=(32, 28), dims=2, seed=0, folds=3)
    dm = _dm(manifest, tmp_path / "cache", patch_size=[16, 16], spacing=[1.0, 1.0])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["label"].shape == (4, 3, 16, 16)
    _assert_simplex(batch["label"])
    assert len(staple_calls) == len(dm.datasets["train"])


@pytest.mark.parametrize("augment", [False, True])
def test_voxels_padded_outside_the_volume_are_background(monkeypatch, augment):
    monkeypatch.setattr(data_transforms, "AFFINE_PROB", 1.0)
    volume, patch = (12, 12, 8), (16, 16, 8)
    organ = torch.zeros((3, *volume))
    organ[1] = 1.0  # no background anywhere inside the volume
    case = {"image": torch.rand((1, *volume)), "raters": torch.ones((2, *volume), dtype=torch.uint8), "label": organ}
    chain = train_transform(num_classes=3, spatial_dims=3, patch_size=patch, samples_per_volume=2,
                            foreground_ratio=1.0, fusion="staple", label_smoothing=0.0, smoothing_mode="uniform",
                            augment=augment)
    chain.set_random_state(seed=0)
    for sample in chain(case):
        label = sample["label"]
        assert label.shape == (3, *patch)
        _assert_simplex(label[None])
        if not augment:  # SpatialPad added 2 voxels on each side of the first two axes
            background = torch.zeros(patch, dtype=torch.bool)
            background[:2], background[-2:], background[:, :2], background[:, -2:] = True, True, True, True
            torch.testing.assert_close(label[0], background.float())
            torch.testing.assert_close(label[1], (~background).float())


def test_fill_background():
    target = torch.tensor([[0.2, 0.0, 0.3], [0.5, 0.0, 0.7], [0.3, 0.0, 0.0]]).reshape(3, 3, 1)
    out = FillBackgroundd(keys="label")({"label": target})["label"]
    expected = torch.tensor([[0.2, 1.0, 0.3], [0.5, 0.0, 0.7], [0.3, 0.0, 0.0]]).reshape(3, 3, 1)
    torch.testing.assert_close(out, expected)
    bad = {
        "foreground above 1": torch.tensor([[0.0], [0.8], [0.8]]).reshape(3, 1, 1),
        "negative": torch.tensor([[1.1], [-0.1], [0.0]]).reshape(3, 1, 1),
    }
    for value in bad.values():
        with pytest.raises(ValueError, match="not a soft target"):
            FillBackgroundd(keys="label")({"label": value})
    with pytest.raises(ValueError, match="floating soft target"):
        FillBackgroundd(keys="label")({"label": torch.zeros((3, 2, 2), dtype=torch.long)})


def test_cached_target_damaged_or_of_the_wrong_shape_is_rebuilt(phantoms, tmp_path, staple_calls):
    dm = _dm(phantoms, tmp_path / "cache")
    record = dm.manifest.cases([1])[0]
    cases = PreprocessedCases(dm.num_classes, dm.spatial_dims, dm.settings, tmp_path / "cache")
    targets = CaseFusedTargets(cases, "staple", tmp_path / "cache")
    good = targets(record)["label"]
    assert good.shape == (3, *SHAPE) and targets.fused == 1
    entry = targets.cache.entry_path(record)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again = CaseFusedTargets(cases, "staple", tmp_path / "cache")
    with pytest.warns(UserWarning, match="corrupt"):
        torch.testing.assert_close(again(record)["label"], good)
    assert again.fused == 1
    again.cache.write(record, {"label": good[:, :-1].contiguous(), "case_id": record.case_id, "checksums": {}})
    with pytest.warns(UserWarning, match="target shape"):
        torch.testing.assert_close(again(record)["label"], good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = CaseFusedTargets(cases, "staple", tmp_path / "cache")
        torch.testing.assert_close(third(record)["label"], good)
    assert third.fused == 0 and len(staple_calls) == 3


def test_argument_checks(phantoms, tmp_path):
    dm = _dm(phantoms, tmp_path / "cache")
    cases = PreprocessedCases(dm.num_classes, dm.spatial_dims, dm.settings, None)
    with pytest.raises(ValueError, match="whole-case fusion: method must be one of"):
        CaseFusedTargets(cases, "mean")
    unlabelled = CaseRecord(case_id="u1", image=phantoms, labels=(), raters=(), fold=0)
    with pytest.raises(ValueError, match="'u1' has no annotations"):
        CaseFusedTargets(cases, "staple")(unlabelled)
    with pytest.raises(ValueError, match="cache schema needs"):
        CaseCache(tmp_path / "c", {}, schema={"label": torch.Tensor})

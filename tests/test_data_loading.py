"""Loading cases (geometry and value checks), bad inputs, and the on-disk cache of preprocessed cases."""

from __future__ import annotations

import gzip
import warnings
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medjdt.data import PreprocessedCases, PreprocessSettings, load_case, read_manifest, write_manifest
from medjdt.data import io as data_io

SHAPE = (12, 10, 8)
AFFINE = np.array([[-0.8, 0.0, 0.0, 30.0], [0.0, -0.8, 0.0, -12.0], [0.0, 0.0, 2.5, 100.0], [0.0, 0.0, 0.0, 1.0]])


def _save(array, path: Path, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


@pytest.fixture
def dataset(tmp_path):
    """Two cases with two raters each; returns (manifest path, {case: (image, [rater maps])})."""
    rng = np.random.default_rng(0)
    rows, arrays = [], {}
    for c in ("c0", "c1"):
        image = rng.normal(0, 100, SHAPE).astype(np.int16)
        _save(image, tmp_path / f"{c}.nii.gz")
        maps = []
        for r in (1, 2):
            label = np.zeros(SHAPE, np.uint8)
            label[2:9, 2:8, 1:6 + r] = 1
            label[4:6, 4:6, 3:5] = 2
            _save(label, tmp_path / f"{c}_r{r}.nii.gz")
            maps.append(label)
            rows.append({"case_id": c, "image": f"{c}.nii.gz", "label": f"{c}_r{r}.nii.gz", "rater": str(r), "fold": 0})
        arrays[c] = (image, maps)
    path = write_manifest(rows, tmp_path / "m.csv", num_classes=3, class_names=["bg", "a", "b"], modality="CT",
                          spatial_dims=3, num_folds=1)
    return path, arrays


def _case(path, case_id="c0"):
    return next(c for c in read_manifest(path).cases() if c.case_id == case_id)


def test_load_case_reads_image_and_stacks_raters(dataset):
    path, arrays = dataset
    loaded = load_case(_case(path), num_classes=3, spatial_dims=3)
    image, maps = arrays["c0"]
    assert loaded["image"].shape == (1, *SHAPE) and loaded["image"].dtype == torch.float32
    np.testing.assert_array_equal(loaded["image"][0].numpy(), image.astype(np.float32))
    assert loaded["raters"].shape == (2, *SHAPE) and loaded["raters"].dtype == torch.uint8
    np.testing.assert_array_equal(loaded["raters"].numpy(), np.stack(maps))
    np.testing.assert_allclose(np.asarray(loaded["image"].affine), AFFINE, atol=1e-6)
    assert loaded["rater_names"] == ["1", "2"] and loaded["case_id"] == "c0"


def test_float64_masks_with_undefined_slope_are_read_as_uint8(tmp_path, dataset):
    path, arrays = dataset
    label = arrays["c0"][1][0].astype(np.float64)
    img = nib.Nifti1Image(label, AFFINE)
    img.header["scl_slope"] = np.nan
    nib.save(img, _case(path).labels[0])
    out = load_case(_case(path), num_classes=3, spatial_dims=3)["raters"]
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out[0].numpy(), arrays["c0"][1][0])


def test_affine_within_tolerance_is_accepted(dataset):
    path, arrays = dataset
    nudged = AFFINE.copy()
    nudged[0, 3] += 0.5 * data_io.AFFINE_ATOL_MM
    _save(arrays["c0"][1][1], _case(path).labels[1], affine=nudged)
    load_case(_case(path), num_classes=3, spatial_dims=3)


def _corrupt(kind: str, case):
    """Break case c0 in one way; returns (the case record to load, the text the error must contain)."""
    label = case.labels[1]
    if kind == "missing file":
        label.unlink()
        return case, rf"case 'c0': rater '2' label file .*{label.name} does not exist"
    if kind == "unreadable":
        case.image.write_bytes(b"this is not a NIfTI file")
        return case, rf"case 'c0': cannot read image file .*{case.image.name}"
    if kind == "truncated gz":
        data = gzip.decompress(label.read_bytes())
        label.write_bytes(gzip.compress(data)[:-40])
        return case, rf"case 'c0': cannot read rater '2' label file .*{label.name}"
    if kind == "truncated nii":
        raw = _save(np.asarray(nib.load(case.image).dataobj), case.image.with_name("c0.nii"))
        raw.write_bytes(raw.read_bytes()[:-200])
        return replace(case, image=raw), r"case 'c0': cannot read image file .*c0\.nii"
    if kind == "shape mismatch":
        _save(np.zeros((12, 10, 7), np.uint8), label)
        return case, rf"case 'c0': shape mismatch between image .*c0\.nii\.gz \(12, 10, 8\) and label .*{label.name}"
    if kind == "affine mismatch":
        moved = AFFINE.copy()
        moved[1, 3] += 1.0
        _save(np.zeros(SHAPE, np.uint8), label, affine=moved)
        return case, (rf"case 'c0': label .*{label.name} is not on the grid of image .*c0\.nii\.gz: their affines "
                      r"differ by up to 1 mm")
    if kind == "label out of range":
        bad = np.zeros(SHAPE, np.uint8)
        bad[0, 0, 0] = 3
        bad[1, 0, 0] = 7
        _save(bad, label)
        return case, rf"case 'c0': rater '2' label .*{label.name} has values \[3, 7\] outside the declared classes 0..2"
    if kind == "non-integer label":
        _save(np.full(SHAPE, 0.5, np.float32), label)
        return case, rf"case 'c0': label file .*{label.name}: non-integer values"
    if kind == "nan intensity":
        image = np.zeros(SHAPE, np.float32)
        image[3, 3, 3] = np.nan
        image[4, 4, 4] = np.inf
        _save(image, case.image)
        return case, r"case 'c0': image .*c0\.nii\.gz contains 2 NaN/inf value"
    raise AssertionError(kind)


BAD_INPUTS = ["missing file", "unreadable", "truncated gz", "truncated nii", "shape mismatch", "affine mismatch",
              "label out of range", "non-integer label", "nan intensity"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_raises_naming_the_case_and_writes_no_cache_entry(dataset, tmp_path, kind):
    path, _ = dataset
    case, expected = _corrupt(kind, _case(path))
    cases = PreprocessedCases(3, 3, PreprocessSettings(), tmp_path / "cache")
    with pytest.raises(ValueError, match=expected):
        cases(case)
    assert not list((tmp_path / "cache").rglob("*.pt"))


def test_cache_hits_skip_nifti_decoding(dataset, tmp_path, monkeypatch):
    path, _ = dataset
    case = _case(path)
    cases = PreprocessedCases(3, 3, PreprocessSettings(spacing=(1.6, 1.6, 2.5)), tmp_path / "cache")
    first = cases(case)
    assert (cases.hits, cases.misses) == (0, 1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("NIfTI decoded although the case is cached")

    monkeypatch.setattr(data_io, "load_case", no_decoding)
    again = PreprocessedCases(3, 3, PreprocessSettings(spacing=(1.6, 1.6, 2.5)), tmp_path / "cache")
    second = again(case)
    assert (again.hits, again.misses) == (1, 0)
    torch.testing.assert_close(second["image"].as_tensor(), first["image"].as_tensor())
    torch.testing.assert_close(second["raters"], first["raters"])
    np.testing.assert_allclose(np.asarray(second["image"].affine), np.asarray(first["image"].affine))
    np.testing.assert_array_equal(second["image"].meta["spatial_shape"], SHAPE)


def test_cache_is_keyed_by_settings_and_source_files(dataset, tmp_path):
    path, arrays = dataset
    case = _case(path)
    cache = tmp_path / "cache"
    base = PreprocessedCases(3, 3, PreprocessSettings(window=(-200, 300)), cache)
    base(case)
    other = PreprocessedCases(3, 3, PreprocessSettings(window=(-60, 140)), cache)
    other(case)
    assert other.misses == 1 and len(list(cache.glob("*/settings.json"))) == 2
    # replacing a rater file invalidates the entry
    changed = arrays["c0"][1][0].copy()
    changed[:] = 0
    _save(changed, case.labels[0])
    fresh = PreprocessedCases(3, 3, PreprocessSettings(window=(-200, 300)), cache)
    out = fresh(case)
    assert fresh.misses == 1 and int(out["raters"][0].max()) == 0


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "empty"])
def test_corrupt_or_partial_cache_entry_is_rebuilt(dataset, tmp_path, damage):
    path, _ = dataset
    case = _case(path)
    cases = PreprocessedCases(3, 3, PreprocessSettings(), tmp_path / "cache")
    good = cases(case)
    (entry,) = list((tmp_path / "cache").rglob("*.pt"))
    data = bytearray(entry.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    entry.write_bytes(bytes(data))
    again = PreprocessedCases(3, 3, PreprocessSettings(), tmp_path / "cache")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = again(case)
    assert again.misses == 1
    torch.testing.assert_close(rebuilt["image"].as_tensor(), good["image"].as_tensor())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = PreprocessedCases(3, 3, PreprocessSettings(), tmp_path / "cache")
        third(case)
    assert third.hits == 1

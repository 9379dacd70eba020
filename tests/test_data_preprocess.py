"""Preprocessing against independent references (nibabel reorientation, SimpleITK resampling, closed forms)
and the round trip back to the original grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor, list_data_collate

from medjdt.data import PreprocessSettings, preprocess_case, read_image, restore_original_grid, write_nifti
from medjdt.data.cache import from_payload, to_payload

# Slice axis first and flipped in-plane axes, like KiTS files: not RAS, anisotropic.
AFFINE = np.array([[0.0, 0.0, -0.75, 40.0], [0.0, -0.75, 0.0, 30.0], [-2.5, 0.0, 0.0, 60.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (10, 24, 20)


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(1)
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    hu = (40 * np.sin(x / 3.0) + 30 * np.cos(y / 4.0) + 20 * z + rng.normal(0, 5, SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[2:8, 6:18, 4:16] = 1
    label[4:6, 10:14, 8:12] = 2
    image_path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(hu, AFFINE), image_path)
    image = read_image(image_path, case_id="c", spatial_dims=3)
    raters = MetaTensor(torch.from_numpy(np.stack([label, np.roll(label, 1, axis=2)])), affine=image.affine)
    return {"image": image, "raters": raters, "case_id": "c", "rater_names": ["1", "2"]}, image_path, hu, label


def _to_sitk_grid(affine: np.ndarray, shape) -> dict:
    """SimpleITK (LPS) grid parameters of a RAS NIfTI affine."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return {"size": [int(s) for s in shape], "outputOrigin": lps[:3, 3].tolist(), "outputSpacing": spacing.tolist(),
            "outputDirection": direction.flatten().tolist()}


def test_orientation_matches_nibabel_canonical(case):
    data, image_path, hu, _ = case
    out = preprocess_case(data, PreprocessSettings(orientation="RAS", intensity="ct", window=(-1e4, 1e4)), 3)
    canonical = nib.as_closest_canonical(nib.load(image_path))
    np.testing.assert_allclose(np.asarray(out["image"].affine), canonical.affine, atol=1e-5)
    expected = (canonical.get_fdata() + 1e4) / 2e4
    np.testing.assert_allclose(out["image"][0].numpy(), expected, atol=1e-6)
    assert out["original_shape"] == list(SHAPE)
    np.testing.assert_allclose(out["original_affine"].numpy(), AFFINE)


def test_resampling_matches_simpleitk(case):
    data, image_path, _, label = case
    settings = PreprocessSettings(orientation="RAS", spacing=(1.5, 1.5, 2.0), intensity="ct", window=(-1e4, 1e4))
    out = preprocess_case(data, settings, 3)
    affine = np.asarray(out["image"].affine)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.5, 1.5, 2.0], atol=1e-6)
    grid = _to_sitk_grid(affine, out["image"].shape[1:])

    source = sitk.ReadImage(str(image_path))
    ref = sitk.Resample(source, transform=sitk.Transform(), interpolator=sitk.sitkLinear, **grid)
    ref_image = (sitk.GetArrayFromImage(ref).transpose(2, 1, 0) + 1e4) / 2e4
    mine = out["image"][0].numpy()
    inner = (slice(1, -1),) * 3  # border voxels depend on each library's padding rule
    np.testing.assert_allclose(mine[inner], ref_image[inner], atol=2e-5)

    label_img = sitk.GetImageFromArray(label.transpose(2, 1, 0))
    label_img.CopyInformation(source)
    ref_label = sitk.Resample(label_img, transform=sitk.Transform(), interpolator=sitk.sitkNearestNeighbor, **grid)
    np.testing.assert_array_equal(out["raters"][0].numpy(), sitk.GetArrayFromImage(ref_label).transpose(2, 1, 0))
    assert out["raters"].dtype == torch.uint8


def test_ct_window_and_zscore(case):
    data, _, hu, _ = case
    out = preprocess_case(data, PreprocessSettings(orientation=None, intensity="ct", window=(-60, 140)), 3)
    np.testing.assert_allclose(out["image"][0].numpy(), np.clip((hu + 60) / 200, 0, 1), atol=1e-6)
    z = preprocess_case(data, PreprocessSettings(orientation=None, intensity="zscore"), 3)["image"][0].numpy()
    np.testing.assert_allclose(z, (hu - hu.mean()) / hu.std(), atol=1e-4)


def test_settings_validation():
    with pytest.raises(ValueError, match="intensity must be one of"):
        PreprocessSettings(intensity="mri")
    with pytest.raises(ValueError, match="low < high"):
        PreprocessSettings(window=(300, -200))
    with pytest.raises(ValueError, match="spacing must be a finite number > 0"):
        PreprocessSettings(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="must have 2 values for 2D"):
        PreprocessSettings(spacing=(1.0, 1.0, 1.0)).check_dims(2)


def _as_batch(pre: dict) -> MetaTensor:
    """The image the way a val/predict batch delivers it: cached, then collated to (1, K, *spatial)."""
    return list_data_collate([{"image": from_payload(to_payload(pre))["image"]}])["image"]


def test_restore_original_grid_inverts_reorientation_exactly(case, tmp_path):
    data, image_path, hu, _ = case
    pre = preprocess_case(data, PreprocessSettings(orientation="RAS", intensity="ct", window=(-1e4, 1e4)), 3)
    batch_image = _as_batch(pre)
    assert batch_image.shape[:2] == (1, 1) and batch_image.is_batch
    restored, affine = restore_original_grid(batch_image.as_tensor(), batch_image)
    np.testing.assert_allclose(restored[0], (hu.astype(np.float64) + 1e4) / 2e4, atol=1e-6)
    np.testing.assert_allclose(affine, AFFINE)
    # item access on the batch (as prediction writers do) gives the same answer
    restored_item, _ = restore_original_grid(batch_image[0].as_tensor(), batch_image[0])
    np.testing.assert_allclose(restored_item, restored)


def test_restore_original_grid_round_trip_through_a_written_file(case, tmp_path):
    data, image_path, _, label = case
    pre = preprocess_case(data, PreprocessSettings(orientation="RAS", spacing=(1.5, 1.5, 2.0)), 3)
    batch_image = _as_batch(pre)
    onehot = torch.nn.functional.one_hot(pre["raters"][0].long(), 3).permute(3, 0, 1, 2).float()[None]
    probs, affine = restore_original_grid(onehot, batch_image)
    assert probs.shape == (3, *SHAPE)
    out = write_nifti(np.moveaxis(probs, 0, -1), affine, tmp_path / "pred.nii.gz")
    reloaded, original = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_path))
    assert reloaded.GetSize()[:3] == original.GetSize()
    np.testing.assert_allclose(reloaded.GetSpacing()[:3], original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(reloaded.GetOrigin()[:3], original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(reloaded.GetDirection()).reshape(4, 4)[:3, :3],
                               np.asarray(original.GetDirection()).reshape(3, 3), atol=1e-6)
    np.testing.assert_allclose(nib.load(out).affine, nib.load(image_path).affine, atol=1e-4)
    # SimpleITK reference: linear resampling of each one-hot channel from the preprocessed grid back
    source = sitk.GetImageFromArray(np.zeros(onehot.shape[2:][::-1], np.float32))
    grid = _to_sitk_grid(np.asarray(pre["image"].affine), onehot.shape[2:])
    source.SetOrigin(grid["outputOrigin"])
    source.SetSpacing(grid["outputSpacing"])
    source.SetDirection(grid["outputDirection"])
    back = _to_sitk_grid(AFFINE, SHAPE)
    ref = []
    for channel in onehot[0].numpy():
        src = sitk.GetImageFromArray(channel.transpose(2, 1, 0))
        src.CopyInformation(source)
        out_c = sitk.Resample(src, transform=sitk.Transform(), interpolator=sitk.sitkLinear, **back)
        ref.append(sitk.GetArrayFromImage(out_c).transpose(2, 1, 0))
    ref = np.stack(ref)
    inner = (slice(None),) + (slice(1, -1),) * 3
    np.testing.assert_allclose(probs[inner], ref[inner], atol=1e-4)
    assert (probs.argmax(0) == label).mean() > 0.9  # and it is still the label, up to boundary voxels


def test_restore_original_grid_rejects_mismatched_prediction(case):
    data, _, _, _ = case
    pre = preprocess_case(data, PreprocessSettings(), 3)
    batch_image = _as_batch(pre)
    with pytest.raises(ValueError, match="does not match the image grid"):
        restore_original_grid(torch.zeros(3, 5, 5, 5), batch_image)
    with pytest.raises(ValueError, match="must be a MetaTensor"):
        restore_original_grid(torch.zeros(3, *SHAPE), torch.zeros(1, *SHAPE))

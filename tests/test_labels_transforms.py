"""Tests for the MONAI dictionary transforms FuseRatersd and SmoothLabelsd."""

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandAffined, RandFlipd

from medjdt.labels import FuseRatersd, SmoothLabelsd, fuse, smooth_labels


def _raters(num_raters=3, shape=(8, 9, 10), num_classes=3, seed=0):
    """(R, *spatial) float MetaTensor: nested boxes of classes 1, 2 with 10% of voxels relabelled at random."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.int64)
    truth[2:-2, 2:-2, 2:-2] = 1
    truth[3:-3, 3:-3, 3:-3] = 2
    noise = rng.integers(0, num_classes, (num_raters, *shape))
    labels = np.where(rng.random((num_raters, *shape)) < 0.1, noise, truth[None])
    return MetaTensor(torch.from_numpy(labels).float(), affine=torch.diag(torch.tensor([2.0, 1.5, 1.0, 1.0])))


def test_pipeline_from_nifti_with_joint_augmentation(tmp_path):
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.random((12, 11, 10)).astype(np.float32), affine), tmp_path / "image.nii.gz")
    rater_files = []
    for r in range(3):
        rater_files.append(tmp_path / f"rater{r}.nii.gz")
        nib.save(nib.Nifti1Image(rng.integers(0, 3, (12, 11, 10)).astype(np.uint8), affine), rater_files[-1])
    keys = ["image", "raters"]
    pipeline = Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            RandFlipd(keys=keys, prob=1.0, spatial_axis=0),
            RandAffined(keys=keys, prob=1.0, rotate_range=0.3, mode=("bilinear", "nearest")),
            FuseRatersd(method="mean", num_classes=3),
            SmoothLabelsd(epsilon=0.1),
        ]
    ).set_random_state(seed=0)
    out = pipeline({"image": str(tmp_path / "image.nii.gz"), "raters": [str(f) for f in rater_files]})

    label, raters = out["label"], out["raters"]
    assert isinstance(label, MetaTensor) and label.dtype == torch.float32
    assert label.shape == (3, 12, 11, 10) and raters.shape == (3, 12, 11, 10)
    torch.testing.assert_close(label.affine, raters.affine)
    torch.testing.assert_close(label.affine, out["image"].affine)
    expected = smooth_labels(fuse(raters, "mean", 3)[None], 0.1)[0]
    torch.testing.assert_close(label.as_tensor(), expected)
    torch.testing.assert_close(label.as_tensor().sum(0), torch.ones(12, 11, 10))


@pytest.mark.parametrize("method", ["mean", "weighted", "majority", "staple"])
def test_fuse_ratersd_equals_fuse_and_keeps_raters(method):
    raters = _raters()
    out = FuseRatersd(method=method, num_classes=3, output_key="target")({"raters": raters, "other": 1})
    assert out["raters"] is raters and out["other"] == 1
    assert isinstance(out["target"], MetaTensor)
    torch.testing.assert_close(out["target"].as_tensor(), fuse(raters, method, 3))
    torch.testing.assert_close(out["target"].affine, raters.affine)


def test_fuse_ratersd_plain_inputs_give_plain_tensors():
    labels = np.random.default_rng(2).integers(0, 2, (4, 6, 7)).astype(np.uint8)
    for raters in (labels, torch.from_numpy(labels)):
        out = FuseRatersd(num_classes=2)({"raters": raters})
        assert type(out["label"]) is torch.Tensor and out["label"].shape == (2, 6, 7)
        torch.testing.assert_close(out["label"], fuse(labels, "mean", 2))


def test_fuse_ratersd_random_reproducible_and_redrawn():
    num_raters = 5
    raters = MetaTensor(torch.arange(num_raters, dtype=torch.float32)[:, None, None].expand(num_raters, 3, 4))

    def draws(transform, n):
        # Rater r is constant r, so the chosen rater is the argmax of the one-hot target.
        return [int(transform({"raters": raters})["label"][:, 0, 0].argmax()) for _ in range(n)]

    first = draws(FuseRatersd(method="random", num_classes=num_raters, seed=42), 200)
    again = draws(FuseRatersd(method="random", num_classes=num_raters, seed=42), 200)
    assert first == again
    assert set(first) == set(range(num_raters))  # a new draw on every call

    transform = FuseRatersd(method="random", num_classes=num_raters)
    pipeline = Compose([transform])
    pipeline.set_random_state(seed=7)
    seeded = draws(pipeline, 50)
    pipeline.set_random_state(seed=7)
    assert draws(pipeline, 50) == seeded
    assert draws(FuseRatersd(method="random", num_classes=num_raters, seed=8), 50) != seeded


def test_fuse_ratersd_survives_pickling_with_its_random_state():
    # Data-loader workers started with "spawn" receive pickled transforms.
    raters = _raters(num_raters=6, seed=5)
    transform = FuseRatersd(method="random", num_classes=3, seed=3)
    clone = pickle.loads(pickle.dumps(transform))
    for _ in range(10):
        torch.testing.assert_close(clone({"raters": raters})["label"], transform({"raters": raters})["label"])


def test_fuse_ratersd_weights_and_missing_keys():
    raters = _raters(seed=3)
    out = FuseRatersd(method="weighted", num_classes=3, weights=[0, 1, 0])({"raters": raters})
    torch.testing.assert_close(out["label"].as_tensor(), fuse(raters[1:2], "mean", 3))
    assert FuseRatersd(num_classes=3, allow_missing_keys=True)({"image": 1}) == {"image": 1}
    with pytest.raises(KeyError):
        FuseRatersd(num_classes=3)({"image": 1})


def test_fuse_ratersd_bad_arguments_raise():
    with pytest.raises(ValueError, match="exactly one"):
        FuseRatersd(keys=["a", "b"], num_classes=2)
    with pytest.raises(ValueError, match="must differ"):
        FuseRatersd(keys="label", num_classes=2)
    with pytest.raises(ValueError, match="FuseRatersd: method must be one of"):
        FuseRatersd(method="vote", num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        FuseRatersd(num_classes=1)
    with pytest.raises(ValueError, match="weights only apply"):
        FuseRatersd(num_classes=2, weights=[1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        FuseRatersd(method="weighted", num_classes=2, weights=[1, -2])
    with pytest.raises(ValueError, match=r"raters\[0\] contains non-integer value"):
        FuseRatersd(num_classes=3)({"raters": _raters() + 0.5})


@pytest.mark.parametrize("mode", ["uniform", "boundary"])
def test_smooth_labelsd_equals_smooth_labels(mode):
    target = FuseRatersd(method="majority", num_classes=3)({"raters": _raters(seed=4)})["label"]
    out = SmoothLabelsd(epsilon=0.2, mode=mode, kernel_size=3)({"label": target})["label"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == target.shape
    torch.testing.assert_close(out.affine, target.affine)
    torch.testing.assert_close(out.as_tensor(), smooth_labels(target.as_tensor()[None], 0.2, mode)[0])


def test_smooth_labelsd_bad_input_raises():
    with pytest.raises(ValueError, match="epsilon"):
        SmoothLabelsd(epsilon=1.2)
    with pytest.raises(ValueError, match="kernel_size"):
        SmoothLabelsd(mode="boundary", kernel_size=2)
    with pytest.raises(ValueError, match="label smoothing: mode must be one of"):
        SmoothLabelsd(mode="edges")
    with pytest.raises(ValueError, match="floating soft target"):
        SmoothLabelsd()({"label": torch.zeros(2, 4, 4, dtype=torch.long)})

"""KiTS challenge scoring against numpy/SimpleITK Dice, MONAI on uncropped volumes, and closed-form surface cases."""

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_surface_dice

from medjdt.metrics.kits import (
    KITS_REGIONS,
    KITS_TOLERANCES_MM,
    kits_region_masks,
    kits_region_scores,
    kits_scores,
)

# Region memberships written out independently of KITS_REGIONS.
_MEMBERS = {
    "kidney_and_mass": lambda x: (x == 1) | (x == 2) | (x == 3),
    "mass": lambda x: (x == 2) | (x == 3),
    "tumor": lambda x: x == 2,
}
_KEYS = [f"kits_dice/{r}" for r in _MEMBERS] + [f"kits_sd/{r}" for r in _MEMBERS] + ["kits_dice", "kits_sd"]


def _np_dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def _hand_made_case():
    """Reference: a kidney holding a tumour and a cyst, a second cyst outside it; prediction: shifted and noisy."""
    ref = np.zeros((20, 24, 22), dtype=np.int16)
    ref[3:15, 4:16, 5:17] = 1  # kidney
    ref[6:10, 7:11, 8:12] = 2  # tumour inside the kidney
    ref[12:14, 13:15, 14:16] = 3  # cyst inside the kidney
    ref[16:19, 18:22, 2:6] = 3  # cyst elsewhere
    pred = np.zeros_like(ref)
    pred[4:15, 4:17, 5:16] = 1
    pred[7:11, 7:11, 8:13] = 2
    pred[9:11, 7:9, 8:10] = 3  # part of the reference tumour predicted as cyst
    pred[16:19, 17:21, 2:5] = 3
    pred[1:3, 1:3, 18:20] = 2  # a stray tumour voxel cluster outside everything
    return pred, ref


def _noisy_case(seed, shape=(18, 20, 16)):
    """Random blocky label maps: reference boxes, prediction with 10% of voxels relabelled at random."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, dtype=np.int32)
    for label, count in ((1, 2), (2, 2), (3, 2)):
        for _ in range(count):
            lo = rng.integers(0, np.array(shape) - 4)
            hi = lo + rng.integers(2, 8, size=3)
            ref[tuple(slice(a, b) for a, b in zip(lo, hi))] = label
    pred = ref.copy()
    flip = rng.random(shape) < 0.1
    pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
    return pred, ref


def _monai_sd_uncropped(pred_mask, ref_mask, spacing, tol):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_surface_dice(
            torch.from_numpy(pred_mask)[None, None],
            torch.from_numpy(ref_mask)[None, None],
            class_thresholds=[tol],
            include_background=True,
            spacing=list(spacing),
            use_subvoxels=True,
        ).item()


def test_constants():
    assert KITS_REGIONS == {"kidney_and_mass": (1, 2, 3), "mass": (2, 3), "tumor": (2,)}
    assert KITS_TOLERANCES_MM == {
        "kidney_and_mass": 1.0330772532390826,
        "mass": 1.1328796488598762,
        "tumor": 1.1498198361434828,
    }


@pytest.mark.parametrize("region", list(_MEMBERS))
def test_region_masks_numpy_and_torch(region):
    labels = np.arange(5 * 4 * 3).reshape(5, 4, 3) % 4
    expected = _MEMBERS[region](labels)
    got = kits_region_masks(labels.astype(np.uint8), region)
    assert isinstance(got, np.ndarray) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, expected)
    got_t = kits_region_masks(torch.from_numpy(labels), region)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.bool
    np.testing.assert_array_equal(got_t.numpy(), expected)


@pytest.mark.parametrize("case", ["hand_made", 0, 1, 2])
def test_dice_matches_numpy(case):
    pred, ref = _hand_made_case() if case == "hand_made" else _noisy_case(case)
    scores = kits_scores(pred, ref, (1.5, 0.8, 0.8))
    assert list(scores) == _KEYS
    for region, members in _MEMBERS.items():
        assert scores[f"kits_dice/{region}"] == pytest.approx(_np_dice(members(pred), members(ref)), abs=1e-12)
    for metric in ("kits_dice", "kits_sd"):
        assert scores[metric] == pytest.approx(np.mean([scores[f"{metric}/{r}"] for r in _MEMBERS]), abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_dice_matches_simpleitk():
    pred, ref = _hand_made_case()
    scores = kits_scores(pred, ref, (1.0, 1.0, 1.0))
    for region, members in _MEMBERS.items():
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(
            sitk.GetImageFromArray(members(ref).astype(np.uint8)),
            sitk.GetImageFromArray(members(pred).astype(np.uint8)),
        )
        assert scores[f"kits_dice/{region}"] == pytest.approx(overlap.GetDiceCoefficient(1), abs=1e-9)


def test_hierarchy_cyst_predicted_for_tumor():
    ref = np.zeros((16, 16, 16), dtype=np.int64)
    ref[2:14, 2:14, 2:14] = 1
    ref[5:11, 5:11, 5:9] = 2  # 6 x 6 x 4 tumour
    pred = ref.copy()
    pred[5:11, 5:11, 5:7] = 3  # half of the tumour predicted as cyst
    scores = kits_scores(pred, ref, (0.8, 0.8, 0.8))
    assert scores["kits_dice/kidney_and_mass"] == 1.0 and scores["kits_sd/kidney_and_mass"] == pytest.approx(1.0)
    assert scores["kits_dice/mass"] == 1.0 and scores["kits_sd/mass"] == pytest.approx(1.0)
    # tumour: |A| = 72, |B| = 144, |A∩B| = 72
    assert scores["kits_dice/tumor"] == pytest.approx(2 * 72 / (72 + 144))
    assert scores["kits_sd/tumor"] < 1.0

    pred[5:11, 5:11, 5:9] = 3  # the whole tumour predicted as cyst: tumour only in the reference
    scores = kits_scores(pred, ref, (0.8, 0.8, 0.8))
    assert scores["kits_dice/mass"] == 1.0 and scores["kits_sd/mass"] == pytest.approx(1.0)
    assert scores["kits_dice/tumor"] == 0.0 and scores["kits_sd/tumor"] == 0.0


def test_empty_rules():
    kidney = np.zeros((12, 12, 12), dtype=np.uint8)
    kidney[2:10, 2:10, 2:10] = 1
    # no mass anywhere: mass and tumour are perfect, whatever the kidney
    shifted = np.roll(kidney, 1, axis=0)
    scores = kits_scores(shifted, kidney, (1.0, 1.0, 1.0))
    for region in ("mass", "tumor"):
        assert scores[f"kits_dice/{region}"] == 1.0 and scores[f"kits_sd/{region}"] == 1.0
    assert scores["kits_dice/kidney_and_mass"] == pytest.approx(7 / 8)
    assert scores["kits_dice"] == pytest.approx((7 / 8 + 2) / 3)
    # tumour only in the prediction: mass and tumour score 0
    pred = kidney.copy()
    pred[4:6, 4:6, 4:6] = 2
    scores = kits_scores(pred, kidney, (1.0, 1.0, 1.0))
    for region in ("mass", "tumor"):
        assert scores[f"kits_dice/{region}"] == 0.0 and scores[f"kits_sd/{region}"] == 0.0
    assert scores["kits_dice/kidney_and_mass"] == 1.0
    # tumour only in the reference
    scores = kits_scores(kidney, pred, (1.0, 1.0, 1.0))
    assert scores["kits_dice/tumor"] == 0.0 and scores["kits_sd/tumor"] == 0.0
    # all background in both: everything perfect; in only one: everything 0
    empty = np.zeros_like(kidney)
    assert all(v == 1.0 for v in kits_scores(empty, empty, (1.0, 1.0, 1.0)).values())
    assert all(v == 0.0 for v in kits_scores(empty, pred, (1.0, 1.0, 1.0)).values())
    assert kits_region_scores(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (1, 1, 1), 0.0) == (1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_maps_score_one(seed):
    _, ref = _noisy_case(seed)
    scores = kits_scores(ref, ref.copy(), (3.0, 0.8, 0.7))
    for key, value in scores.items():
        assert value == pytest.approx(1.0, abs=1e-6), key


def test_anisotropic_shift_closed_form():
    """A 6 x 10 x 10 kidney box at spacing (3.0, 0.8, 0.8), shifted by one voxel along one axis.

    Every surface point moves by exactly one voxel, so each lies within one spacing of the other surface: along
    axis 1 (0.8 mm <= 1.033 mm) every surfel is within tolerance; along axis 0 (3 mm > 1.033 mm) the centre of
    the face perpendicular to the shift is 3 mm from the other surface, so the surface Dice drops below 1.
    """
    spacing = (3.0, 0.8, 0.8)
    ref = np.zeros((14, 20, 20), dtype=np.uint8)
    ref[4:10, 5:15, 5:15] = 1
    along_1 = kits_scores(np.roll(ref, 1, axis=1), ref, spacing)
    assert along_1["kits_dice/kidney_and_mass"] == pytest.approx(9 / 10)  # overlap 9 of 10 slices
    assert along_1["kits_sd/kidney_and_mass"] == pytest.approx(1.0, abs=1e-6)
    along_0 = kits_scores(np.roll(ref, 1, axis=0), ref, spacing)
    assert along_0["kits_dice/kidney_and_mass"] == pytest.approx(5 / 6)
    assert along_0["kits_sd/kidney_and_mass"] < 0.9
    # the same shift with the spacing of axes 0 and 1 swapped: now 0.8 mm, within tolerance
    assert kits_scores(np.roll(ref, 1, axis=0), ref, (0.8, 3.0, 0.8))["kits_sd/kidney_and_mass"] == pytest.approx(1.0)
    # no mass in either map
    assert along_0["kits_sd/mass"] == along_0["kits_sd/tumor"] == 1.0


@pytest.mark.parametrize(("axis", "k", "s"), [(0, 1, 3.0), (1, 2, 0.75), (2, 3, 1.25), (0, 2, 2.5)])
def test_tolerances_are_in_mm(axis, k, s):
    """Two plates (4 voxels thick along ``axis``, 24 x 24 wide) displaced by k voxels of s mm along ``axis``.

    Every surface point of one plate has a point of the other's surface exactly k*s mm away along ``axis``, so the
    surface Dice is 1 at tolerance k*s. Just below it, both wide faces of each plate (most of the surface) are
    k*s mm from the other plate's surface except within the tolerance of its rim, so the score drops well below 1.
    The spacings are exact in float32, so the tie at tolerance == k*s is exact.
    """
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = s
    shape, lo, hi = [30, 30, 30], [3, 3, 3], [27, 27, 27]
    lo[axis], hi[axis] = 4, 8
    plate = _box(tuple(shape), lo, hi)
    moved = np.roll(plate, k, axis=axis)
    for tol, check in ((k * s, lambda v: v == pytest.approx(1.0, abs=1e-6)), (0.99 * k * s, lambda v: v < 0.75)):
        dice, sd = kits_region_scores(moved, plate, spacing, tol)
        assert check(sd), (tol, sd)
        assert check(_monai_sd_uncropped(moved, plate, spacing, tol))
        assert dice == pytest.approx(_np_dice(moved, plate))
    # the tolerance is not in voxels: one voxel of tolerance is too little when k*s > 1 mm, enough when < 1 mm
    _, sd_one = kits_region_scores(moved, plate, spacing, 1.0)
    assert (sd_one == pytest.approx(1.0, abs=1e-6)) == (k * s <= 1.0)


@pytest.mark.parametrize("case", ["hand_made", 3, "border"])
def test_cropping_does_not_change_the_result(case):
    if case == "border":  # regions touching the faces of the volume
        pred, ref = _noisy_case(4, shape=(10, 12, 9))
        ref[0, :, :4] = 2
        pred[:, -1, -2:] = 3
    else:
        pred, ref = _hand_made_case() if case == "hand_made" else _noisy_case(case)
    spacing = (2.5, 0.7, 0.9)
    scores = kits_scores(pred, ref, spacing)
    for region, members in _MEMBERS.items():
        a, b = members(pred), members(ref)
        expected = _monai_sd_uncropped(a, b, spacing, KITS_TOLERANCES_MM[region])
        assert scores[f"kits_sd/{region}"] == pytest.approx(expected, abs=1e-6), region
    # embedding the case in a larger background volume changes nothing either
    big_pred, big_ref = (np.pad(x, ((5, 2), (0, 7), (3, 3))) for x in (pred, ref))
    assert kits_scores(big_pred, big_ref, spacing) == pytest.approx(scores, abs=1e-6)


def test_axis_order_follows_spacing():
    pred, ref = _hand_made_case()
    spacing = (2.5, 0.7, 0.9)
    order = (2, 0, 1)
    scores = kits_scores(pred, ref, spacing)
    permuted = kits_scores(pred.transpose(order), ref.transpose(order), tuple(spacing[i] for i in order))
    assert permuted == pytest.approx(scores, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_torch_inputs_match_numpy(dtype):
    pred, ref = _hand_made_case()
    expected = kits_scores(pred, ref, (1.5, 0.8, 0.8))
    got = kits_scores(
        torch.from_numpy(pred).to(dtype),
        torch.from_numpy(ref).to(dtype),
        torch.tensor([1.5, 0.8, 0.8], dtype=torch.float64),
    )
    assert got == pytest.approx(expected, abs=1e-12)


def _valid():
    return np.zeros((4, 5, 6), dtype=np.int64), np.zeros((4, 5, 6), dtype=np.int64)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p, r: (p, r[:, :, :5], (1, 1, 1)), r"shape \(4, 5, 6\) does not match reference shape \(4, 5, 5\)"),
        (lambda p, r: (p[0], r[0], (1, 1, 1)), r"prediction must be 3-D \(X, Y, Z\), got shape \(5, 6\)"),
        (lambda p, r: (p[None], r[None], (1, 1, 1)), r"got shape \(1, 4, 5, 6\)"),
        (lambda p, r: (p.astype(np.float32), r, (1, 1, 1)), "prediction must be an integer label map.*float32"),
        (lambda p, r: (p, r.astype(bool), (1, 1, 1)), "reference must be an integer label map.*bool"),
        (lambda p, r: (p, torch.zeros(4, 5, 6), (1, 1, 1)), "reference must be an integer label map.*float32"),
        (lambda p, r: (p.tolist(), r, (1, 1, 1)), "prediction must be a numpy array or torch tensor, got list"),
        (lambda p, r: (p[:0], r[:0], (1, 1, 1)), r"empty, shape \(0, 5, 6\)"),
        (lambda p, r: (p, r, (1, 1)), r"spacing must be 3 numbers in mm \(one per array axis\), got \(1, 1\)"),
        (lambda p, r: (p, r, (1, 0, 1)), r"spacing\[1\] must be a finite number > 0, got 0.0"),
        (lambda p, r: (p, r, (1, -2.0, 1)), r"spacing\[1\] must be a finite number > 0, got -2.0"),
        (lambda p, r: (p, r, (1, float("nan"), 1)), r"spacing\[1\] must be a finite number > 0, got nan"),
        (lambda p, r: (p, r, (1, float("inf"), 1)), r"spacing\[1\] must be a finite number > 0, got inf"),
        (lambda p, r: (p, r, "abc"), "spacing must be 3 positive numbers.*'abc'"),
    ],
)
def test_validation_errors(make, match):
    pred, ref, spacing = make(*_valid())
    with pytest.raises(ValueError, match=match):
        kits_scores(pred, ref, spacing)


def test_validation_names_bad_labels():
    pred, ref = _valid()
    pred[0, 0, :2] = (4, 7)
    with pytest.raises(ValueError, match=r"prediction holds labels \[4, 7\] outside the KiTS labels 0\.\.3"):
        kits_scores(pred, ref, (1, 1, 1))
    pred, ref = _valid()
    ref[1, 1, 1] = -1
    with pytest.raises(ValueError, match=r"reference holds labels \[-1\]"):
        kits_scores(pred, ref, (1, 1, 1))
    pred, ref = _valid()
    pred.flat[:20] = np.arange(10, 30)
    with pytest.raises(ValueError, match=r"\[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, \.\.\.\]"):
        kits_scores(pred, ref, (1, 1, 1))


def test_region_validation_errors():
    labels = np.zeros((3, 3, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="region must be one of.*'kidney'"):
        kits_region_masks(labels, "kidney")
    with pytest.raises(ValueError, match="labels must be an integer label map, got dtype float64"):
        kits_region_masks(labels.astype(float), "mass")
    mask = np.zeros((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="prediction_mask must be a bool mask, got dtype int64"):
        kits_region_scores(labels, mask, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match=r"does not match reference_mask shape \(3, 3, 2\)"):
        kits_region_scores(mask, mask[:, :, :2], (1, 1, 1), 1.0)
    for bad in (-0.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="tolerance_mm must be a finite number >= 0"):
            kits_region_scores(mask, mask, (1, 1, 1), bad)

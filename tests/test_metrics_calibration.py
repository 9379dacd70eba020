"""Calibration metrics against torchmetrics, MONAI, scikit-learn, numpy references and closed forms."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import CalibrationErrorMetric
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from medjdt.metrics import brier_score, expected_calibration_error, nll, reliability_bins


def _probs(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).softmax(1).to(dtype)


def _labels(shape, num_classes, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, num_classes, shape, generator=g)


def _one_hot(labels, num_classes):
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def numpy_calibration_error(confidence, accuracy, n_bins, norm="l1"):
    """Reference ECE with equal-width bins [k/M, (k+1)/M) and a closed last bin [(M-1)/M, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    accuracy = np.asarray(accuracy, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(confidence, edges[1:-1], right=False)  # number of inner edges <= value
    gaps, weights = [], []
    for k in range(n_bins):
        in_bin = bins == k
        if in_bin.any():
            gaps.append(abs(accuracy[in_bin].mean() - confidence[in_bin].mean()))
            weights.append(in_bin.mean())
    gaps, weights = np.array(gaps), np.array(weights)
    if norm == "l1":
        return float((weights * gaps).sum())
    if norm == "l2":
        return float(np.sqrt((weights * gaps**2).sum()))
    return float(gaps.max())


@pytest.mark.parametrize("spatial", [(12, 10), (6, 7, 8)])
def test_top_label_matches_torchmetrics_multiclass(spatial):
    probs = _probs((3, 4, *spatial), seed=1)
    labels = _labels((3, *spatial), 4, seed=1)
    ours = expected_calibration_error(probs, labels, n_bins=10)
    assert ours.shape == (3,)
    assert torch.all(probs.amax(1) < 1)  # the p = 1.0 edge is tested separately
    for b in range(3):
        reference = multiclass_calibration_error(probs[b].flatten(1).T, labels[b].flatten(), 4, n_bins=10, norm="l1")
        torch.testing.assert_close(ours[b], reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_binary_top_label_matches_torchmetrics_and_numpy(norm):
    g = torch.Generator().manual_seed(2)
    q = torch.rand(2, 1, 20, 20, generator=g)
    probs = torch.cat([1 - q, q], dim=1)
    labels = (torch.rand(2, 20, 20, generator=g) < q[:, 0]).long()
    ours = expected_calibration_error(probs, labels, n_bins=10, norm=norm)
    for b in range(2):
        confidence = probs[b].amax(0).flatten()
        correct = (probs[b].argmax(0) == labels[b]).flatten()
        reference = binary_calibration_error(confidence, correct.long(), n_bins=10, norm=norm)
        torch.testing.assert_close(ours[b], reference, atol=1e-6, rtol=0)
        assert ours[b].item() == pytest.approx(numpy_calibration_error(confidence, correct, 10, norm), abs=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_binary_classwise_foreground_matches_torchmetrics(norm):
    g = torch.Generator().manual_seed(3)
    q = torch.rand(2, 1, 16, 16, generator=g)
    probs = torch.cat([1 - q, q], dim=1)
    labels = (torch.rand(2, 16, 16, generator=g) < q[:, 0] ** 2).long()
    ours = expected_calibration_error(probs, labels, n_bins=15, kind="classwise", norm=norm)
    for b in range(2):
        reference = binary_calibration_error(q[b].flatten(), labels[b].flatten(), n_bins=15, norm=norm)
        torch.testing.assert_close(ours[b, 1], reference, atol=1e-6, rtol=0)


def test_confidence_one_lands_in_last_bin_closed_form():
    # Four voxels, top-label confidence [1.0, 1.0, 0.95, 0.95], correct [yes, no, yes, yes].
    # Ten bins, the last one closed [0.9, 1.0]: one bin with mean confidence 0.975 and accuracy 0.75 -> 0.225.
    q = torch.tensor([1.0, 1.0, 0.95, 0.95]).view(1, 1, 2, 2)
    probs = torch.cat([1 - q, q], dim=1)
    labels = torch.tensor([1, 0, 1, 1]).view(1, 2, 2)
    ours = expected_calibration_error(probs, labels, n_bins=10)
    assert ours.item() == pytest.approx(0.225, abs=1e-6)
    confidence, correct = q.flatten(), (labels.flatten() == 1)
    assert numpy_calibration_error(confidence, correct, 10) == pytest.approx(0.225, abs=1e-6)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins.count[0].tolist() == [0] * 9 + [4]
    # torchmetrics gives p == 1.0 a bin of its own ([0.9, 1.0) holds 0.95 with accuracy 1; {1.0} has accuracy 0.5):
    # 0.5 * 0.05 + 0.5 * 0.5 = 0.275. This is the documented difference at exactly p = 1.0.
    torchmetrics_value = binary_calibration_error(confidence, correct.long(), n_bins=10)
    assert torchmetrics_value.item() == pytest.approx(0.275, abs=1e-6)


def test_bin_edges_are_left_closed():
    # Classwise bins of exactly representable values: 0.0 -> bin 0, 0.25 -> bin 1, 0.5 -> bin 2, 1.0 -> bin 3.
    q = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2)
    probs = torch.cat([1 - q, q], dim=1)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    bins = reliability_bins(probs, labels, n_bins=4, kind="classwise")
    assert bins.count[0, 1].tolist() == [1, 1, 1, 1]
    assert bins.confidence[0, 1].tolist() == [0.0, 0.25, 0.5, 1.0]
    # Class 0 holds 1 - q = [1.0, 0.75, 0.5, 0.0]: 0.75 opens bin 3, 0.5 opens bin 2.
    assert bins.count[0, 0].tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize(("norm", "monai_reduction"), [("l1", "expected"), ("max", "maximum")])
def test_classwise_matches_monai(include_background, norm, monai_reduction):
    probs = _probs((2, 3, 10, 9, 8), seed=4)
    labels = _labels((2, 10, 9, 8), 3, seed=4)
    ours = expected_calibration_error(
        probs, labels, n_bins=10, kind="classwise", norm=norm, include_background=include_background
    )
    monai = CalibrationErrorMetric(
        num_bins=10,
        include_background=include_background,
        calibration_reduction=monai_reduction,
        metric_reduction="none",
    )
    reference = monai(probs, _one_hot(labels, 3))
    assert ours.shape == reference.shape == (2, 3 if include_background else 2)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_reliability_bins_match_numpy_histogram():
    probs = _probs((2, 3, 16, 16), seed=5)
    labels = _labels((2, 16, 16), 3, seed=5)
    bins = reliability_bins(probs, labels, n_bins=8)
    for b in range(2):
        confidence = probs[b].amax(0).flatten().double().numpy()
        correct = (probs[b].argmax(0) == labels[b]).flatten().double().numpy()
        count, _ = np.histogram(confidence, bins=8, range=(0, 1))
        conf_sum, _ = np.histogram(confidence, bins=8, range=(0, 1), weights=confidence)
        acc_sum, _ = np.histogram(confidence, bins=8, range=(0, 1), weights=correct)
        np.testing.assert_array_equal(bins.count[b].numpy(), count)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_allclose(bins.confidence[b].numpy(), conf_sum / count, atol=1e-6)
            np.testing.assert_allclose(bins.accuracy[b].numpy(), acc_sum / count, atol=1e-12)


def test_soft_reference_equal_to_prediction_is_perfectly_calibrated():
    target = _probs((2, 4, 12, 12, 6), seed=6, scale=1.5)
    probs = target.clone()
    assert expected_calibration_error(probs, target).abs().max() < 1e-6
    assert expected_calibration_error(probs, target, kind="classwise").abs().max() < 1e-6
    assert expected_calibration_error(probs, target, norm="max").abs().max() < 1e-6
    assert brier_score(probs, target).abs().max() < 1e-7


def test_soft_reference_accuracy_is_reference_probability_of_predicted_class():
    # Every voxel predicts (0.2, 0.8) against a rater distribution (0.3, 0.7):
    # top-label confidence 0.8, accuracy 0.7; classwise gaps are 0.1 for both classes.
    probs = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1).expand(2, 2, 5, 5).contiguous()
    target = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(2, 2, 5, 5).contiguous()
    torch.testing.assert_close(expected_calibration_error(probs, target), torch.full((2,), 0.1))
    torch.testing.assert_close(expected_calibration_error(probs, target, kind="classwise"), torch.full((2, 2), 0.1))


def test_one_hot_soft_reference_equals_hard_reference():
    probs = _probs((2, 3, 9, 9, 9), seed=7)
    labels = _labels((2, 9, 9, 9), 3, seed=7)
    soft = _one_hot(labels, 3)
    for kind in ("top_label", "classwise"):
        torch.testing.assert_close(
            expected_calibration_error(probs, soft, kind=kind), expected_calibration_error(probs, labels, kind=kind)
        )
    torch.testing.assert_close(brier_score(probs, soft), brier_score(probs, labels))
    torch.testing.assert_close(nll(probs, soft), nll(probs, labels))


def test_brier_matches_formula_and_sklearn_multiclass():
    probs = _probs((2, 4, 10, 10, 5), seed=8, dtype=torch.float64)
    labels = _labels((2, 10, 10, 5), 4, seed=8)
    ours = brier_score(probs, labels)
    formula = (probs - _one_hot(labels, 4).double()).square().sum(1).flatten(1).mean(1)
    torch.testing.assert_close(ours, formula)
    for b in range(2):
        reference = brier_score_loss(
            labels[b].flatten().numpy(), probs[b].flatten(1).T.numpy(), labels=[0, 1, 2, 3], scale_by_half=False
        )
        assert ours[b].item() == pytest.approx(reference, rel=1e-12)


def test_binary_brier_is_twice_sklearn_binary_form():
    g = torch.Generator().manual_seed(9)
    q = torch.rand(1, 1, 30, 30, generator=g, dtype=torch.float64)
    labels = (torch.rand(1, 30, 30, generator=g, dtype=torch.float64) < q[:, 0]).long()
    ours = brier_score(torch.cat([1 - q, q], dim=1), labels)
    y, p = labels.flatten().numpy(), q.flatten().numpy()
    assert ours.item() == pytest.approx(2 * brier_score_loss(y, p), rel=1e-12)
    assert ours.item() == pytest.approx(brier_score_loss(y, p, scale_by_half=False), rel=1e-12)


def test_nll_matches_sklearn_and_torch():
    probs = _probs((2, 3, 8, 8, 8), seed=10, scale=1.0, dtype=torch.float64)
    labels = _labels((2, 8, 8, 8), 3, seed=10)
    ours = nll(probs, labels)
    for b in range(2):
        reference = log_loss(labels[b].flatten().numpy(), probs[b].flatten(1).T.numpy(), labels=[0, 1, 2])
        assert ours[b].item() == pytest.approx(reference, rel=1e-10)
    torch_reference = F.nll_loss(probs.log(), labels, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(ours, torch_reference)


def test_nll_soft_reference_is_cross_entropy():
    probs = _probs((2, 3, 6, 6, 6), seed=11, dtype=torch.float64)
    target = _probs((2, 3, 6, 6, 6), seed=12, scale=0.7, dtype=torch.float64)
    reference = F.cross_entropy(probs.log(), target, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(nll(probs, target), reference)


def test_nll_of_zero_probability_is_finite():
    probs = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()
    labels = torch.ones(1, 2, 2, dtype=torch.long)
    assert nll(probs, labels, eps=1e-6).item() == pytest.approx(-np.log(1e-6), rel=1e-6)


def test_mask_excludes_voxels_everywhere():
    probs = _probs((2, 3, 10, 10, 4), seed=13)
    labels = _labels((2, 10, 10, 4), 3, seed=13)
    g = torch.Generator().manual_seed(13)
    mask = torch.rand(2, 10, 10, 4, generator=g) > 0.4
    # Excluded voxels may hold garbage: NaN probabilities and out-of-range labels must not matter.
    corrupted = probs.clone()
    corrupted[:, 0][~mask] = float("nan")
    bad_labels = labels.clone()
    bad_labels[~mask] = 99
    for b in range(2):
        # Reference: the kept voxels of image b alone, as a (1, C, n, 1) image.
        kept_probs = probs[b][:, mask[b]][None, :, :, None]
        kept_labels = labels[b][mask[b]][None, :, None]
        for kind in ("top_label", "classwise"):
            ours = expected_calibration_error(corrupted, bad_labels, kind=kind, mask=mask)[b]
            torch.testing.assert_close(ours, expected_calibration_error(kept_probs, kept_labels, kind=kind)[0])
        torch.testing.assert_close(
            brier_score(corrupted, bad_labels, mask=mask)[b], brier_score(kept_probs, kept_labels)[0]
        )
        torch.testing.assert_close(nll(corrupted, bad_labels, mask=mask)[b], nll(kept_probs, kept_labels)[0])
        ours_bins = reliability_bins(corrupted, bad_labels, mask=mask)
        torch.testing.assert_close(ours_bins.count[b], reliability_bins(kept_probs, kept_labels).count[0])


def test_fully_masked_image_gives_nan():
    probs = _probs((2, 2, 4, 4), seed=14)
    labels = _labels((2, 4, 4), 2, seed=14)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[1] = False
    for value in (expected_calibration_error(probs, labels, mask=mask), brier_score(probs, labels, mask=mask)):
        assert torch.isfinite(value[0]) and torch.isnan(value[1])


def test_half_precision_input_is_accepted():
    probs = _probs((1, 3, 8, 8, 8), seed=15)
    labels = _labels((1, 8, 8, 8), 3, seed=15)
    half = probs.half()  # rounding to half breaks the float32 sum-to-1 tolerance; the half tolerance applies
    ours = expected_calibration_error(half, labels)
    confidence = half.float().amax(1)
    correct = half.float().argmax(1) == labels
    assert ours.item() == pytest.approx(numpy_calibration_error(confidence, correct, 15), abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 5),
    scale=st.floats(0.1, 6.0),
    n_bins=st.integers(1, 20),
)
def test_calibration_properties(seed, num_classes, scale, n_bins):
    probs = _probs((2, num_classes, 6, 5, 4), seed=seed, scale=scale)
    labels = _labels((2, 6, 5, 4), num_classes, seed=seed)
    l1, l2, mx = (expected_calibration_error(probs, labels, n_bins=n_bins, norm=n) for n in ("l1", "l2", "max"))
    assert torch.all((l1 >= 0) & (l1 <= 1))
    # Jensen: the weighted mean gap <= weighted RMS gap <= largest gap.
    assert torch.all(l1 <= l2 + 1e-6) and torch.all(l2 <= mx + 1e-6)
    brier = brier_score(probs, labels)
    assert torch.all((brier >= 0) & (brier <= 2))
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    assert torch.all(bins.count.sum(-1) == 6 * 5 * 4)
    # One bin: ECE is |mean accuracy - mean confidence| over the whole image.
    if n_bins == 1:
        accuracy = (probs.argmax(1) == labels).double().flatten(1).mean(1)
        confidence = probs.amax(1).double().flatten(1).mean(1)
        torch.testing.assert_close(l1.double(), (accuracy - confidence).abs(), atol=1e-6, rtol=0)

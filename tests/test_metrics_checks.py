"""Bad input raises ValueError naming the problem, for every public entry point."""

import pytest
import torch

from medjdt.metrics import (
    CalibrationMetrics,
    OverlapMetrics,
    SegmentationMetrics,
    brier_score,
    dice,
    expected_calibration_error,
    iou,
    nll,
    reliability_bins,
    soft_dice,
    thresholded_dice,
)

ALL_FUNCTIONS = [expected_calibration_error, reliability_bins, brier_score, nll, dice, iou, soft_dice, thresholded_dice]
SIMPLEX_FUNCTIONS = [expected_calibration_error, reliability_bins, brier_score, nll]


def _valid(batch=2, num_classes=3, spatial=(4, 5, 6)):
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(batch, num_classes, *spatial, generator=g).softmax(1)
    labels = torch.randint(0, num_classes, (batch, *spatial), generator=g)
    return probs, labels


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_shape_mismatch(fn):
    probs, labels = _valid()
    with pytest.raises(ValueError, match=r"target shape \(2, 4, 5\) does not match probs shape"):
        fn(probs, labels[..., 0])
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        fn(probs.flatten(2), labels.flatten(1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fn(probs[:, :1], labels.clamp_max(0))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_nan_names_the_image(fn):
    probs, labels = _valid()
    probs[1, 0, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"probs contains NaN in image\(s\) 1"):
        fn(probs, labels)


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_values_outside_unit_interval(fn):
    probs, labels = _valid()
    logits = probs.log()
    with pytest.raises(ValueError, match=r"must be probabilities in \[0, 1\].*image\(s\) 0, 1"):
        fn(logits, labels)


@pytest.mark.parametrize("fn", SIMPLEX_FUNCTIONS)
def test_not_summing_to_one_when_needed(fn):
    probs, labels = _valid()
    sigmoid_like = probs.clone()
    sigmoid_like[0, 0] = 0.9
    with pytest.raises(ValueError, match=r"must sum to 1 over the class dimension.*image\(s\) 0"):
        fn(sigmoid_like, labels)


@pytest.mark.parametrize("fn", [dice, iou, soft_dice, thresholded_dice])
def test_overlap_and_classwise_do_not_need_sums_of_one(fn):
    probs, labels = _valid()
    sigmoid_like = probs.clone()
    sigmoid_like[:, 0] = 0.9
    assert torch.isfinite(fn(sigmoid_like, labels, empty="one")).all()
    assert torch.isfinite(expected_calibration_error(sigmoid_like, labels, kind="classwise")).all()


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_bad_labels(fn):
    probs, labels = _valid()
    labels[1, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*got labels in \[0, 3\] in image\(s\) 1"):
        fn(probs, labels)
    labels[1, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="labels must be in"):
        fn(probs, labels)
    with pytest.raises(ValueError, match="integer dtype"):
        fn(probs, labels.float().clamp_min(0))
    with pytest.raises(ValueError, match="floating point tensor"):
        fn(labels[:, None].repeat(1, 3, 1, 1, 1), labels.clamp_min(0))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_bad_soft_reference(fn):
    probs, _ = _valid()
    target = probs.flip(1).clone()
    target[0, 1, 0, 0, 0] += 0.3
    with pytest.raises(ValueError, match=r"target \(soft reference\) must sum to 1"):
        fn(probs, target)
    with pytest.raises(ValueError, match=r"target \(soft reference\) contains NaN"):
        fn(probs, torch.full_like(probs, float("nan")))
    with pytest.raises(ValueError, match="soft reference must be floating point"):
        fn(probs, (probs > 0.5).long())


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_bad_mask(fn):
    probs, labels = _valid()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        fn(probs, labels, mask=torch.ones(2, 4, 5, 6))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4, 5, 6\)"):
        fn(probs, labels, mask=torch.ones(2, 4, 5, dtype=torch.bool))


def test_non_tensor_input():
    probs, labels = _valid()
    with pytest.raises(ValueError, match="probs must be a torch.Tensor"):
        dice(probs.numpy(), labels)
    with pytest.raises(ValueError, match="target must be a torch.Tensor"):
        brier_score(probs, labels.tolist())


def test_bad_arguments():
    probs, labels = _valid()
    with pytest.raises(ValueError, match="n_bins must be a finite integer >= 1"):
        expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="kind must be one of 'top_label', 'classwise'"):
        expected_calibration_error(probs, labels, kind="marginal")
    with pytest.raises(ValueError, match="norm must be one of"):
        expected_calibration_error(probs, labels, norm="l3")
    with pytest.raises(ValueError, match="empty must be one of 'nan', 'one', 'zero'"):
        dice(probs, labels, empty="skip")
    with pytest.raises(ValueError, match=r"threshold must be a finite number in \[0, 1\)"):
        dice(probs, labels, threshold=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        thresholded_dice(probs, labels, levels=[0.5, 0.2])
    with pytest.raises(ValueError, match=r"eps must be a finite number in \(0, 1\)"):
        nll(probs, labels, eps=0)


@pytest.mark.parametrize("cls", [CalibrationMetrics, OverlapMetrics, SegmentationMetrics])
def test_streaming_input_errors_name_the_case(cls):
    probs, labels = _valid()
    metric = cls(num_classes=3)
    bad = probs.clone()
    bad[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in image\(s\) 1 \(case 'kidney_07'\)"):
        metric.update(bad, labels, case_ids=["kidney_03", "kidney_07"])
    with pytest.raises(ValueError, match="case_ids has 1 entries but the batch has 2 images"):
        metric.update(probs, labels, case_ids=["a"])
    with pytest.raises(ValueError, match="case_ids must be a sequence"):
        metric.update(probs, labels, case_ids="ab")
    with pytest.raises(ValueError, match=r"case_ids\[1\] must be a non-empty string"):
        metric.update(probs, labels, case_ids=["a", 7])
    with pytest.raises(ValueError, match="at most 256 allowed"):
        metric.update(probs, labels, case_ids=["a", "x" * 300])
    with pytest.raises(ValueError, match="built for num_classes=4"):
        cls(num_classes=4).update(probs, labels)


def test_streaming_constructor_errors():
    with pytest.raises(ValueError, match="num_classes must be a finite integer >= 2"):
        OverlapMetrics(num_classes=1)
    with pytest.raises(ValueError, match="class_names must be 3 distinct strings"):
        CalibrationMetrics(num_classes=3, class_names=["bg", "kidney"])
    with pytest.raises(ValueError, match="worst_percent"):
        OverlapMetrics(num_classes=3, worst_percent=(0,))
    with pytest.raises(ValueError, match="norm must be one of"):
        CalibrationMetrics(num_classes=3, norm="l0")
    with pytest.raises(ValueError, match="kind must be one of"):
        CalibrationMetrics(num_classes=3).reliability(kind="all")

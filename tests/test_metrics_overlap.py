"""Overlap metrics against MONAI, numpy references, closed forms and properties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import DiceMetric, MeanIoU

from medjdt.metrics import QUBIQ_LEVELS, dice, iou, soft_dice, thresholded_dice


def _probs(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).softmax(1).to(dtype)


def _labels(shape, num_classes, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, num_classes, shape, generator=g)


def _one_hot(labels, num_classes):
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def _argmax_one_hot(probs):
    return _one_hot(probs.argmax(1), probs.shape[1])


@pytest.mark.parametrize("spatial", [(14, 12), (8, 7, 6)])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_and_iou_match_monai(spatial, include_background):
    probs = _probs((3, 4, *spatial), seed=1)
    labels = _labels((3, *spatial), 4, seed=1)
    predicted, reference = _argmax_one_hot(probs), _one_hot(labels, 4)
    monai_dice = DiceMetric(include_background=include_background, reduction="none")(predicted, reference)
    monai_iou = MeanIoU(include_background=include_background, reduction="none")(predicted, reference)
    torch.testing.assert_close(dice(probs, labels, include_background=include_background), monai_dice)
    torch.testing.assert_close(iou(probs, labels, include_background=include_background), monai_iou)


def test_absent_and_empty_rules_against_monai():
    # Class 2 is absent from the reference everywhere; in image 0 the prediction has none either (both empty),
    # in image 1 the prediction has some (reference empty only).
    probs = _probs((2, 3, 10, 10), seed=2)
    probs[:, 2] = 0  # overlap metrics do not need probabilities that sum to 1
    probs[1, :, :3, :3] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    labels = _labels((2, 10, 10), 2, seed=2)
    predicted, reference = _argmax_one_hot(probs), _one_hot(labels, 3)
    assert predicted[0, 2].sum() == 0 and predicted[1, 2].sum() > 0
    # The default rule: a class absent from the reference is left out (NaN) whatever the prediction, as MONAI's
    # ignore_empty=True does; a stray predicted voxel does not turn it into 0.
    monai_ignore = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(predicted, reference)
    default = dice(probs, labels, include_background=True)
    torch.testing.assert_close(default, monai_ignore, equal_nan=True)
    assert torch.isnan(default[:, 2]).all()
    iou_ignore = MeanIoU(include_background=True, reduction="none", ignore_empty=True)(predicted, reference)
    torch.testing.assert_close(iou(probs, labels, include_background=True), iou_ignore, equal_nan=True)
    # absent="score": MONAI ignore_empty=False (both empty -> 1, reference empty -> 0) is empty="one".
    monai_one = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(predicted, reference)
    torch.testing.assert_close(dice(probs, labels, include_background=True, absent="score", empty="one"), monai_one)
    scored = dice(probs, labels, include_background=True, absent="score")
    assert torch.isnan(scored[0, 2]) and scored[1, 2] == 0
    assert dice(probs, labels, include_background=True, absent="score", empty="zero")[0, 2] == 0
    iou_one = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(predicted, reference)
    torch.testing.assert_close(iou(probs, labels, include_background=True, absent="score", empty="one"), iou_one)


def test_one_absent_class_rule_for_every_overlap_metric_on_hand_made_masks():
    # 1-D "volumes" of 6 voxels, classes 0..2. Reference: class 1 on voxels 0-2, class 2 nowhere.
    labels = torch.tensor([[1, 1, 1, 0, 0, 0]])
    probs = torch.zeros(1, 3, 6)
    probs[0, 1, :3] = 1.0  # class 1 exactly right
    probs[0, 0, 3:] = 1.0
    probs = probs[..., None]  # (1, 3, 6, 1): two spatial dims
    labels = labels[..., None]
    stray = probs.clone()
    stray[0, :, 5, 0] = torch.tensor([0.0, 0.0, 1.0])  # one stray voxel of the absent class 2
    for prediction in (probs, stray):
        for metric in (dice, iou, soft_dice, thresholded_dice):
            scores = metric(prediction, labels)
            assert scores[0, 0] == pytest.approx(1.0), metric.__name__  # class 1 present: scored
            assert torch.isnan(scores[0, 1]), metric.__name__  # class 2 absent: left out, stray voxel or not
    # A soft reference: class 2 has mass 0.25 on voxel 5 (one rater of four) -> present for the soft metrics,
    # absent for the hard ones (its argmax has no class-2 voxel).
    soft = torch.nn.functional.one_hot(labels[..., 0], 3).permute(0, 2, 1).float()[..., None]
    soft[0, :, 5, 0] = torch.tensor([0.75, 0.0, 0.25])
    assert torch.isnan(dice(stray, soft)[0, 1])
    assert not torch.isnan(soft_dice(stray, soft)[0, 1]) and not torch.isnan(thresholded_dice(stray, soft)[0, 1])


def test_thresholded_prediction_matches_monai_multilabel():
    probs = _probs((2, 3, 9, 9, 9), seed=3, scale=1.0)
    labels = _labels((2, 9, 9, 9), 3, seed=3)
    for threshold in (0.2, 0.5):
        predicted = (probs > threshold).float()
        reference = DiceMetric(include_background=True, reduction="none")(predicted, _one_hot(labels, 3))
        ours = dice(probs, labels, threshold=threshold, include_background=True)
        torch.testing.assert_close(ours, reference)


def test_soft_reference_reduces_to_its_argmax_for_hard_dice():
    probs = _probs((2, 3, 8, 8), seed=4)
    target = _probs((2, 3, 8, 8), seed=5)
    torch.testing.assert_close(dice(probs, target), dice(probs, target.argmax(1)))


def test_soft_dice_with_hard_reference_is_classic_soft_dice():
    probs = _probs((2, 3, 10, 10, 4), seed=6, dtype=torch.float64)
    labels = _labels((2, 10, 10, 4), 3, seed=6)
    y = _one_hot(labels, 3).double()
    classic = 2 * (probs * y).flatten(2).sum(-1) / (probs + y).flatten(2).sum(-1)
    torch.testing.assert_close(soft_dice(probs, labels, include_background=True), classic)


def test_soft_dice_closed_form_soft_reference():
    # x = 0.5 everywhere against y = 0.5: identical -> 1. x = 1 against y = 0.5 (the classic form's favourite):
    # (|x| + |y| - |x - y|) / (|x| + |y|) = (1 + 0.5 - 0.5) / 1.5 = 2/3 per voxel.
    half = torch.full((1, 2, 4, 4), 0.5)
    assert soft_dice(half, half).item() == pytest.approx(1.0)
    confident = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)], dim=1)
    assert soft_dice(confident, half).item() == pytest.approx(2 / 3)


def numpy_thresholded_dice(x, y, levels):
    """QUBIQ reference for one image and class: mean over levels of Dice(x > t, y > t), both-empty skipped."""
    scores = []
    for t in levels:
        a, b = x > t, y > t
        total = a.sum() + b.sum()
        if total > 0:
            scores.append(2 * (a & b).sum() / total)
    return np.mean(scores) if scores else np.nan


def test_thresholded_dice_matches_numpy_reference():
    probs = _probs((2, 3, 12, 12, 4), seed=7, scale=1.0)
    target = _probs((2, 3, 12, 12, 4), seed=8, scale=1.5)
    ours = thresholded_dice(probs, target, include_background=True)
    for b in range(2):
        for c in range(3):
            expected = numpy_thresholded_dice(probs[b, c].numpy(), target[b, c].numpy(), np.float32(QUBIQ_LEVELS))
            assert ours[b, c].item() == pytest.approx(expected, abs=1e-6)


def test_thresholded_dice_of_reference_with_itself_is_one():
    target = _probs((2, 4, 10, 10, 3), seed=9, scale=1.0)
    assert torch.all(thresholded_dice(target, target, include_background=True) == 1)
    # Rater averages of 3 raters take values k/3; some thresholds leave both masks empty and are skipped.
    g = torch.Generator().manual_seed(9)
    votes = torch.randint(0, 4, (2, 10, 10), generator=g).float() / 3
    rater_average = torch.stack([1 - votes, votes], dim=1)
    assert torch.all(thresholded_dice(rater_average, rater_average) == 1)


def test_thresholded_dice_with_hard_reference_averages_monai_dice_over_thresholds():
    probs = _probs((2, 3, 9, 9, 5), seed=10, scale=1.0)
    labels = _labels((2, 9, 9, 5), 3, seed=10)
    reference = _one_hot(labels, 3)
    per_threshold = [
        DiceMetric(include_background=False, reduction="none", ignore_empty=False)((probs > t).float(), reference)
        for t in np.float32(QUBIQ_LEVELS)
    ]
    torch.testing.assert_close(thresholded_dice(probs, labels), torch.stack(per_threshold).mean(0))


def test_custom_levels():
    probs = _probs((1, 2, 10, 10), seed=11)
    target = _probs((1, 2, 10, 10), seed=12)
    ours = thresholded_dice(probs, target, levels=[0.5])
    expected = numpy_thresholded_dice(probs[0, 1].numpy(), target[0, 1].numpy(), [np.float32(0.5)])
    assert ours.item() == pytest.approx(expected)


def test_mask_excludes_voxels_everywhere():
    probs = _probs((2, 3, 10, 10, 4), seed=13)
    target = _probs((2, 3, 10, 10, 4), seed=14)
    labels = target.argmax(1)
    g = torch.Generator().manual_seed(13)
    mask = torch.rand(2, 10, 10, 4, generator=g) > 0.5
    corrupted = probs.clone()
    corrupted[:, 1][~mask] = float("nan")
    bad_labels = labels.clone()
    bad_labels[~mask] = -1
    for b in range(2):
        kept_probs = probs[b][:, mask[b]][None, :, :, None]
        kept_labels = labels[b][mask[b]][None, :, None]
        kept_target = target[b][:, mask[b]][None, :, :, None]
        for fn in (dice, iou, soft_dice, thresholded_dice):
            torch.testing.assert_close(fn(corrupted, bad_labels, mask=mask)[b], fn(kept_probs, kept_labels)[0])
            torch.testing.assert_close(fn(corrupted, target, mask=mask)[b], fn(kept_probs, kept_target)[0])
        torch.testing.assert_close(
            dice(corrupted, bad_labels, mask=mask, threshold=0.4)[b], dice(kept_probs, kept_labels, threshold=0.4)[0]
        )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_classes=st.integers(2, 5), scale=st.floats(0.1, 5.0))
def test_overlap_properties(seed, num_classes, scale):
    probs = _probs((2, num_classes, 6, 6, 3), seed=seed, scale=scale, dtype=torch.float64)
    target = _probs((2, num_classes, 6, 6, 3), seed=seed + 1, scale=scale, dtype=torch.float64)
    labels = _labels((2, 6, 6, 3), num_classes, seed=seed)
    d = dice(probs, labels, include_background=True, empty="one")
    j = iou(probs, labels, include_background=True, empty="one")
    assert torch.all((d >= 0) & (d <= 1))
    torch.testing.assert_close(j, d / (2 - d))  # IoU = Dice / (2 - Dice)
    s_xy = soft_dice(probs, target, include_background=True)
    torch.testing.assert_close(s_xy, soft_dice(target, probs, include_background=True))  # symmetric
    assert torch.all((s_xy >= 0) & (s_xy <= 1 + 1e-12))
    assert torch.allclose(soft_dice(target, target, include_background=True), torch.ones_like(s_xy))
    t = thresholded_dice(probs, target, include_background=True, empty="one")
    assert torch.all((t >= 0) & (t <= 1))

"""Streaming CalibrationMetrics / OverlapMetrics: chunking, per-case tables, aggregations, state size."""

import math
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

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


def _probs(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).softmax(1).float()


def _labels(shape, num_classes, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, num_classes, shape, generator=g)


def _mask(shape, seed, keep=0.7):
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.rand(shape, generator=g) < keep


def _assert_dicts_close(actual, expected, rtol=1e-6, atol=1e-9):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)


@pytest.fixture(params=["hard", "soft"])
def volumes(request):
    """Two cases of shape (1, 3, 8, 8, 12): probabilities, reference (hard or soft) and mask."""
    probs = _probs((2, 3, 8, 8, 12), seed=1)
    if request.param == "hard":
        target = _labels((2, 8, 8, 12), 3, seed=1)
    else:
        target = _probs((2, 3, 8, 8, 12), seed=2, scale=1.0)
    return probs, target, _mask((2, 8, 8, 12), seed=1)


def _chunks(tensor, widths):
    """Split the last axis into consecutive chunks of the given widths."""
    return list(torch.split(tensor, widths, dim=-1))


@pytest.mark.parametrize("cls", [CalibrationMetrics, OverlapMetrics])
def test_chunked_updates_equal_one_shot(cls, volumes):
    probs, target, mask = volumes
    whole = cls(num_classes=3)
    whole.update(probs, target, ["case_a", "case_b"], mask)

    chunked = cls(num_classes=3)
    widths = [5, 4, 3]
    pieces = []
    for b, case_id in enumerate(["case_a", "case_b"]):
        for p, t, m in zip(
            _chunks(probs[b : b + 1], widths), _chunks(target[b : b + 1], widths), _chunks(mask[b : b + 1], widths)
        ):
            pieces.append((p, t, m, case_id))
    random.Random(0).shuffle(pieces)  # chunks of the two cases arrive interleaved and out of order
    for p, t, m, case_id in pieces:
        chunked.update(p, t, [case_id], m)

    _assert_dicts_close(chunked.compute(), whole.compute())
    pd.testing.assert_frame_equal(chunked.per_case(), whole.per_case(), rtol=1e-6)


def test_chunks_in_one_batch_of_the_same_case():
    probs = _probs((1, 3, 6, 6, 8), seed=3)
    labels = _labels((1, 6, 6, 8), 3, seed=3)
    whole = OverlapMetrics(num_classes=3)
    whole.update(probs, labels, ["x"])
    batched = OverlapMetrics(num_classes=3)
    batched.update(torch.cat(_chunks(probs, [4, 4])), torch.cat(_chunks(labels, [4, 4])), ["x", "x"])
    pd.testing.assert_frame_equal(batched.per_case(), whole.per_case(), rtol=1e-6)


def test_calibration_per_case_matches_functional(volumes):
    probs, target, mask = volumes
    metric = CalibrationMetrics(num_classes=3, class_names=["bg", "kidney", "tumor"])
    metric.update(probs, target, ["a", "b"], mask)
    table = metric.per_case()
    assert list(table["case_id"]) == ["a", "b"] and list(table.index) == [0, 1]
    ece = expected_calibration_error(probs, target, mask=mask).double()
    classwise = expected_calibration_error(probs, target, kind="classwise", mask=mask).double()
    torch.testing.assert_close(torch.tensor(table["ece"].values), ece)
    torch.testing.assert_close(torch.tensor(table["ece_classwise/kidney"].values), classwise[:, 1])
    torch.testing.assert_close(torch.tensor(table["ece_classwise"].values), classwise.mean(1))
    torch.testing.assert_close(torch.tensor(table["brier"].values), brier_score(probs, target, mask=mask).double())
    torch.testing.assert_close(torch.tensor(table["nll"].values), nll(probs, target, mask=mask).double())
    torch.testing.assert_close(torch.tensor(table["n_voxels"].values), mask.flatten(1).sum(1).double())


def test_overlap_per_case_matches_functional(volumes):
    probs, target, mask = volumes
    metric = OverlapMetrics(num_classes=3, class_names=["bg", "kidney", "tumor"])
    metric.update(probs, target, ["a", "b"], mask)
    table = metric.per_case()
    for name, fn in [("dice", dice), ("iou", iou), ("soft_dice", soft_dice), ("thresholded_dice", thresholded_dice)]:
        expected = fn(probs, target, mask=mask).double()
        torch.testing.assert_close(torch.tensor(table[f"{name}/kidney"].values), expected[:, 0])
        torch.testing.assert_close(torch.tensor(table[f"{name}/tumor"].values), expected[:, 1])
        torch.testing.assert_close(torch.tensor(table[name].values), expected.nanmean(1))
    assert "dice/bg" not in table.columns  # include_background=False by default


def _side_by_side(probs, target, mask):
    """The two cases laid next to each other as one image: pooling over cases = one image of all voxels."""
    cat = torch.cat(list(probs.split(1)), dim=-1)
    target_cat = torch.cat(list(target.split(1)), dim=-1)
    mask_cat = torch.cat(list(mask.split(1)), dim=-1)
    return cat, target_cat, mask_cat


def test_pooled_calibration_equals_functional_on_all_voxels(volumes):
    probs, target, mask = volumes
    metric = CalibrationMetrics(num_classes=3)
    metric.update(probs, target, ["a", "b"], mask)
    out = metric.compute()
    p, t, m = _side_by_side(probs, target, mask)
    # "_D": pooled over every voxel of the dataset, as the functional metrics on all voxels side by side
    torch.testing.assert_close(out["ece_D"], expected_calibration_error(p, t, mask=m)[0].double())
    classwise = expected_calibration_error(p, t, kind="classwise", mask=m)[0].double()
    torch.testing.assert_close(out["ece_classwise_D"], classwise.mean())
    torch.testing.assert_close(out["ece_classwise_D/2"], classwise[2])
    torch.testing.assert_close(out["brier_D"], brier_score(p, t, mask=m)[0].double())
    # The functional NLL is a float32 result (its own rounding ~1e-7 relative), the streaming one float32 logs
    # summed in float64: they agree to float32 resolution.
    torch.testing.assert_close(out["nll_D"], nll(p, t, mask=m)[0].double(), rtol=1e-6, atol=1e-7)
    # the unsuffixed names (and "_I") are means over cases, as for the overlap metrics
    per_case = metric.per_case()
    for key in ("ece", "brier", "nll"):
        assert out[f"{key}_I"].item() == pytest.approx(per_case[key].mean())
        assert out[key].item() == pytest.approx(per_case[key].mean())
    bins = metric.reliability()
    reference = reliability_bins(p, t, mask=m)
    assert list(bins.columns) == ["bin_lower", "bin_upper", "count", "confidence", "accuracy"]
    np.testing.assert_allclose(bins["bin_lower"], np.arange(15) / 15)  # 15 bins by default
    np.testing.assert_allclose(bins["bin_upper"], np.arange(1, 16) / 15)
    np.testing.assert_array_equal(bins["count"], reference.count[0].numpy())
    np.testing.assert_allclose(bins["confidence"], reference.confidence[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(bins["accuracy"], reference.accuracy[0].numpy(), rtol=1e-6)
    classwise_bins = metric.reliability("classwise")
    classwise_reference = reliability_bins(p, t, kind="classwise", mask=m)
    assert list(classwise_bins["class"]) == [name for name in ("0", "1", "2") for _ in range(15)]
    np.testing.assert_array_equal(classwise_bins["count"], classwise_reference.count[0].flatten().numpy())
    np.testing.assert_allclose(classwise_bins["accuracy"], classwise_reference.accuracy[0].flatten().numpy(), rtol=1e-6)


def test_pooled_overlap_equals_functional_on_all_voxels(volumes):
    probs, target, mask = volumes
    metric = OverlapMetrics(num_classes=3)
    metric.update(probs, target, ["a", "b"], mask)
    out = metric.compute()
    p, t, m = _side_by_side(probs, target, mask)
    for name, fn in [("dice", dice), ("iou", iou), ("soft_dice", soft_dice), ("thresholded_dice", thresholded_dice)]:
        # float32 inputs: the pooled sums and the one-image sums are accumulated in a different order
        torch.testing.assert_close(out[f"{name}_D"], fn(p, t, mask=m)[0].double().nanmean(), rtol=1e-6, atol=0)


def _one_hot_probs(labels, num_classes):
    return F.one_hot(torch.tensor(labels), num_classes).T.float()[None, :, None, :]  # (1, C, 1, N)


def test_overlap_aggregations_closed_form():
    # Case A: class 1 TP 2 FN 2 -> 2/3; class 2 TP 2 FP 4 -> 1/2.
    # Case B: class 1 TP 1 FN 5 -> 2/7; class 2 empty in both -> NaN (left out).
    ref_a, pred_a = [1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 2, 2, 2, 2, 2, 2, 0, 0]
    ref_b, pred_b = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    metric = OverlapMetrics(num_classes=3, worst_percent=(10, 50, 100))
    metric.update(_one_hot_probs(pred_a, 3), torch.tensor(ref_a)[None, None], ["A"])
    metric.update(_one_hot_probs(pred_b, 3), torch.tensor(ref_b)[None, None], ["B"])
    out = metric.compute()
    case_a, case_b = (2 / 3 + 1 / 2) / 2, 2 / 7
    expected = {
        "D": (6 / 13 + 1 / 2) / 2,  # class 1 pooled: TP 3, FN 7
        "I": (case_a + case_b) / 2,
        "C": ((2 / 3 + 2 / 7) / 2 + 1 / 2) / 2,
        "worst10": min(case_a, case_b),
        "worst50": min(case_a, case_b),
        "worst100": (case_a + case_b) / 2,
    }
    # One-hot probabilities make soft Dice and thresholded Dice equal to hard Dice.
    for name in ("dice", "soft_dice", "thresholded_dice"):
        for suffix, value in expected.items():
            assert out[f"{name}_{suffix}"].item() == pytest.approx(value), f"{name}_{suffix}"
        assert out[name].item() == pytest.approx(expected["I"])
    assert out["dice/1"].item() == pytest.approx((2 / 3 + 2 / 7) / 2)
    assert out["dice/2"].item() == pytest.approx(1 / 2)
    # IoU of the same cases: class 1 A 2/4, B 1/6, pooled 3/10; class 2 A 2/6.
    assert out["iou_D"].item() == pytest.approx((3 / 10 + 2 / 6) / 2)
    assert out["iou_I"].item() == pytest.approx(((1 / 2 + 1 / 3) / 2 + 1 / 6) / 2)


def test_worst_percent_uses_lowest_scores():
    metric = OverlapMetrics(num_classes=2, worst_percent=(10, 25))
    scores = []
    for i in range(8):
        # Case i: reference 8 foreground voxels, prediction the first i + 1 of them: Dice = 2(i+1)/(8+i+1).
        ref = [1] * 8 + [0] * 8
        pred = [1] * (i + 1) + [0] * (16 - i - 1)
        metric.update(_one_hot_probs(pred, 2), torch.tensor(ref)[None, None], [f"case{i}"])
        scores.append(2 * (i + 1) / (8 + i + 1))
    out = metric.compute()
    lowest = sorted(scores)
    assert out["dice_worst10"].item() == pytest.approx(lowest[0])  # ceil(0.8) = 1 case
    assert out["dice_worst25"].item() == pytest.approx(sum(lowest[:2]) / 2)  # ceil(2.0) = 2 cases
    assert math.isclose(out["dice_I"].item(), sum(scores) / 8)


def test_state_size_does_not_depend_on_volume_size():
    sizes = {}
    for side in (8, 16):
        metric = CalibrationMetrics(num_classes=3)
        for chunk in range(4):
            metric.update(
                _probs((2, 3, side, side, side), seed=chunk), _labels((2, side, side, side), 3, chunk), ["a", "b"]
            )
        rows = torch.cat(metric.case_stats)
        sizes[side] = (metric.totals.numel(), rows.shape)
    assert sizes[8] == sizes[16]
    assert sizes[8][1][0] <= 2 * 4  # at most one row per (case, update) before merging, here 2 cases


def test_many_chunks_keep_rows_bounded():
    metric = OverlapMetrics(num_classes=2)
    probs = _probs((3, 2, 4, 4), seed=4)
    labels = _labels((3, 4, 4), 2, seed=4)
    for _ in range(300):
        metric.update(probs, labels, ["a", "b", "c"])
    n_rows = sum(rows.shape[0] for rows in metric.case_stats)
    assert n_rows <= 3 + 2 * 64 + 3  # merged rows plus the unmerged tail, not 900
    table = metric.per_case()
    assert list(table["case_id"]) == ["a", "b", "c"]
    torch.testing.assert_close(
        torch.tensor(table["n_voxels"].values), torch.full((3,), 300.0 * 16, dtype=torch.float64)
    )


def test_without_case_ids_every_image_is_a_case():
    metric = CalibrationMetrics(num_classes=2)
    for seed in range(2):
        metric.update(_probs((2, 2, 4, 4), seed=seed), _labels((2, 4, 4), 2, seed=seed))
    assert list(metric.per_case()["case_id"]) == ["image000000", "image000001", "image000002", "image000003"]


def test_reset_starts_over():
    probs, labels = _probs((2, 3, 5, 5, 5), seed=5), _labels((2, 5, 5, 5), 3, seed=5)
    metric = OverlapMetrics(num_classes=3)
    metric.update(_probs((2, 3, 5, 5, 5), seed=6), labels, ["old1", "old2"])
    metric.reset()
    metric.update(probs, labels, ["a", "b"])
    fresh = OverlapMetrics(num_classes=3)
    fresh.update(probs, labels, ["a", "b"])
    _assert_dicts_close(metric.compute(), fresh.compute())
    assert list(metric.per_case()["case_id"]) == ["a", "b"]


def test_compute_before_update_is_nan_not_an_error():
    metric = OverlapMetrics(num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        out = metric.compute()
    assert torch.isnan(out["dice"]) and torch.isnan(out["dice_D"]) and torch.isnan(out["dice_worst10"])
    assert metric.per_case().empty


def test_compute_keys():
    metric = CalibrationMetrics(num_classes=2, class_names=["background", "lesion"], include_background=False)
    metric.update(_probs((1, 2, 4, 4), seed=7), _labels((1, 4, 4), 2, seed=7), ["c"])
    assert set(metric.compute()) == {
        "ece",
        "ece_classwise",
        "brier",
        "nll",
        "ece_I",
        "ece_classwise_I",
        "brier_I",
        "nll_I",
        "ece_D",
        "ece_classwise_D",
        "brier_D",
        "nll_D",
        "ece_classwise_D/lesion",
    }
    overlap = OverlapMetrics(num_classes=2, class_names=["background", "lesion"], worst_percent=(5, 10))
    overlap.update(_probs((1, 2, 4, 4), seed=7), _labels((1, 4, 4), 2, seed=7), ["c"])
    keys = set(overlap.compute())
    for name in ("dice", "iou", "soft_dice", "thresholded_dice"):
        assert {name, f"{name}_D", f"{name}_I", f"{name}_C", f"{name}_worst5", f"{name}_worst10"} <= keys
        assert f"{name}/lesion" in keys and f"{name}/background" not in keys


@pytest.mark.parametrize("cls", [CalibrationMetrics, OverlapMetrics])
def test_forward_returns_batch_values_and_accumulates_like_update(cls):
    called, updated = cls(num_classes=3), cls(num_classes=3)
    for step in range(3):
        probs, labels = _probs((2, 3, 5, 5), seed=step), _labels((2, 5, 5), 3, seed=step)
        batch_values = called(probs, labels, [f"case{step}", "shared"])
        updated.update(probs, labels, [f"case{step}", "shared"])
        alone = cls(num_classes=3)
        alone.update(probs, labels, [f"case{step}", "shared"])
        _assert_dicts_close(batch_values, alone.compute())
    _assert_dicts_close(called.compute(), updated.compute())
    pd.testing.assert_frame_equal(called.per_case(), updated.per_case())


def test_a_stray_voxel_of_an_absent_class_does_not_move_the_headline_dice_and_is_counted():
    # Reference: class 1 on the left half, class 2 nowhere. Prediction: class 1 exact, plus one stray class-2 voxel.
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, :4] = 1
    clean = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    stray = clean.clone()
    stray[0, :, 7, 7] = torch.tensor([0.0, 0.0, 1.0])
    results = []
    for probs in (clean, stray):
        metric = SegmentationMetrics(3, class_names=["background", "organ", "lesion"])
        metric.update(probs, labels, ["case"])
        results.append((metric.compute(), metric.per_case().iloc[0]))
    (clean_out, clean_case), (stray_out, stray_case) = results
    assert clean_out["dice"] == stray_out["dice"] == pytest.approx(1.0)  # lesion absent: left out both times
    assert torch.isnan(stray_out["dice/lesion"]) and np.isnan(stray_case["soft_dice/lesion"])
    assert clean_case["absent_fp_voxels"] == 0 and stray_case["absent_fp_voxels/lesion"] == 1
    assert stray_out["absent_fp_cases/lesion"] == 1

"""SegmentationMetrics: one pass per batch for calibration and overlap, the same results as the two objects."""

import random

import pandas as pd
import pytest
import torch

import medjdt.metrics._per_case_metric as per_case_metric
from medjdt.metrics import CalibrationMetrics, OverlapMetrics, SegmentationMetrics


def _probs(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).softmax(1).float()


def _batch(soft, seed=0, shape=(2, 3, 6, 7, 8)):
    probs = _probs(shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    if soft:
        target = _probs(shape, seed + 200, scale=1.0)
    else:
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.8
    return probs, target, mask


def _separate(num_classes=3, **options):
    """The two objects configured as SegmentationMetrics(**options) configures its parts."""
    calibration_keys = {"n_bins", "norm", "class_names", "eps"}
    overlap_keys = {"include_background", "class_names", "empty", "levels", "worst_percent"}
    calibration = {k: v for k, v in options.items() if k in calibration_keys}
    if "calibration_background" in options:
        calibration["include_background"] = options["calibration_background"]
    overlap = {k: v for k, v in options.items() if k in overlap_keys}
    return CalibrationMetrics(num_classes, **calibration), OverlapMetrics(num_classes, **overlap)


def _assert_same_as_separate(combined, calibration, overlap):
    values = combined.compute()
    expected = {**calibration.compute(), **overlap.compute()}
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(values[key], value, rtol=1e-12, atol=1e-12, equal_nan=True, msg=key)
    table = combined.per_case()
    overlap_table = overlap.per_case()
    calibration_table = calibration.per_case().drop(columns="n_voxels")
    expected_table = overlap_table.merge(calibration_table, on="case_id")
    assert list(table.columns) == list(expected_table.columns)
    assert list(table.columns[: len(overlap_table.columns)]) == list(overlap_table.columns)
    pd.testing.assert_frame_equal(table, expected_table, rtol=1e-12)
    for kind in ("top_label", "classwise"):
        pd.testing.assert_frame_equal(combined.reliability(kind), calibration.reliability(kind), rtol=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "n_bins": 7,
            "norm": "l2",
            "include_background": True,
            "calibration_background": False,
            "class_names": ["bg", "kidney", "tumor"],
            "empty": "one",
            "levels": (0.25, 0.5, 0.75),
            "worst_percent": (10, 50),
            "eps": 1e-4,
        },
    ],
    ids=["defaults", "options"],
)
def test_equals_calibration_and_overlap_metrics(soft, options):
    combined = SegmentationMetrics(3, **options)
    calibration, overlap = _separate(**options)
    pieces = []
    for seed, case_ids in enumerate([["a", "b"], ["c", "a"]]):
        probs, target, mask = _batch(soft, seed)
        for part in torch.split(torch.arange(probs.shape[-1]), [3, 5], dim=0):  # chunks of the same cases
            pieces.append((probs[..., part], target[..., part], mask[..., part], case_ids))
    random.Random(0).shuffle(pieces)
    for probs, target, mask, case_ids in pieces:
        combined.update(probs, target, case_ids, mask)
        calibration.update(probs, target, case_ids, mask)
        overlap.update(probs, target, case_ids, mask)
    assert list(combined.per_case()["case_id"]) == ["a", "b", "c"]
    _assert_same_as_separate(combined, calibration, overlap)


def test_one_pass_per_update(monkeypatch):
    calls = []
    real = per_case_metric.voxel_sums

    def counted(inputs, **options):
        calls.append(options)
        return real(inputs, **options)

    monkeypatch.setattr(per_case_metric, "voxel_sums", counted)
    probs, labels, _ = _batch(soft=False)
    SegmentationMetrics(3, n_bins=12).update(probs, labels)
    assert len(calls) == 1
    assert calls[0]["n_bins"] == 12 and calls[0]["overlap"] and len(calls[0]["levels"]) == 9


def test_results_follow_later_updates():
    """torchmetrics caches compute(); every update must invalidate it."""
    metric = SegmentationMetrics(3)
    probs, labels, _ = _batch(soft=False, seed=1)
    metric.update(probs, labels, ["a", "b"])
    first = metric.compute()
    metric.update(*_batch(soft=False, seed=2)[:2], ["c", "d"])
    second = metric.compute()
    assert second["ece"] != first["ece"] and second["dice_D"] != first["dice_D"]
    assert len(metric.per_case()) == 4


def test_forward_returns_batch_values_and_accumulates():
    called, updated = SegmentationMetrics(3), SegmentationMetrics(3)
    for step in range(2):
        probs, labels, _ = _batch(soft=False, seed=step)
        batch_values = called(probs, labels, [f"case{step}", "shared"])
        updated.update(probs, labels, [f"case{step}", "shared"])
        alone = SegmentationMetrics(3)
        alone.update(probs, labels, [f"case{step}", "shared"])
        for key, value in alone.compute().items():
            torch.testing.assert_close(batch_values[key], value, equal_nan=True, msg=key)
    pd.testing.assert_frame_equal(called.per_case(), updated.per_case())


def test_reset_starts_over():
    metric, fresh = SegmentationMetrics(3), SegmentationMetrics(3)
    metric.update(*_batch(soft=True, seed=3)[:2], ["old1", "old2"])
    metric.reset()
    probs, target, _ = _batch(soft=True, seed=4)
    metric.update(probs, target, ["a", "b"])
    fresh.update(probs, target, ["a", "b"])
    pd.testing.assert_frame_equal(metric.per_case(), fresh.per_case())


def test_deferred_checks_report_bad_values_before_any_result(monkeypatch):
    """As on an accelerator: update() does not check values; every result raises until reset."""
    monkeypatch.setattr(SegmentationMetrics, "_CHECK_NOW_DEVICES", ())
    metric = SegmentationMetrics(3)
    probs, labels, _ = _batch(soft=False)
    bad = probs.clone()
    bad[1, 0, 0, 0, 0] = float("nan")
    metric.update(probs, labels, ["good", "also_good"])
    metric.update(bad, labels + 7, ["kidney_03", "kidney_07"])  # no error yet, and no out-of-range index
    for result in (metric.compute, metric.per_case, metric.reliability):
        with pytest.raises(ValueError, match=r"probs contains NaN in image\(s\) 1 \(case 'kidney_07'\)"):
            result()
    with pytest.raises(ValueError, match="NaN"):
        metric.reset()
    metric.update(probs, labels, ["a", "b"])
    metric.compute()


def test_input_and_argument_errors():
    probs, labels, _ = _batch(soft=False)
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="must sum to 1 over the class dimension"):
        metric.update(probs * 0.5, labels, ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        metric.update(probs, labels + 1, ["a", "b"])
    with pytest.raises(ValueError, match="built for num_classes=4"):
        SegmentationMetrics(4).update(probs, labels)
    with pytest.raises(ValueError, match="num_classes must be a finite integer >= 2"):
        SegmentationMetrics(1)
    with pytest.raises(ValueError, match="n_bins must be a finite integer >= 1"):
        SegmentationMetrics(3, n_bins=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        SegmentationMetrics(3, levels=(0.5, 0.2))
    with pytest.raises(ValueError, match="class_names must be 3 distinct strings"):
        SegmentationMetrics(3, class_names=["a", "a", "b"])
    with pytest.raises(ValueError, match="kind must be one of"):
        metric.reliability(kind="all")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_two_classes_in_2d(soft):
    combined = SegmentationMetrics(2, include_background=True)
    calibration, overlap = _separate(2, include_background=True)
    probs, target, mask = _batch(soft, seed=6, shape=(3, 2, 9, 11))
    for metric in (combined, calibration, overlap):
        metric.update(probs, target, ["x", "y", "z"], mask)
    _assert_same_as_separate(combined, calibration, overlap)

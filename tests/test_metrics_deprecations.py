"""The QUBIQ level list was called ``thresholds``: the old argument and constant names work for one release, warn
with a FutureWarning pointing at the caller, and give the same results as ``levels`` / ``QUBIQ_LEVELS``."""

import warnings

import pytest
import torch

import medjdt.metrics
import medjdt.metrics.overlap
from medjdt.metrics import QUBIQ_LEVELS, OverlapMetrics, SegmentationMetrics, thresholded_dice
from medjdt.metrics._checks import prepare_inputs
from medjdt.metrics.fused import voxel_sums
from medjdt.metrics.fused_triton import triton_supports
from medjdt.metrics.overlap import overlap_sums

LEVELS = (0.25, 0.5, 0.75)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(2, 3, 6, 5, 4, generator=generator)).softmax(1)
    target = torch.randn(2, 3, 6, 5, 4, generator=generator).softmax(1)
    return probs, target


def _warns_here(name: str):
    """Expect the deprecation warning of ``name`` about 'thresholds', pointing at this file."""
    return pytest.warns(FutureWarning, match=rf"^{name}: argument 'thresholds' is deprecated; use 'levels'$")


def _assert_points_here(record):
    assert record[0].filename == __file__, record[0].filename


def test_thresholded_dice_accepts_thresholds_with_a_warning():
    probs, target = _batch()
    with _warns_here("thresholded_dice") as record:
        old = thresholded_dice(probs, target, thresholds=LEVELS)
    _assert_points_here(record)
    torch.testing.assert_close(old, thresholded_dice(probs, target, levels=LEVELS), rtol=0, atol=0)
    assert not torch.equal(old, thresholded_dice(probs, target))  # the levels were used, not the default


@pytest.mark.parametrize("cls", [OverlapMetrics, SegmentationMetrics])
def test_streaming_metrics_accept_thresholds_with_a_warning(cls):
    probs, target = _batch(1)
    with _warns_here(cls.__name__) as record:
        old = cls(3, thresholds=LEVELS)
    _assert_points_here(record)
    new = cls(3, levels=LEVELS)
    for metric in (old, new):
        metric.update(probs, target, ["a", "b"])
    old_values, new_values = old.compute(), new.compute()
    assert old_values.keys() == new_values.keys()
    for key, value in new_values.items():
        torch.testing.assert_close(old_values[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_overlap_metrics_thresholds_attribute_warns():
    metric = OverlapMetrics(3, levels=LEVELS)
    assert metric.levels == LEVELS
    with pytest.warns(FutureWarning, match="attribute 'thresholds' is deprecated; use 'levels'"):
        assert metric.thresholds == LEVELS


def test_sum_functions_accept_thresholds_with_a_warning():
    probs, target = _batch(2)
    inputs = prepare_inputs(probs, target, simplex=True)
    with _warns_here("voxel_sums"):
        old = voxel_sums(inputs, n_bins=10, overlap=True, thresholds=LEVELS)
    new = voxel_sums(inputs, n_bins=10, overlap=True, levels=LEVELS)
    torch.testing.assert_close(old.overlap.thr_tp, new.overlap.thr_tp, rtol=0, atol=0)
    assert old.overlap.thr_tp.shape[-1] == len(LEVELS)
    with _warns_here("overlap_sums"):
        old = overlap_sums(inputs, thresholds=LEVELS)
    torch.testing.assert_close(old.thr_pred, overlap_sums(inputs, LEVELS).thr_pred, rtol=0, atol=0)
    with _warns_here("triton_supports"):
        assert triton_supports(inputs, thresholds=LEVELS) == triton_supports(inputs, LEVELS)


def test_giving_both_names_is_an_error():
    probs, target = _batch()
    inputs = prepare_inputs(probs, target, simplex=True)
    match = "deprecated name of 'levels'; give only 'levels'"
    with pytest.raises(ValueError, match=f"thresholded_dice: .*{match}"):
        thresholded_dice(probs, target, levels=LEVELS, thresholds=LEVELS)
    with pytest.raises(ValueError, match=f"OverlapMetrics: .*{match}"):
        OverlapMetrics(3, levels=LEVELS, thresholds=LEVELS)
    with pytest.raises(ValueError, match=f"SegmentationMetrics: .*{match}"):
        SegmentationMetrics(3, levels=(0.5,), thresholds=LEVELS)
    with pytest.raises(ValueError, match=f"voxel_sums: .*{match}"):
        voxel_sums(inputs, overlap=True, levels=LEVELS, thresholds=LEVELS)


def test_a_config_that_passes_the_default_levels_may_still_say_thresholds():
    """A config loader passes every argument: levels at its default (a list, as read from YAML) is not 'given'."""
    with _warns_here("OverlapMetrics"):
        metric = OverlapMetrics(3, levels=list(QUBIQ_LEVELS), thresholds=[0.5])
    assert metric.levels == (0.5,)


@pytest.mark.parametrize("module", [medjdt.metrics, medjdt.metrics.overlap], ids=["package", "overlap"])
def test_qubiq_thresholds_is_a_deprecated_alias_of_qubiq_levels(module):
    with pytest.warns(FutureWarning, match="QUBIQ_THRESHOLDS is deprecated; use QUBIQ_LEVELS") as record:
        value = module.QUBIQ_THRESHOLDS
    _assert_points_here(record)
    assert value == QUBIQ_LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from medjdt.metrics import QUBIQ_LEVELS as levels  # the new name does not warn
    assert levels is QUBIQ_LEVELS


def test_the_new_names_do_not_warn():
    probs, target = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thresholded_dice(probs, target, levels=LEVELS)
        OverlapMetrics(3, levels=LEVELS).update(probs, target)
        SegmentationMetrics(3).update(probs, target)

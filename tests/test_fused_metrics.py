"""The one-pass metric sums (medjdt.metrics.fused.voxel_sums) against the per-metric reference functions.

The reference functions (medjdt.metrics.calibration / overlap) are themselves checked against MONAI,
torchmetrics and scikit-learn in the other metric tests. Counts must agree exactly and sums to float rounding,
for hard and soft references, masks, 2D and 3D, several bin and level settings, values on bin edges and
levels, and many chunks with a ragged last one.
"""

import pytest
import torch

import medjdt.metrics._float_bits as float_bits
import medjdt.metrics._voxel_layout as voxel_layout
import medjdt.metrics._voxel_pass as voxel_pass
import medjdt.metrics.fused as fused
from medjdt.metrics import QUBIQ_LEVELS, CalibrationMetrics, OverlapMetrics
from medjdt.metrics._checks import prepare_inputs
from medjdt.metrics._chunk_work import ChunkWork
from medjdt.metrics.calibration import classwise_bin_sums, nll_sums, squared_error_sums, top_label_bin_sums
from medjdt.metrics.fused import voxel_sums
from medjdt.metrics.overlap import overlap_sums


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    if request.param == "many_chunks":
        monkeypatch.setitem(voxel_pass._CHUNK_ELEMENTS, "cpu", 100)  # not a divisor of the voxel counts below
    return request.param


def _inputs(spatial, soft, masked, channels=3, batch=2, dtype=torch.float32, seed=0, grid=None):
    """Softmax probabilities; with ``grid`` they are rounded to multiples of 1/grid (bin edges, levels, 1.0)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)
    probs = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).softmax(1)
    if grid is not None:
        # exact multiples of 1/grid that still sum to 1: round all but the last class, which takes the rest
        rounded = (probs[:, :-1] * grid).floor() / grid
        probs = torch.cat([rounded, 1 - rounded.sum(1, keepdim=True)], dim=1)
    if soft:
        target = torch.randn(shape, generator=generator, dtype=torch.float64).softmax(1)
        if grid is not None:  # one-hot: reference values exactly 0 and 1, on the levels' boundaries
            target = torch.nn.functional.one_hot(target.argmax(1), channels).movedim(-1, 1).double()
        target = target.to(dtype)
    else:
        target = torch.randint(0, channels, (batch, *spatial), generator=generator)
    mask = torch.rand((batch, *spatial), generator=generator) > 0.3 if masked else None
    return prepare_inputs(probs.to(dtype), target, mask, simplex=True)


def _assert_sums_close(actual, expected, dtype):
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def _assert_matches_reference(inputs, n_bins=10, levels=QUBIQ_LEVELS, eps=1e-7):
    sums = voxel_sums(inputs, n_bins=n_bins, overlap=True, levels=levels, eps=eps)
    dtype = inputs.probs.dtype
    top, classwise = top_label_bin_sums(inputs, n_bins), classwise_bin_sums(inputs, n_bins)
    # counts exactly, sums to rounding
    torch.testing.assert_close(sums.top_label[0], top[0], rtol=0, atol=0)
    torch.testing.assert_close(sums.classwise[0], classwise[0], rtol=0, atol=0)
    if not inputs.soft:  # the accuracy of a hard reference is a count
        torch.testing.assert_close(sums.top_label[2], top[2], rtol=0, atol=0)
        torch.testing.assert_close(sums.classwise[2], classwise[2], rtol=0, atol=0)
    _assert_sums_close(sums.top_label, top, dtype)
    _assert_sums_close(sums.classwise, classwise, dtype)
    _assert_sums_close(sums.squared_error, squared_error_sums(inputs), dtype)
    _assert_sums_close(sums.nll, nll_sums(inputs, eps), dtype)
    reference = overlap_sums(inputs, levels)
    for name in ("tp", "fp", "fn", "thr_tp", "thr_pred", "thr_ref"):
        torch.testing.assert_close(getattr(sums.overlap, name), getattr(reference, name), rtol=0, atol=0, msg=name)
    if inputs.soft:
        torch.testing.assert_close(sums.overlap.ref_mass, reference.ref_mass, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(sums.overlap.ref_mass, reference.ref_mass, rtol=0, atol=0)
    for name in ("pred_mass", "abs_diff"):
        _assert_sums_close(getattr(sums.overlap, name), getattr(reference, name), dtype)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("spatial", [(13, 11), (7, 6, 5)], ids=["2d", "3d"])
def test_equals_reference_functions(soft, masked, spatial, chunking):
    _assert_matches_reference(_inputs(spatial, soft, masked))


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_values_on_bin_edges_levels_and_one(soft, chunking):
    """Probabilities on multiples of 1/20: on the bin edges, on the levels and equal to 1.0."""
    inputs = _inputs((9, 8, 7), soft, masked=True, grid=20, seed=1)
    assert (inputs.probs == 1.0).any() and (inputs.probs == 0.5).any()
    _assert_matches_reference(inputs)
    _assert_matches_reference(inputs, n_bins=4, levels=(0.25, 0.5, 0.75))


@pytest.mark.parametrize(
    "channels,n_bins,levels",
    [
        (2, 1, (0.5,)),
        (4, 7, (0.1, 0.35, 0.6)),
        (3, 15, tuple(i / 21 for i in range(1, 21))),  # 21 levels: keys beyond the uint8 range
    ],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_other_settings(channels, n_bins, levels, soft, chunking):
    inputs = _inputs((8, 7, 6), soft, masked=True, channels=channels, seed=2)
    _assert_matches_reference(inputs, n_bins=n_bins, levels=levels, eps=1e-3)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_float64_inputs(soft, chunking):
    _assert_matches_reference(_inputs((6, 5, 4), soft, masked=True, dtype=torch.float64, seed=3))


def test_counts_without_bincount_as_on_accelerators(monkeypatch, chunking):
    """Off the CPU the counts are float64 index_add_ sums (bincount would synchronise): same results."""
    monkeypatch.setattr(voxel_pass, "_BINCOUNT_DEVICES", set())
    _assert_matches_reference(_inputs((7, 6, 5), soft=False, masked=True, seed=4))
    _assert_matches_reference(_inputs((7, 6, 5), soft=True, masked=False, seed=5))


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "n_bins,overlap,levels",
    [(10, False, ()), (None, True, ()), (None, True, QUBIQ_LEVELS), (6, True, ())],
    ids=["calibration", "overlap", "overlap_levels", "both_no_levels"],
)
def test_parts_can_be_skipped(n_bins, overlap, levels, soft, chunking):
    inputs = _inputs((6, 5, 4), soft, masked=True, seed=6)
    sums = voxel_sums(inputs, n_bins=n_bins, overlap=overlap, levels=levels)
    assert (sums.top_label is None) == (n_bins is None) and (sums.overlap is None) == (not overlap)
    if n_bins is not None:
        _assert_sums_close(sums.top_label, top_label_bin_sums(inputs, n_bins), torch.float32)
        _assert_sums_close(sums.classwise, classwise_bin_sums(inputs, n_bins), torch.float32)
        _assert_sums_close(sums.squared_error, squared_error_sums(inputs), torch.float32)
        _assert_sums_close(sums.nll, nll_sums(inputs, 1e-7), torch.float32)
    if overlap:
        reference = overlap_sums(inputs, levels) if levels else overlap_sums(inputs, (0.5,))
        assert sums.overlap.thr_tp.shape == (2, 3, len(levels))
        for name in ("tp", "fp", "fn", "ref_mass", "pred_mass", "abs_diff"):
            _assert_sums_close(getattr(sums.overlap, name), getattr(reference, name), torch.float32)
        if levels:
            torch.testing.assert_close(sums.overlap.thr_tp, reference.thr_tp, rtol=0, atol=0)
            torch.testing.assert_close(sums.overlap.thr_pred, reference.thr_pred, rtol=0, atol=0)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_split_class_rows(soft, monkeypatch, chunking):
    """Class rows whose joint key would be too large are split into a bin row and a band row."""
    monkeypatch.setattr(voxel_layout, "MAX_JOINT_KEYS", 1)
    _assert_matches_reference(_inputs((7, 6, 5), soft, masked=True, seed=7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "levels,table",
    [
        (QUBIQ_LEVELS, True),
        (tuple(i / 21 for i in range(1, 21)), True),
        ((0.5,), False),
        ((0.1, 0.35, 0.6), False),
        ((0.1, 0.2, 0.3, 0.5, 0.5000001), False),  # cells small enough for one level each: too many
        ((1e-30, 1e-20, 1e-10, 0.25, 0.75), True),
    ],
)
def test_bands_equal_bucketize(levels, table, dtype):
    """Bands from bit patterns (one comparison per level, or the table) count the levels strictly below each
    value, also for values on, just above and just below every level, 0, -0.0, 1 and subnormals."""
    edges = torch.tensor(levels, dtype=dtype)
    special = torch.tensor([0.0, -0.0, 1.0, torch.finfo(dtype).tiny / 4, torch.finfo(dtype).tiny], dtype=dtype)
    around = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    values = torch.cat([special, around, torch.rand(5000, generator=torch.Generator().manual_seed(0), dtype=dtype)])
    bands = float_bits.bands(levels, dtype)
    assert (bands.table is not None) == table
    bits = float_bits.clean_bits(values, torch.empty(values.shape, dtype=bands.int_dtype))
    out = bands.into(bits, torch.empty_like(bits), torch.empty_like(bits))
    torch.testing.assert_close(out.long(), torch.bucketize(values, edges), rtol=0, atol=0)


@pytest.mark.parametrize("channels", [2, 3, 5])
def test_argmax_from_bit_patterns_keeps_the_first_of_ties(channels):
    """Few distinct values (0, 1/4, ..., 1, and -0.0) make ties frequent; torch.argmax returns the first maximum."""
    generator = torch.Generator().manual_seed(channels)
    values = torch.randint(0, 5, (2, channels, 500), generator=generator).float() / 4
    values[values == 0] = -0.0
    bits = float_bits.clean_bits(values, torch.empty(values.shape, dtype=torch.int32))
    work = ChunkWork(values, values.shape[-1])
    expected = values.argmax(1)
    maximum, index = float_bits.argmax_bits(bits, work, "test")
    torch.testing.assert_close(index.long(), expected, rtol=0, atol=0)
    torch.testing.assert_close(maximum.view(torch.float32), values.amax(1).abs(), rtol=0, atol=0)
    one_hot = float_bits.argmax_one_hot_bits(bits, work)
    expected_one_hot = torch.nn.functional.one_hot(expected, channels).movedim(-1, 1)
    torch.testing.assert_close(one_hot.long(), expected_one_hot, rtol=0, atol=0)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_excluded_voxels_may_hold_anything(soft, chunking):
    """NaN, values outside [0, 1] and ignore labels in masked-out voxels change nothing."""
    generator = torch.Generator().manual_seed(8)
    shape = (2, 3, 6, 5, 4)
    probs = torch.randn(shape, generator=generator).softmax(1)
    target = torch.randn(shape, generator=generator).softmax(1) if soft else torch.randint(0, 3, (2, 6, 5, 4))
    mask = torch.rand((2, 6, 5, 4), generator=generator) > 0.4
    dirty_probs, dirty_target = probs.clone(), target.clone()
    dirty_probs.movedim(1, -1)[~mask] = torch.tensor([float("nan"), 7.0, -1.0])
    if soft:
        dirty_target.movedim(1, -1)[~mask] = torch.tensor([float("nan"), 2.0, 0.0])
    else:
        dirty_target[~mask] = 255
    options = {"n_bins": 10, "overlap": True, "levels": QUBIQ_LEVELS}
    clean = voxel_sums(prepare_inputs(probs, target, mask, simplex=True), **options)
    dirty = voxel_sums(prepare_inputs(dirty_probs, dirty_target, mask, simplex=True), **options)
    for name in ("top_label", "classwise", "squared_error", "nll"):
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), rtol=0, atol=0)
    for name in ("tp", "fp", "fn", "pred_mass", "ref_mass", "abs_diff", "thr_tp", "thr_pred", "thr_ref"):
        torch.testing.assert_close(getattr(dirty.overlap, name), getattr(clean.overlap, name), rtol=0, atol=0)


def test_sums_stay_accurate_on_a_large_volume():
    """2**22 voxels: the float32 sums over chunks, added in float64, stay within 1e-6 of the exact sums (float64
    reference functions on the same values); the binned sums are float64 throughout (1e-12)."""
    generator = torch.Generator().manual_seed(9)
    n = 2**22
    # multiples of 1/1024: exact in float32, and binned and thresholded the same in float32 and float64
    foreground = torch.randint(0, 1025, (1, 1, 2048, n // 2048), generator=generator).float() / 1024
    probs = torch.cat([1 - foreground, foreground], dim=1)
    labels = (torch.rand(foreground[:, 0].shape, generator=generator) < foreground[:, 0]).long()
    inputs, exact = prepare_inputs(probs, labels, simplex=True), prepare_inputs(probs.double(), labels, simplex=True)
    sums = voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS)
    torch.testing.assert_close(sums.top_label, top_label_bin_sums(exact, 10), rtol=1e-12, atol=0)
    torch.testing.assert_close(sums.classwise, classwise_bin_sums(exact, 10), rtol=1e-12, atol=0)
    torch.testing.assert_close(sums.squared_error, squared_error_sums(exact), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums.nll, nll_sums(exact, 1e-7), rtol=1e-6, atol=0)
    reference = overlap_sums(exact, QUBIQ_LEVELS)
    for name in ("tp", "fp", "fn", "ref_mass", "thr_tp", "thr_pred", "thr_ref"):
        torch.testing.assert_close(getattr(sums.overlap, name), getattr(reference, name), rtol=0, atol=0)
    for name in ("pred_mass", "abs_diff"):
        torch.testing.assert_close(getattr(sums.overlap, name), getattr(reference, name), rtol=1e-6, atol=0)


def test_no_host_synchronisation(monkeypatch):
    """Nothing in the pass reads a tensor value on the host (on an accelerator that would wait for the device)."""
    inputs = _inputs((6, 5, 4), soft=True, masked=True)
    voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS)  # fills the offsets cache

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(voxel_pass, "_BINCOUNT_DEVICES", set())
    voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(2, 3, 6, 5, 4, generator=generator)).softmax(1)
    labels = torch.randint(0, 3, (2, 6, 5, 4), generator=generator)
    return probs, labels


@pytest.fixture
def deferred(monkeypatch):
    """Streaming metrics check values as on an accelerator: before their results, not inside update()."""
    monkeypatch.setattr(CalibrationMetrics, "_CHECK_NOW_DEVICES", ())
    monkeypatch.setattr(OverlapMetrics, "_CHECK_NOW_DEVICES", ())


@pytest.mark.parametrize("cls", [CalibrationMetrics, OverlapMetrics])
def test_deferred_checks_give_the_same_results(cls, monkeypatch):
    probs, labels = _batch()
    immediate = cls(num_classes=3)
    immediate.update(probs, labels, ["a", "b"])
    monkeypatch.setattr(cls, "_CHECK_NOW_DEVICES", ())
    later = cls(num_classes=3)
    later.update(probs, labels, ["a", "b"])
    assert later._pending_checks
    expected, actual = immediate.compute(), later.compute()
    assert not later._pending_checks
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, equal_nan=True, msg=key)


@pytest.mark.parametrize("cls", [CalibrationMetrics, OverlapMetrics])
def test_deferred_checks_report_bad_values_before_any_result(cls, deferred):
    probs, labels = _batch()
    metric = cls(num_classes=3)
    bad = probs.clone()
    bad[1, 0, 0, 0, 0] = float("nan")
    metric.update(probs, labels, ["good", "also_good"])
    metric.update(bad, labels, ["kidney_03", "kidney_07"])  # no error yet, and no crash in the binning
    for result in (metric.compute, metric.per_case):
        with pytest.raises(ValueError, match=r"probs contains NaN in image\(s\) 1 \(case 'kidney_07'\)"):
            result()
    with pytest.raises(ValueError, match="NaN"):  # reset clears the state, then reports the pending problem
        metric.reset()
    metric.update(probs, labels, ["a", "b"])
    metric.compute()  # clean again


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda p, l: (p * 3, l), r"probs must be probabilities in \[0, 1\]"),
        (lambda p, l: (p, l + 5), r"target labels must be in \[0, 2\] for 3 classes, got labels in \[5, 7\]"),
        (lambda p, l: (p, l - 9), r"target labels must be in \[0, 2\]"),
    ],
)
def test_deferred_checks_survive_out_of_range_values(corrupt, message, deferred):
    probs, labels = _batch()
    probs, labels = corrupt(probs, labels)
    for metric in (CalibrationMetrics(num_classes=3), OverlapMetrics(num_classes=3)):
        metric.update(probs, labels, ["a", "b"])
        with pytest.raises(ValueError, match=message):
            metric.compute()


def test_deferred_update_does_not_synchronise(deferred, monkeypatch):
    probs, labels = _batch()
    calibration, overlap = CalibrationMetrics(num_classes=3), OverlapMetrics(num_classes=3)
    calibration.update(probs, labels, ["a", "b"])  # fills the offsets cache
    overlap.update(probs, labels, ["a", "b"])

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(voxel_pass, "_BINCOUNT_DEVICES", set())
    calibration.update(probs, labels, ["c", "d"])
    overlap.update(probs, labels, ["c", "d"])
    monkeypatch.undo()
    assert len(calibration._pending_checks) == 2


def test_triton_kernel_takes_the_inputs_it_supports_on_cuda(monkeypatch):
    """On CUDA the Triton kernel replaces the chunked torch code when it supports the inputs (here the CPU stands
    in for CUDA and the kernel is a stub; the kernel itself is tested in test_fused_metrics_triton.py)."""
    import medjdt.metrics.fused_triton as fused_triton

    inputs = _inputs((6, 5, 4), soft=False, masked=True)
    calls = []
    monkeypatch.setattr(fused, "_TRITON_DEVICES", {"cpu"})
    monkeypatch.setattr(fused_triton, "triton_voxel_sums", lambda inputs, **options: calls.append(options) or "kernel")
    monkeypatch.setattr(fused_triton, "triton_supports", lambda inputs, levels: True)
    assert voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS, unchecked=True) == "kernel"
    assert calls == [{"n_bins": 10, "overlap": True, "levels": QUBIQ_LEVELS, "eps": 1e-7, "unchecked": True}]
    monkeypatch.setattr(fused_triton, "triton_supports", lambda inputs, levels: False)
    torch.testing.assert_close(voxel_sums(inputs, n_bins=10).classwise, classwise_bin_sums(inputs, 10))
    assert len(calls) == 1

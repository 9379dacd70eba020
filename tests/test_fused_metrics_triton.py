"""The Triton kernel of the one-pass metric sums against the torch path and the per-metric reference functions.

On a machine with CUDA the kernel runs on the GPU; without one it runs on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), which checks the same kernel code. Skipped when Triton is not
installed (it is optional: ``pip install triton``). The interpreter is slow, so most tests shrink the tiles
(``_ITERS``) to get several programs per image, with a ragged last block, out of a few hundred voxels.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (optional dependency: pip install triton)")

import medjdt.metrics.fused_triton as fused_triton  # noqa: E402
from medjdt.metrics import QUBIQ_LEVELS  # noqa: E402
from medjdt.metrics._checks import MetricInputs, prepare_inputs  # noqa: E402
from medjdt.metrics.calibration import (  # noqa: E402
    classwise_bin_sums,
    nll_sums,
    squared_error_sums,
    top_label_bin_sums,
)
from medjdt.metrics.fused import voxel_sums  # noqa: E402
from medjdt.metrics.fused_triton import triton_supports, triton_voxel_sums  # noqa: E402
from medjdt.metrics.overlap import overlap_sums  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
COUNTS = ("tp", "fp", "fn", "thr_tp", "thr_pred", "thr_ref")


@pytest.fixture
def small_tiles(monkeypatch):
    """Programs of 2 blocks of 128 voxels: the small volumes below span several programs per image."""
    monkeypatch.setattr(fused_triton, "_ITERS", 2)


def _inputs(spatial, soft, masked, channels=3, batch=2, seed=0, grid=None):
    """Validated float32 softmax probabilities; with ``grid`` rounded to multiples of 1/grid that sum to 1 (bin
    edges, levels, 0 and 1, and many argmax ties), and a soft reference on the same grid."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)

    def distribution():
        values = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).softmax(1)
        if grid is not None:
            rounded = (values[:, :-1] * grid).round() / grid
            values = torch.cat([rounded, 1 - rounded.sum(1, keepdim=True)], dim=1).clamp_min(0)
            values = values / values.sum(1, keepdim=True)  # exact: the sums are already 1 or (rarely) fixed up
        return values.float()

    probs = distribution()
    target = distribution() if soft else torch.randint(0, channels, (batch, *spatial), generator=generator)
    mask = torch.rand((batch, *spatial), generator=generator) > 0.3 if masked else None
    mask = None if mask is None else mask.to(DEVICE)
    return prepare_inputs(probs.to(DEVICE), target.to(DEVICE), mask, simplex=True)


def _close(actual, expected, rtol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _assert_same_sums(sums, expected, exact_accuracy):
    """``sums`` against another VoxelSums: counts exactly, float sums to float32 rounding."""
    for name in ("top_label", "classwise"):
        torch.testing.assert_close(getattr(sums, name)[0], getattr(expected, name)[0], rtol=0, atol=0, msg=name)
        if exact_accuracy:  # hard reference: the accuracy sums are counts
            torch.testing.assert_close(getattr(sums, name)[2], getattr(expected, name)[2], rtol=0, atol=0)
        _close(getattr(sums, name), getattr(expected, name))
    _close(sums.squared_error, expected.squared_error)
    _close(sums.nll, expected.nll)
    for name in COUNTS:
        torch.testing.assert_close(getattr(sums.overlap, name), getattr(expected.overlap, name), rtol=0, atol=0)
    for name in ("pred_mass", "ref_mass", "abs_diff"):
        _close(getattr(sums.overlap, name), getattr(expected.overlap, name))


def _assert_matches(inputs, n_bins=10, levels=QUBIQ_LEVELS, eps=1e-7, reference_inputs=None):
    """Triton sums against voxel_sums and against the reference functions of calibration.py and overlap.py
    (on ``reference_inputs`` when given: the same values in float32)."""
    sums = triton_voxel_sums(inputs, n_bins=n_bins, overlap=True, levels=levels, eps=eps)
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    torch_sums = voxel_sums(reference_inputs, n_bins=n_bins, overlap=True, levels=levels, eps=eps)
    _assert_same_sums(sums, torch_sums, exact_accuracy=not inputs.soft)

    top, classwise = top_label_bin_sums(reference_inputs, n_bins), classwise_bin_sums(reference_inputs, n_bins)
    torch.testing.assert_close(sums.top_label[0], top[0], rtol=0, atol=0)
    torch.testing.assert_close(sums.classwise[0], classwise[0], rtol=0, atol=0)
    _close(sums.top_label, top)
    _close(sums.classwise, classwise)
    _close(sums.squared_error, squared_error_sums(reference_inputs))
    _close(sums.nll, nll_sums(reference_inputs, eps))
    reference = overlap_sums(reference_inputs, levels)
    for name in COUNTS:
        torch.testing.assert_close(getattr(sums.overlap, name), getattr(reference, name), rtol=0, atol=0, msg=name)
    for name in ("pred_mass", "ref_mass", "abs_diff"):
        _close(getattr(sums.overlap, name), getattr(reference, name))
    return sums


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("spatial", [(23, 19), (9, 8, 7)], ids=["2d", "3d"])
def test_equals_torch_path_and_reference_functions(soft, masked, spatial, small_tiles):
    # 437 and 504 voxels per image: two programs of 256 voxels, the last block ragged
    _assert_matches(_inputs(spatial, soft, masked))


@pytest.mark.parametrize(
    "channels,n_bins,levels",
    [(2, 15, QUBIQ_LEVELS), (5, 10, ()), (3, 15, (0.25, 0.5, 0.75))],
    ids=["c2-m15-qubiq", "c5-m10-none", "c3-m15-quartiles"],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_other_classes_bins_and_levels(channels, n_bins, levels, soft, small_tiles):
    inputs = _inputs((8, 7, 6), soft, masked=True, channels=channels, seed=1)
    sums = _assert_matches(inputs, n_bins=n_bins, levels=levels, eps=1e-3)
    assert sums.overlap.thr_tp.shape == (2, channels, len(levels))


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_values_on_bin_edges_levels_and_argmax_ties(soft, small_tiles):
    """Probabilities on multiples of 1/20: exactly 0 and 1, on every bin edge k/10 and every QUBIQ level, and
    tied maxima (ties go to the lowest class, in the prediction and in the soft reference's majority class)."""
    inputs = _inputs((9, 8, 7), soft, masked=True, grid=20, seed=2)
    probs = inputs.probs
    assert (probs == 0).any() and (probs == 1).any() and (probs == 0.5).any() and (probs == 0.3).any()
    ties = (probs == probs.amax(1, keepdim=True)).sum(1) > 1
    assert ties.sum() > 20
    if soft:
        assert ((inputs.target == inputs.target.amax(1, keepdim=True)).sum(1) > 1).any()
    _assert_matches(inputs)
    _assert_matches(inputs, n_bins=4, levels=(0.25, 0.5, 0.75))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_half_precision_inputs(dtype, soft, small_tiles):
    """Half-precision probabilities (and soft reference) are read as float32: the sums equal those of the same
    values in float32."""
    reference = _inputs((9, 8, 7), soft, masked=True, seed=3)
    half = MetricInputs(
        probs=reference.probs.to(dtype),
        target=reference.target.to(dtype) if soft else reference.target,
        mask=reference.mask,
        soft=soft,
    )
    widened = MetricInputs(
        probs=half.probs.float(), target=half.target.float() if soft else half.target, mask=half.mask, soft=soft
    )
    _assert_matches(half, reference_inputs=widened)


def test_default_tiles():
    """The production tile (16 blocks of 128 voxels per program): one full program and a ragged one."""
    _assert_matches(_inputs((17, 16, 9), soft=False, masked=True, batch=1, seed=4))


def test_parts_can_be_skipped(small_tiles):
    inputs = _inputs((9, 8, 7), soft=False, masked=False, seed=5)
    calibration = triton_voxel_sums(inputs, n_bins=10)
    assert calibration.overlap is None
    torch.testing.assert_close(calibration.classwise[0], classwise_bin_sums(inputs, 10)[0], rtol=0, atol=0)
    overlap = triton_voxel_sums(inputs, overlap=True)
    assert overlap.top_label is None and overlap.classwise is None and overlap.nll is None
    assert overlap.squared_error is None and overlap.overlap.thr_tp.shape == (2, 3, 0)
    torch.testing.assert_close(overlap.overlap.tp, overlap_sums(inputs).tp, rtol=0, atol=0)
    nothing = triton_voxel_sums(inputs)
    assert nothing.top_label is None and nothing.overlap is None


def test_no_host_synchronisation(monkeypatch, small_tiles):
    """Nothing reads a tensor value on the host (on a GPU that would wait for the device)."""
    inputs = _inputs((9, 8, 7), soft=True, masked=True, seed=6)
    triton_voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS)  # fills the levels cache

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    triton_voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic, on purpose
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_unchecked_bad_values_are_counted_once_in_range(soft, small_tiles):
    """NaN, values outside [0, 1] and labels outside [0, C) (values a deferred check reports later) give wrong
    sums but every kept voxel still lands in exactly one bin, confusion cell and level cell."""
    good = _inputs((9, 8, 7), soft, masked=True, seed=7)
    probs, target = good.probs.clone(), good.target.clone()
    probs[0, 0, :5] = float("nan")
    probs[0, 1, 5:10] = 1.5
    probs[1, 2, :10] = -0.25
    probs[1, 0, 10:20] = float("inf")
    if soft:
        target[0, 1, :10] = float("nan")
        target[1, 0, :10] = 7.0
    else:
        target[0, :10] = -1
        target[1, 10:20] = 3
    inputs = MetricInputs(probs=probs, target=target, mask=good.mask, soft=soft)
    sums = triton_voxel_sums(inputs, n_bins=10, overlap=True, levels=QUBIQ_LEVELS, unchecked=True)
    kept = good.mask.sum(1).double()
    torch.testing.assert_close(sums.top_label[0].sum(-1), kept, rtol=0, atol=0)
    torch.testing.assert_close(sums.classwise[0].sum(-1), kept[:, None].expand(2, 3), rtol=0, atol=0)
    overlap = sums.overlap
    torch.testing.assert_close((overlap.tp + overlap.fp).sum(-1), kept, rtol=0, atol=0)
    torch.testing.assert_close((overlap.tp + overlap.fn).sum(-1), kept, rtol=0, atol=0)
    assert ((overlap.thr_pred >= 0) & (overlap.thr_pred <= kept[:, None, None])).all()


def test_rejects_what_the_kernel_cannot_read(monkeypatch):
    inputs = _inputs((6, 5, 4), soft=False, masked=True, seed=8)
    with pytest.raises(ValueError, match="float64"):
        triton_voxel_sums(MetricInputs(inputs.probs.double(), inputs.target, inputs.mask, False), n_bins=10)
    with pytest.raises(ValueError, match="hard labels"):
        triton_voxel_sums(MetricInputs(inputs.probs, inputs.target[:, :-1], inputs.mask, False), n_bins=10)
    with pytest.raises(ValueError, match="hard labels"):
        triton_voxel_sums(MetricInputs(inputs.probs, inputs.target.float(), inputs.mask, False), n_bins=10)
    with pytest.raises(ValueError, match="soft reference"):
        triton_voxel_sums(MetricInputs(inputs.probs, inputs.target, inputs.mask, True), n_bins=10)
    with pytest.raises(ValueError, match="mask"):
        triton_voxel_sums(MetricInputs(inputs.probs, inputs.target, inputs.mask.float(), False), n_bins=10)
    with pytest.raises(ValueError, match="classes"):
        many = MetricInputs(inputs.probs.repeat(1, 6, 1) / 6, inputs.target, inputs.mask, False)
        triton_voxel_sums(many, n_bins=10)
    with pytest.raises(ValueError, match="levels"):
        triton_voxel_sums(inputs, overlap=True, levels=[i / 17 for i in range(1, 17)])
    with pytest.raises(ValueError, match="levels"):
        triton_voxel_sums(inputs, overlap=True, levels=(0.5, 0.2))
    with pytest.raises(ValueError, match="n_bins"):
        triton_voxel_sums(inputs, n_bins=0)
    with pytest.raises(ValueError, match="eps"):
        triton_voxel_sums(inputs, n_bins=10, eps=0.0)
    cpu = MetricInputs(inputs.probs.cpu(), inputs.target.cpu(), inputs.mask.cpu(), False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        triton_voxel_sums(cpu, n_bins=10)


def test_supports():
    inputs = _inputs((6, 5, 4), soft=True, masked=False, seed=9)
    assert triton_supports(inputs, QUBIQ_LEVELS)
    assert not triton_supports(inputs, [i / 17 for i in range(1, 17)])
    assert not triton_supports(MetricInputs(inputs.probs.double(), inputs.target.double(), None, True))
    many = MetricInputs(inputs.probs.repeat(1, 6, 1) / 6, inputs.target.repeat(1, 6, 1) / 6, None, True)
    assert not triton_supports(many)


def test_thresholds_is_a_deprecated_name_of_levels(small_tiles):
    inputs = _inputs((6, 5, 4), soft=True, masked=True, seed=10)
    with pytest.warns(FutureWarning, match="^triton_voxel_sums: argument 'thresholds' is deprecated; use 'levels'$"):
        old = triton_voxel_sums(inputs, n_bins=10, overlap=True, thresholds=(0.25, 0.5))
    new = triton_voxel_sums(inputs, n_bins=10, overlap=True, levels=(0.25, 0.5))
    for name in COUNTS:
        torch.testing.assert_close(getattr(old.overlap, name), getattr(new.overlap, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match="give only 'levels'"):
        triton_voxel_sums(inputs, overlap=True, levels=(0.5,), thresholds=(0.25, 0.5))

"""The fused JDT path (medjdt.losses.fused and its fused_* modules) against the plain-torch reference path and
closed forms.

Agreement is checked for values and gradients in float32 (1e-5 relative) across variants, p, aggregations, masks,
hard and soft targets, 2D and 3D, and activations; gradcheck runs in float64. Small chunk sizes force many
chunks and a ragged last chunk, so the chunking itself is under test.
"""

import pytest
import torch

import medjdt.losses.fused_activation as fused_activation
import medjdt.losses.fused_chunks as fused_chunks
import medjdt.losses.fused_hard as fused_hard
import medjdt.losses.fused_soft as fused_soft
from medjdt.losses import JDTLoss, fused_cardinalities, hard_cardinalities, soft_cardinalities


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    if request.param == "many_chunks":
        monkeypatch.setitem(fused_chunks._CHUNK_ELEMENTS, "cpu", 64)
        monkeypatch.setattr(fused_chunks, "_MIN_CHUNK_VOXELS", 7)  # 7 does not divide the voxel counts below
    return request.param


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _case(spatial, hard, dtype=torch.float32, channels=3, batch=2, masked=True, seed=0, scale=3.0):
    generator = _generator(seed)
    shape = (batch, channels, *spatial)
    logits = scale * torch.randn(shape, generator=generator, dtype=dtype)
    if hard:
        target = torch.randint(0, channels, (batch, *spatial), generator=generator)
    else:
        target = torch.softmax(3 * torch.randn(shape, generator=generator, dtype=dtype), dim=1)
    mask = torch.rand((batch, *spatial), generator=generator) > 0.3 if masked else None
    return logits, target, mask


def _value_and_grad(loss_fn, logits, target, mask):
    logits = logits.detach().clone().requires_grad_()
    value = loss_fn(logits, target, mask)
    value.backward()
    return value.detach(), logits.grad


def _assert_fused_matches_reference(options, logits, target, mask, rtol=1e-5):
    fused_value, fused_grad = _value_and_grad(JDTLoss(**options), logits, target, mask)
    reference_value, reference_grad = _value_and_grad(JDTLoss(fused=False, **options), logits, target, mask)
    torch.testing.assert_close(fused_value, reference_value, rtol=rtol, atol=0)
    assert fused_grad.dtype == logits.dtype
    # relative to the largest gradient entry: single entries may be ~0
    scale = reference_grad.abs().max()
    torch.testing.assert_close(fused_grad, reference_grad, rtol=rtol, atol=rtol * scale)


OPTIONS = [
    {},
    {"alpha": 0.5, "beta": 0.5, "variant": 2},
    {"p": 2, "aggregation": "image"},
    {"p": 1.5, "aggregation": "class", "active_classes": "present"},
    {"aggregation": {"dataset": 0.5, "image": 0.3, "class": 0.2}, "log_loss": True, "gamma": 1.5},
    {"activation": "sigmoid", "class_weights": [1.0, 2.0, 0.5], "include_background": False},
    {"activation": "sigmoid", "variant": 2, "alpha": 0.3, "beta": 0.9, "aggregation": "image"},
    {"p": 2, "active_classes": "present", "smooth": 0.0, "aggregation": "class"},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("spatial", [(9, 11), (5, 6, 7)], ids=["2d", "3d"])
def test_fused_equals_reference_float32(options, hard, spatial, chunking):
    logits, target, mask = _case(spatial, hard)
    _assert_fused_matches_reference(options, logits, target, mask)
    _assert_fused_matches_reference(options, logits, target, None)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("options", [{}, {"p": 2}, {"variant": 2}])
def test_fused_equals_reference_on_probabilities(hard, options, chunking):
    """``activation=None`` (the functional :func:`jdt_loss` on a student's probabilities)."""
    logits, target, mask = _case((6, 5, 4), hard)
    probs = torch.softmax(logits, dim=1)
    _assert_fused_matches_reference({"activation": None, **options}, probs, target, mask)


def test_large_logits_take_the_shifted_softmax_and_still_agree(chunking):
    """Logits beyond the range where exp cannot overflow need the per-voxel maximum subtracted."""
    logits, target, mask = _case((6, 5, 4), hard=False, scale=60.0)
    assert logits.abs().max() > fused_activation._SAFE_EXP
    _assert_fused_matches_reference({}, logits, target, mask)
    logits, labels, _ = _case((6, 5, 4), hard=True, scale=60.0)
    _assert_fused_matches_reference({"p": 2}, logits, labels, mask)


def test_ignore_index_and_binary_single_channel(chunking):
    logits, labels, mask = _case((8, 7), hard=True, seed=3)
    labels[:, 0] = 255
    _assert_fused_matches_reference({"ignore_index": 255, "aggregation": "image"}, logits, labels, mask)
    binary_logits = logits[:, :1]
    foreground = (labels == 1).long()
    _assert_fused_matches_reference({"activation": "sigmoid"}, binary_logits, foreground, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_half_precision_logits(dtype, hard):
    logits, target, mask = _case((6, 5, 4), hard, seed=4)
    if not hard:
        target = target.to(dtype)
    _assert_fused_matches_reference({}, logits.to(dtype), target, mask, rtol=1e-3)


def test_non_contiguous_logits():
    logits, target, mask = _case((6, 5, 4), hard=False, seed=5)
    channels_last = logits.contiguous(memory_format=torch.channels_last_3d)
    assert not channels_last.is_contiguous()
    _assert_fused_matches_reference({}, channels_last, target, mask)


@pytest.mark.parametrize(
    "options,hard",
    [
        ({}, False),
        ({}, True),
        ({"variant": 2, "aggregation": "class", "active_classes": "present"}, False),
        ({"p": 2, "aggregation": "image"}, True),
        ({"p": 1.5, "log_loss": True}, False),
        ({"p": 1.5, "log_loss": True}, True),
        ({"activation": "sigmoid", "include_background": False}, False),
        ({"activation": "sigmoid", "p": 2}, True),
    ],
)
def test_gradcheck_float64_many_chunks(options, hard, monkeypatch):
    monkeypatch.setitem(fused_chunks._CHUNK_ELEMENTS, "cpu", 32)
    monkeypatch.setattr(fused_chunks, "_MIN_CHUNK_VOXELS", 5)
    logits, target, mask = _case((4, 3, 3), hard, dtype=torch.float64, seed=6, scale=1.0)
    logits.requires_grad_()
    loss_fn = JDTLoss(**options)
    if hard:
        assert torch.autograd.gradcheck(lambda x: loss_fn(x, target, mask), (logits,))
    else:
        # the soft target is differentiable too (e.g. a teacher's probabilities that are being trained); keep it
        # away from 0 and 1 so that gradcheck's perturbations stay valid
        target = (0.1 + 0.8 * target).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: loss_fn(x, y, mask), (logits, target))


def test_gradcheck_float64_probabilities(monkeypatch):
    monkeypatch.setitem(fused_chunks._CHUNK_ELEMENTS, "cpu", 32)
    monkeypatch.setattr(fused_chunks, "_MIN_CHUNK_VOXELS", 5)
    _, target, mask = _case((5, 4), hard=False, dtype=torch.float64, seed=7)
    probs = torch.softmax(torch.randn(target.shape, generator=_generator(8), dtype=torch.float64), 1)
    probs.requires_grad_()
    loss_fn = JDTLoss(activation=None, p=2, aggregation="image")
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, target, mask), (probs,))


def test_cardinalities_equal_closed_forms(chunking):
    """p = 1: TP = sum min(x, y) (variant 1) or sum x*y (variant 2), FP = sum (x - y)+, FN = sum (y - x)+."""
    logits, soft, mask = _case((7, 6, 5), hard=False, dtype=torch.float64, seed=9)
    x = torch.softmax(logits, dim=1) * mask[:, None]
    y = soft * mask[:, None]
    dims = (2, 3, 4)
    fp, fn = (x - y).clamp_min(0).sum(dims), (y - x).clamp_min(0).sum(dims)
    expected = {1: (torch.minimum(x, y).sum(dims), fp, fn), 2: ((x * y).sum(dims), fp, fn)}
    for variant, (tp, fp, fn) in expected.items():
        got = fused_cardinalities(logits, soft, mask, variant=variant)
        for value, reference in zip(got, (tp, fp, fn)):
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_hard_cardinalities_equal_one_hot_soft_cardinalities(p, chunking):
    logits, labels, mask = _case((7, 6, 5), hard=True, dtype=torch.float64, seed=10)
    one_hot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).to(torch.float64)
    probs = torch.sigmoid(logits)
    expected = soft_cardinalities(probs, one_hot, mask, p=p)
    for got in (
        fused_cardinalities(logits, labels, mask, activation="sigmoid", p=p),
        hard_cardinalities(probs, labels, mask, p=p),
    ):
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


@pytest.fixture
def kept_probs(monkeypatch):
    """The buffers that forward allocates to keep the probabilities in (None: backward recomputes them)."""
    kept = []
    allocate = fused_activation.probs_buffer
    for module in (fused_soft, fused_hard):
        monkeypatch.setattr(module, "probs_buffer", lambda *args: kept.append(allocate(*args)) or kept[-1])
    return kept


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_backward_keeps_no_voxel_sized_tensor_besides_the_inputs(hard, kept_probs):
    """Everything autograd saves for the fused backward is an input (logits, target, mask), not probabilities; the
    probabilities forward keeps for backward live in the memory that backward returns as the logits' gradient."""
    logits, target, mask = _case((8, 8, 8), hard, seed=11)
    logits.requires_grad_()
    inputs = [logits, target, mask]
    voxels = mask.numel()

    JDTLoss()(logits, target, mask).backward()
    (buffer,) = kept_probs
    assert buffer.untyped_storage().data_ptr() == logits.grad.untyped_storage().data_ptr()

    def saved_tensors_of(loss_fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss_fn(logits, target, mask)
        return [t for t in saved if t.numel() >= voxels]

    def is_input(tensor):
        return any(tensor.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs)

    assert all(is_input(t) for t in saved_tensors_of(JDTLoss()))
    # the reference path saves the probabilities: the check above can fail
    assert not all(is_input(t) for t in saved_tensors_of(JDTLoss(fused=False)))


def test_no_grad_forward_and_loss_without_graph(kept_probs):
    logits, target, mask = _case((6, 5, 4), hard=False, seed=12)
    with torch.no_grad():
        value = JDTLoss()(logits.requires_grad_(), target, mask)
    assert not value.requires_grad
    assert kept_probs == [None]  # no backward will come: nothing voxel-sized is allocated
    assert value.item() == pytest.approx(JDTLoss(fused=False)(logits, target, mask).item(), rel=1e-5)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_second_backward_through_a_retained_graph_gives_the_same_gradient(hard, chunking):
    # the first backward overwrites the kept probabilities with the gradient; the second recomputes them
    logits, target, mask = _case((7, 6, 5), hard, seed=13)
    logits.requires_grad_()
    loss = JDTLoss(aggregation="image")(logits, target, mask)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, _value_and_grad(JDTLoss(aggregation="image", fused=False), logits, target,
                                                      mask)[1], rtol=1e-5, atol=1e-7)


def test_fused_cardinalities_validates_inputs():
    logits, labels, _ = _case((6, 5), hard=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_cardinalities(logits, labels, activation="relu")
    with pytest.raises(ValueError, match="variant=2 is defined for p=1 only"):
        fused_cardinalities(logits, labels, p=2, variant=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fused_cardinalities(logits.clone().fill_(float("nan")), labels)
    with pytest.raises(ValueError, match="class index 5 outside"):
        fused_cardinalities(logits, labels.clone().fill_(5))

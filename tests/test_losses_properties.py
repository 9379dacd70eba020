"""Properties of the JDT losses: (semi)metric axioms, the soft-label minimiser, gradients and low precision."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss, JDTLoss, jdt_loss

JML = {"alpha": 1.0, "beta": 1.0}
DML = {"alpha": 0.5, "beta": 0.5}


def _vector(values):
    """A probability vector as a (1, 1, n, 1) one-class image."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, -1, 1)


def _distance(x, y, weights, variant=1):
    return jdt_loss(_vector(x), _vector(y), smooth=0.0, variant=variant, **weights).item()


def _random_probs(shape, seed):
    return torch.softmax(2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 1)


@pytest.mark.parametrize("weights", [JML, DML])
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("aggregation", ["dataset", "image", "class"])
def test_reflexive_zero_exactly_at_the_target(weights, variant, aggregation):
    shape = (2, 3, 6, 5, 4)
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.softmax(logits, dim=1)
    loss = JDTLoss(smooth=0.0, variant=variant, aggregation=aggregation, **weights)
    assert loss(logits, target).item() == pytest.approx(0.0, abs=1e-12)
    other = _random_probs(shape, seed=1)
    assert loss(logits, other).item() > 1e-3


@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12),
    st.sampled_from([JML, DML]),
    st.sampled_from([1, 2]),
)
@settings(max_examples=150, deadline=None)
def test_symmetric(pairs, weights, variant):
    x, y = (list(v) for v in zip(*pairs))
    assert _distance(x, y, weights, variant) == pytest.approx(_distance(y, x, weights, variant), abs=1e-12)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_jaccard_metric_loss_satisfies_triangle_inequality(triples):
    x, y, z = (list(v) for v in zip(*triples))
    assert _distance(x, z, JML) <= _distance(x, y, JML) + _distance(y, z, JML) + 1e-12


def test_dice_semimetric_loss_violates_triangle_inequality():
    x, y, z = [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]
    # DML(x, z) = 1 - 0 = 1;  DML(x, y) = DML(y, z) = 1 - 2*1 / (2*1 + 1) = 1/3
    assert _distance(x, z, DML) == pytest.approx(1.0)
    assert _distance(x, y, DML) == pytest.approx(1 / 3)
    assert _distance(y, z, DML) == pytest.approx(1 / 3)
    assert _distance(x, z, DML) > _distance(x, y, DML) + _distance(y, z, DML)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12), st.sampled_from([JML, DML]))
@settings(max_examples=100, deadline=None)
def test_nonnegative_and_zero_only_for_equal_inputs(pairs, weights):
    x, y = (list(v) for v in zip(*pairs))
    distance = _distance(x, y, weights)
    assert distance >= -1e-12
    if max(abs(a - b) for a, b in pairs) > 1e-6:
        assert distance > 0


@pytest.mark.parametrize("loss_cls", [JaccardMetricLoss, DiceSemimetricLoss])
def test_soft_label_half_is_best_matched_by_half(loss_cls):
    """For y = 0.5 the soft-label losses prefer x = 0.5; the classic 1 - 2<x,y>/(|x|+|y|) prefers x = 1."""
    target = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    loss = loss_cls(activation=None, smooth=0.0)
    candidates = torch.linspace(0, 1, 21, dtype=torch.float64)
    ours = torch.stack([loss(torch.full_like(target, float(c)), target) for c in candidates])
    classic = torch.stack([1 - 2 * (c * target).sum() / (c * target.numel() + target.sum()) for c in candidates])
    assert candidates[ours.argmin()].item() == pytest.approx(0.5)
    assert candidates[classic.argmin()].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "options",
    [
        {"aggregation": "dataset"},
        {"aggregation": "image", "active_classes": "present", "p": 2},
        {"aggregation": "class", "active_classes": "present", "variant": 2, "alpha": 0.3, "beta": 0.9},
        {"aggregation": {"dataset": 0.5, "image": 0.3, "class": 0.2}, "log_loss": True, "gamma": 1.5, "p": 1.5},
        {"activation": "sigmoid", "class_weights": [1.0, 2.0, 0.5], "include_background": False},
    ],
)
@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_float64(options, hard):
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 3, 3)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.rand((2, 4, 3, 3), generator=generator) > 0.25
    if hard:
        target = torch.randint(0, 3, (2, 4, 3, 3), generator=generator)
        target[0, 0] = 1  # at least one voxel per class in the first image
        target[0, 1] = 2
        inputs = (logits,)

        def fn(x):
            return JDTLoss(**options)(x, target, mask)
    else:
        target = _random_probs(shape, seed=4).requires_grad_()
        inputs = (logits, target)

        def fn(x, y):
            return JDTLoss(**options)(x, y, mask)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_functional_on_probabilities_2d():
    probs = _random_probs((2, 3, 5, 4), seed=5).requires_grad_()
    target = _random_probs((2, 3, 5, 4), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: jdt_loss(x, y, aggregation="image"), (probs, target))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hard", [False, True])
def test_finite_under_autocast_and_close_to_float32(dtype, hard):
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(4, 3, kernel_size=1)
    image = torch.randn(2, 4, 16, 16, 16, generator=generator) * 30  # large logits stress low precision
    if hard:
        target = torch.randint(0, 3, (2, 16, 16, 16), generator=generator)
    else:
        target = _random_probs((2, 3, 16, 16, 16), seed=7).float()
    loss_fn = DiceSemimetricLoss()
    with torch.autocast("cpu", dtype=dtype):
        logits = conv(image)
        loss = loss_fn(logits, target)
    assert logits.dtype == dtype
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    # the sums ran in float32: only the rounding of the logits separates it from the float32 result
    reference = loss_fn(logits.detach().float(), target)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)


def test_half_logits_without_autocast_give_float32_loss():
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).half()
    target = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    loss = JaccardMetricLoss()(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(JaccardMetricLoss()(logits.float(), target).item(), abs=1e-6)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_loss_decreases_when_optimised(spatial):
    """A few gradient steps on free logits move the prediction towards a soft target."""
    target = _random_probs((2, 3, *spatial), seed=8).float()
    logits = torch.zeros((2, 3, *spatial), requires_grad=True)
    loss_fn = JaccardMetricLoss(smooth=0.0)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    first = loss_fn(logits, target).item()
    for _ in range(50):
        optimiser.zero_grad()
        loss_fn(logits, target).backward()
        optimiser.step()
    assert loss_fn(logits, target).item() < 0.2 * first

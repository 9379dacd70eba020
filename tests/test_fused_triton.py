"""The Triton kernels of the fused JDT path against the plain-torch reference path.

On a machine with CUDA the kernels run on the GPU; without one they run on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1``, set by conftest.py), which checks the same kernel code. Skipped when
Triton is not installed (it is optional: ``pip install triton``).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (optional dependency: pip install triton)")

import medjdt.losses.fused as fused  # noqa: E402
from medjdt.losses import JDTLoss  # noqa: E402
from medjdt.losses.fused_triton import TritonSums  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def triton_path(monkeypatch):
    """Route the fused path through the Triton kernels (also for CPU tensors) and count the launches."""
    monkeypatch.setattr(fused, "_TRITON_DEVICES", {DEVICE.type})
    calls = []
    apply = TritonSums.apply

    def counted(*args):
        calls.append(args[3:])
        return apply(*args)

    monkeypatch.setattr(TritonSums, "apply", counted)
    return calls


def _case(spatial, hard, channels=3, masked=True, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, channels, *spatial)
    logits = 3 * torch.randn(shape, generator=generator)
    if hard:
        target = torch.randint(0, channels, (2, *spatial), generator=generator)
    else:
        target = torch.softmax(3 * torch.randn(shape, generator=generator), dim=1)
    mask = torch.rand((2, *spatial), generator=generator) > 0.3 if masked else None
    return logits.to(dtype).to(DEVICE), target.to(DEVICE), None if mask is None else mask.to(DEVICE)


def _value_and_grad(loss_fn, logits, target, mask):
    logits = logits.detach().clone().requires_grad_()
    value = loss_fn(logits, target, mask)
    value.backward()
    return value.detach(), logits.grad


def _assert_matches_reference(options, logits, target, mask, rtol=1e-5):
    value, grad = _value_and_grad(JDTLoss(**options), logits, target, mask)
    reference_value, reference_grad = _value_and_grad(JDTLoss(fused=False, **options), logits, target, mask)
    torch.testing.assert_close(value, reference_value, rtol=rtol, atol=0)
    assert grad.dtype == logits.dtype
    scale = reference_grad.abs().max()
    torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"p": 2, "aggregation": "image"},
        {"variant": 2, "alpha": 0.5, "beta": 0.5, "aggregation": "class", "active_classes": "present"},
        {"activation": "sigmoid", "include_background": False},
        {"activation": "sigmoid", "p": 2, "log_loss": True},
    ],
)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_kernels_equal_reference(options, hard, triton_path):
    # 1100 voxels: two full blocks of 512 and a ragged one
    logits, target, mask = _case((11, 10, 10), hard)
    _assert_matches_reference(options, logits, target, mask)
    assert triton_path, "the Triton kernels were not used"


@pytest.mark.parametrize("channels", [2, 5])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_other_class_counts_2d_and_no_mask(channels, hard, triton_path):
    logits, target, mask = _case((23, 17), hard, channels=channels, masked=False, seed=1)
    _assert_matches_reference({"aggregation": {"dataset": 0.5, "image": 0.5}}, logits, target, mask)
    assert triton_path


def test_probabilities_without_activation(triton_path):
    logits, target, mask = _case((9, 8, 7), hard=False, seed=2)
    _assert_matches_reference({"activation": None}, torch.softmax(logits, dim=1), target, mask)
    assert triton_path


def test_half_precision_logits(triton_path):
    logits, target, mask = _case((9, 8, 7), hard=True, seed=3, dtype=torch.float16)
    _assert_matches_reference({}, logits, target, mask, rtol=1e-3)
    assert triton_path


def test_cases_outside_the_kernels_use_the_torch_path(triton_path):
    logits, target, mask = _case((6, 5, 4), hard=False, seed=4)
    _assert_matches_reference({"p": 1.5}, logits, target, mask)  # p not in (1, 2)
    target = target.clone().requires_grad_()  # a trained soft target needs its gradient
    JDTLoss()(logits, target, mask).backward()
    assert target.grad is not None
    assert not triton_path

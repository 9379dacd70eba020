"""Tests for medjdt.labels.teacher_targets against scipy's softmax."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from medjdt.labels import teacher_targets


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 4, 3, 4, 5)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_matches_scipy_softmax(shape, temperature):
    logits = np.random.default_rng(0).normal(scale=3.0, size=shape)
    out = teacher_targets(torch.from_numpy(logits), temperature)
    assert out.dtype == torch.float32 and out.shape == shape
    np.testing.assert_allclose(out.numpy(), softmax(logits / temperature, axis=1), atol=1e-6)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, atol=1e-6)


def test_detached_and_temperature_flattens():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = teacher_targets(logits * 2.0)
    assert not out.requires_grad and out.grad_fn is None
    hot = teacher_targets(logits.detach(), 0.25)
    warm = teacher_targets(logits.detach(), 1.0)
    flat = teacher_targets(logits.detach(), 1e6)
    assert (hot.amax(1) >= warm.amax(1) - 1e-6).all()
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("logits", "temperature", "match"),
    [
        (torch.zeros(1, 2, 4, 4), 0.0, "temperature"),
        (torch.zeros(1, 2, 4, 4), float("inf"), "temperature"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.long), 1.0, "floating point"),
        (torch.zeros(1, 1, 4, 4), 1.0, "C >= 2"),
        (torch.zeros(2, 4), 1.0, "2 or 3 spatial dims"),
        (torch.full((1, 2, 4, 4), float("nan")), 1.0, "NaN"),
    ],
)
def test_bad_input_raises(logits, temperature, match):
    with pytest.raises(ValueError, match=match):
        teacher_targets(logits, temperature)

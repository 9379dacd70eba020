"""Tests for medjdt.labels.smooth_labels (closed forms and a scipy.ndimage reference for boundaries)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from medjdt.labels import smooth_labels


def _one_hot(labels, num_classes):
    """(B, *spatial) int -> (B, C, *spatial) float32."""
    return np.stack([(labels == c) for c in range(num_classes)], axis=1).astype(np.float32)


def _boundary_reference(labels, kernel_size):
    """True where the k-neighbourhood (clipped at the border) holds another label, per image."""
    size = (1,) + (kernel_size,) * (labels.ndim - 1)
    high = ndimage.maximum_filter(labels, size=size, mode="nearest")
    low = ndimage.minimum_filter(labels, size=size, mode="nearest")
    return high != low


def _blobs(shape, seed):
    """Hard labels (B, *spatial) with 3 classes made of boxes, so there is interior and boundary."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    for b in range(shape[0]):
        for c in (1, 2):
            lo = [int(rng.integers(0, s // 2)) for s in shape[1:]]
            hi = [int(rng.integers(l + 2, s)) for l, s in zip(lo, shape[1:])]
            labels[(b, *[slice(l, h) for l, h in zip(lo, hi)])] = c
    return labels


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5, 1.0])
def test_uniform_closed_form(epsilon):
    labels = _blobs((2, 12, 10), seed=0)
    y = _one_hot(labels, 3)
    out = smooth_labels(torch.from_numpy(labels), epsilon, num_classes=3)
    np.testing.assert_allclose(out.numpy(), (1 - epsilon) * y + epsilon / 3, atol=1e-7)
    soft = np.random.default_rng(1).dirichlet(np.ones(3), size=(2, 12, 10)).transpose(0, 3, 1, 2)
    out = smooth_labels(torch.from_numpy(soft.astype(np.float32)), epsilon)
    np.testing.assert_allclose(out.numpy(), (1 - epsilon) * soft + epsilon / 3, atol=1e-6)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize(("shape", "kernel_size"), [((2, 14, 13), 3), ((2, 14, 13), 5), ((2, 10, 9, 8), 3)])
def test_boundary_mode_matches_neighbourhood_reference(shape, kernel_size):
    epsilon, num_classes = 0.2, 3
    labels = _blobs(shape, seed=kernel_size)
    boundary = _boundary_reference(labels, kernel_size)
    assert boundary.any() and (~boundary).any()
    out = smooth_labels(torch.from_numpy(labels), epsilon, "boundary", kernel_size, num_classes=num_classes).numpy()
    y = _one_hot(labels, num_classes)
    expected = np.where(boundary[:, None], (1 - epsilon) * y + epsilon / num_classes, y)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    # On the true class: (1 - eps) + eps / C at the boundary, 1 inside.
    true_class = np.take_along_axis(out, labels[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(true_class[boundary], (1 - epsilon) + epsilon / num_classes, atol=1e-7)
    assert np.all(true_class[~boundary] == 1.0)
    # The one-hot input gives the same result as the hard labels.
    out_one_hot = smooth_labels(torch.from_numpy(y), epsilon, "boundary", kernel_size).numpy()
    np.testing.assert_array_equal(out_one_hot, out)


def test_boundary_two_region_3d_closed_form():
    labels = np.zeros((1, 6, 6, 6), np.int64)
    labels[:, 3:] = 1  # a plane between slices 2 and 3
    out = smooth_labels(torch.from_numpy(labels), 0.3, "boundary", num_classes=2).numpy()
    for z in range(6):
        expected_fg = (1 - 0.3) * (z >= 3) + 0.15 if z in (2, 3) else float(z >= 3)
        np.testing.assert_allclose(out[0, 1, z], expected_fg, atol=1e-7)


def test_boundary_soft_target_only_where_the_target_varies():
    soft = np.zeros((1, 3, 8, 8), np.float32)
    soft[:, 1] = 0.5
    soft[:, 1, :, 5:] = 0.75  # a step inside a soft region; class 2 stays 0
    soft[:, 0] = 1 - soft[:, 1]
    out = smooth_labels(torch.from_numpy(soft), 0.2, "boundary").numpy()
    changed = np.any(out != soft, axis=1)[0]
    expected = np.zeros((8, 8), bool)
    expected[:, 4:6] = True
    np.testing.assert_array_equal(changed, expected)


def test_ignore_mask():
    labels = np.zeros((1, 9, 9), np.int64)
    labels[:, :, 5:] = 1
    ignore = np.zeros((1, 9, 9), bool)
    ignore[:, 0, :] = True
    y = _one_hot(labels, 2)
    uniform = smooth_labels(torch.from_numpy(labels), 0.2, ignore_mask=torch.from_numpy(ignore), num_classes=2)
    np.testing.assert_array_equal(uniform.numpy()[:, :, 0], y[:, :, 0])
    np.testing.assert_allclose(uniform.numpy()[:, :, 1:], 0.8 * y[:, :, 1:] + 0.1, atol=1e-7)

    boundary = smooth_labels(
        torch.from_numpy(labels), 0.2, "boundary", ignore_mask=torch.from_numpy(ignore), num_classes=2
    )
    changed = np.any(boundary.numpy() != y, axis=1)[0]
    expected = np.zeros((9, 9), bool)
    expected[2:, 4:6] = True  # rows 0 (ignored) and 1 (next to ignored) stay unchanged
    np.testing.assert_array_equal(changed, expected)


def test_kernel_size_one_and_epsilon_zero_leave_target_unchanged():
    labels = _blobs((1, 8, 8, 8), seed=3)
    y = _one_hot(labels, 3)
    np.testing.assert_array_equal(smooth_labels(torch.from_numpy(labels), 0.4, "boundary", 1, num_classes=3).numpy(), y)
    np.testing.assert_array_equal(smooth_labels(torch.from_numpy(y), 0.0, "boundary").numpy(), y)


def test_input_not_modified_and_float32_out():
    y = torch.from_numpy(_one_hot(_blobs((1, 8, 8), seed=4), 3)).double()
    before = y.clone()
    out = smooth_labels(y, 0.1, "boundary")
    assert out.dtype == torch.float32 and out.shape == y.shape
    assert torch.equal(y, before)


@pytest.mark.parametrize("epsilon", [-0.1, 1.5, float("nan"), "0.1"])
def test_epsilon_outside_unit_interval_raises(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        smooth_labels(torch.zeros(1, 4, 4, dtype=torch.long), epsilon, num_classes=2)


def test_bad_input_raises():
    hard = torch.zeros(1, 4, 4, dtype=torch.long)
    soft = torch.full((1, 2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="need num_classes"):
        smooth_labels(hard, 0.1)
    with pytest.raises(ValueError, match="label 2 outside"):
        smooth_labels(hard + 2, 0.1, num_classes=2)
    with pytest.raises(ValueError, match="label smoothing: mode must be one of"):
        smooth_labels(soft, 0.1, "gaussian")
    with pytest.raises(ValueError, match="kernel_size"):
        smooth_labels(soft, 0.1, "boundary", 4)
    with pytest.raises(ValueError, match="sum to 1"):
        smooth_labels(soft * 1.5 - 0.2, 0.1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        smooth_labels(torch.stack([soft[:, 0] + 1, soft[:, 1] - 1], 1), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        smooth_labels(torch.full((1, 2, 4, 4), float("nan")), 0.1)
    with pytest.raises(ValueError, match="2 channels but num_classes=3"):
        smooth_labels(soft, 0.1, num_classes=3)
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        smooth_labels(torch.full((1, 2, 4), 0.5), 0.1)
    with pytest.raises(ValueError, match="ignore_mask has shape"):
        smooth_labels(soft, 0.1, ignore_mask=torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        smooth_labels(soft, 0.1, ignore_mask=torch.zeros(1, 4, 4))

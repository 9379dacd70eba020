"""Tests for medjdt.labels.fuse against SimpleITK, scipy and hand-worked cases."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from scipy import stats

from medjdt.labels import FUSION_METHODS, fuse
from medjdt.labels.staple import MAX_ITERATIONS


def _random_stack(seed, num_raters, shape, num_classes):
    return np.random.default_rng(seed).integers(0, num_classes, (num_raters, *shape)).astype(np.uint8)


def _sitk_images(stack):
    return [sitk.GetImageFromArray(m.astype(np.uint8)) for m in stack]


def _one_hot(labels, num_classes):
    return np.stack([(labels == c) for c in range(num_classes)]).astype(np.float32)


# ---------------------------------------------------------------- majority


@pytest.mark.parametrize("shape", [(17, 13), (9, 8, 7)])
@pytest.mark.parametrize("num_raters", [2, 3, 4, 7])
def test_majority_binary_equals_sitk_label_voting(shape, num_raters):
    stack = _random_stack(num_raters, num_raters, shape, 2)
    # Ties go to background; LabelVoting is given the same tie value.
    reference = sitk.GetArrayFromImage(sitk.LabelVoting(_sitk_images(stack), 0))
    fused = fuse(stack, "majority", 2).numpy()
    np.testing.assert_array_equal(fused, _one_hot(reference, 2))


@pytest.mark.parametrize("shape", [(16, 15), (8, 9, 10)])
@pytest.mark.parametrize(("num_raters", "num_classes"), [(3, 3), (4, 4), (7, 3), (5, 6)])
def test_majority_multiclass_equals_label_voting_and_lowest_mode(shape, num_raters, num_classes):
    stack = _random_stack(10 * num_raters + num_classes, num_raters, shape, num_classes)
    undecided = num_classes  # a value no rater uses marks LabelVoting's ties
    voted = sitk.GetArrayFromImage(sitk.LabelVoting(_sitk_images(stack), undecided))
    fused = fuse(stack, "majority", num_classes).numpy()
    labels = fused.argmax(0)
    assert np.all(fused.sum(0) == 1) and set(np.unique(fused)) <= {0.0, 1.0}
    decided = voted != undecided
    assert (~decided).any(), "the random stack should contain ties"
    np.testing.assert_array_equal(labels[decided], voted[decided])
    # scipy's mode returns the smallest of tied values: the documented tie rule.
    np.testing.assert_array_equal(labels, stats.mode(stack, axis=0, keepdims=False).mode)


# ---------------------------------------------------------------- staple


def _noisy_truth_stack(seed, num_raters, shape, num_classes, flip=0.15):
    """Raters = a box-shaped truth with a fraction ``flip`` of voxels relabelled at random."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        truth[tuple(slice(c * s // (2 * num_classes), s - c * s // (2 * num_classes)) for s in shape)] = c
    noise = rng.integers(0, num_classes, (num_raters, *shape))
    return np.where(rng.random((num_raters, *shape)) < flip, noise, truth[None]).astype(np.uint8)


def _sitk_staple(masks):
    """Unlimited-iteration SimpleITK STAPLE; asserts it converged below medjdt's iteration cap."""
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    probability = sitk.GetArrayFromImage(staple.Execute(_sitk_images(masks)))
    assert staple.GetElapsedIterations() < MAX_ITERATIONS
    return probability


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 9)])
@pytest.mark.parametrize("num_raters", [2, 3, 5])
def test_staple_binary_equals_sitk_staple(shape, num_raters):
    stack = _noisy_truth_stack(num_raters, num_raters, shape, 2)
    reference = _sitk_staple(stack)
    fused = fuse(stack, "staple", 2).numpy()
    np.testing.assert_allclose(fused[1], reference, atol=1e-6)
    np.testing.assert_allclose(fused[0], 1.0 - reference, atol=1e-6)


def test_staple_multiclass_is_renormalised_one_vs_rest_staple():
    stack = _noisy_truth_stack(3, 3, (10, 12, 8), 3)
    per_class = np.stack([_sitk_staple(stack == c) for c in range(3)])
    fused = fuse(stack, "staple", 3).numpy()
    np.testing.assert_allclose(fused, per_class / per_class.sum(0), atol=1e-6)


def test_staple_stops_at_iteration_cap_on_unstructured_masks():
    stack = _random_stack(0, 3, (8, 9, 10), 2)
    staple = sitk.STAPLEImageFilter()
    staple.SetMaximumIterations(MAX_ITERATIONS)
    reference = sitk.GetArrayFromImage(staple.Execute(_sitk_images(stack)))
    assert staple.GetElapsedIterations() == MAX_ITERATIONS
    np.testing.assert_allclose(fuse(stack, "staple", 2).numpy()[1], reference, atol=1e-6)


def test_staple_contradictory_one_vs_rest_voxels_fall_back_to_mean():
    # Tiny unstructured case: the three one-vs-rest STAPLE runs all give probability 0 at column 2.
    stack = np.array([[2, 1, 1, 0, 0, 0, 0], [0, 0, 2, 1, 2, 1, 1], [2, 2, 1, 1, 1, 2, 0], [2, 2, 0, 1, 2, 1, 0],
                      [2, 2, 2, 0, 0, 2, 0]], dtype=np.uint8)[:, None]  # fmt: skip
    per_class = np.stack([_sitk_staple(stack == c) for c in range(3)])
    total = per_class.sum(0)
    undefined = total == 0
    assert undefined.sum() == 1
    mean = np.stack([(stack == c).mean(0) for c in range(3)])
    expected = np.where(undefined, mean, per_class / np.where(undefined, 1, total))
    fused = fuse(stack, "staple", 3).numpy()
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    np.testing.assert_allclose(fused.sum(0), 1.0, atol=1e-6)


def test_staple_unanimous_empty_or_full_class():
    empty = np.zeros((3, 6, 6), np.uint8)
    np.testing.assert_array_equal(fuse(empty, "staple", 2).numpy(), _one_hot(empty[0], 2))
    full = np.ones((3, 6, 6), np.uint8)
    np.testing.assert_array_equal(fuse(full, "staple", 2).numpy(), _one_hot(full[0], 2))
    # Class 2 is absent everywhere: it gets probability 0, the rest still sums to 1.
    stack = _random_stack(4, 3, (6, 6), 2)
    fused = fuse(stack, "staple", 3).numpy()
    assert np.all(fused[2] == 0)
    np.testing.assert_allclose(fused.sum(0), 1.0, atol=1e-6)


# ---------------------------------------------------------------- mean and weighted


def test_mean_hand_computed():
    raters = [np.array([[0, 1], [2, 1]]), np.array([[0, 1], [1, 1]]), np.array([[1, 1], [2, 0]])]
    expected = np.array(
        [
            [[2 / 3, 0], [0, 1 / 3]],  # class 0
            [[1 / 3, 1], [1 / 3, 2 / 3]],  # class 1
            [[0, 0], [2 / 3, 0]],  # class 2
        ],
        dtype=np.float32,
    )
    fused = fuse(raters, "mean", 3)
    assert fused.dtype == torch.float32 and fused.shape == (3, 2, 2)
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(fused.sum(0).numpy(), 1.0, atol=1e-6)


def test_weighted_binary_hand_formula():
    raters = np.array([[[1, 1, 0, 0]], [[1, 1, 0, 0]], [[1, 0, 1, 0]]])
    # Majority [1, 1, 0, 0]; Dice 1, 1 and 2*1/(2+2) = 0.5; normalised 0.4, 0.4, 0.2.
    expected_fg = np.array([[1.0, 0.8, 0.2, 0.0]])
    fused = fuse(raters, "weighted", 2).numpy()
    np.testing.assert_allclose(fused[1], expected_fg, atol=1e-6)
    np.testing.assert_allclose(fused[0], 1 - expected_fg, atol=1e-6)


def test_weighted_multiclass_hand_formula():
    raters = np.array([[[1, 2, 2, 0]], [[1, 2, 0, 0]], [[1, 1, 2, 0]]])
    # Majority [1, 2, 2, 0]. Mean foreground Dice: rater0 (1 + 1)/2 = 1; rater1 (1 + 2/3)/2 = 5/6;
    # rater2 (2/3 + 2/3)/2 = 2/3. Normalised by 5/2: 2/5, 1/3, 4/15.
    w0, w1, w2 = 2 / 5, 1 / 3, 4 / 15
    expected = np.array(
        [
            [[0, 0, w1, 1]],
            [[1, w2, 0, 0]],
            [[0, w0 + w1, w0 + w2, 0]],
        ]
    )
    np.testing.assert_allclose(fuse(raters, "weighted", 3).numpy(), expected, atol=1e-6)


def test_weighted_explicit_weights_override():
    stack = _random_stack(5, 3, (7, 6), 3)
    fused = fuse(stack, "weighted", 3, weights=[1.0, 0.0, 3.0]).numpy()
    expected = (_one_hot(stack[0], 3) + 3 * _one_hot(stack[2], 3)) / 4
    np.testing.assert_allclose(fused, expected, atol=1e-6)


def test_weighted_never_exceeds_one_through_rounding():
    # Accumulating the float32 weights 2/7, 4/7, 1/7 naively gives 1.0000001 where all raters agree.
    stack = np.zeros((3, 4, 4), np.uint8)
    stack[:, :2] = 1
    stack[2, 0, 0] = 0
    fused = fuse(stack, "weighted", 2, weights=[2, 4, 1])
    assert fused.max() <= 1 and fused.min() >= 0
    assert torch.all(fused.sum(0) == 1)
    np.testing.assert_allclose(fused[1, 0, 0].item(), 6 / 7, atol=1e-7)


def test_weighted_with_every_dice_zero_uses_equal_weights():
    # Disjoint masks: the majority is empty (tie -> background), both raters have Dice 0.
    raters = np.array([[[1, 0]], [[0, 1]]])
    np.testing.assert_allclose(fuse(raters, "weighted", 2).numpy(), fuse(raters, "mean", 2).numpy())


def test_weighted_rater_without_foreground_and_empty_majority_gets_weight_one():
    raters = np.array([[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 0, 0]]])
    # Majority empty: raters 0 and 1 have Dice 1 (both empty), rater 2 has Dice 0.
    np.testing.assert_allclose(fuse(raters, "weighted", 2).numpy(), _one_hot(raters[0], 2), atol=1e-7)


def test_identical_raters_give_their_one_hot_for_every_method():
    labels = _random_stack(6, 1, (5, 6, 4), 3)[0]
    stack = np.repeat(labels[None], 4, axis=0)
    for method in FUSION_METHODS:
        np.testing.assert_allclose(fuse(stack, method, 3).numpy(), _one_hot(labels, 3), atol=1e-6, err_msg=method)


# ---------------------------------------------------------------- random


def test_random_is_one_raters_one_hot_reproducible_and_uniform():
    num_raters, draws = 4, 2000
    stack = np.stack([np.full((3, 3), r % 2) for r in range(num_raters)]).astype(np.uint8)
    stack[:, 0, 0] = np.arange(num_raters)  # make every rater distinct
    one_hots = [_one_hot(m, num_raters) for m in stack]

    def chosen(generator):
        fused = fuse(stack, "random", num_raters, generator=generator).numpy()
        matches = [r for r in range(num_raters) if np.array_equal(fused, one_hots[r])]
        assert len(matches) == 1
        return matches[0]

    first = [chosen(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same draw

    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    seq1 = [chosen(g1) for _ in range(draws)]
    seq2 = [chosen(g2) for _ in range(50)]
    assert seq1[:50] == seq2
    counts = np.bincount(seq1, minlength=num_raters)
    # Binomial(2000, 1/4): sd ~ 19.4, allow 5 sd.
    assert np.all(np.abs(counts - draws / num_raters) < 5 * np.sqrt(draws * 0.25 * 0.75)), counts


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(FUSION_METHODS),
    num_raters=st.integers(1, 7),
    num_classes=st.integers(2, 4),
    shape=st.sampled_from([(5, 6), (4, 3, 5), (1, 7)]),
    seed=st.integers(0, 2**16),
)
def test_every_fused_target_is_a_distribution(method, num_raters, num_classes, shape, seed):
    stack = _random_stack(seed, num_raters, shape, num_classes)
    fused = fuse(stack, method, num_classes, generator=torch.Generator().manual_seed(seed))
    assert fused.dtype == torch.float32 and fused.shape == (num_classes, *shape)
    assert fused.min() >= 0 and fused.max() <= 1
    torch.testing.assert_close(fused.sum(0), torch.ones(shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_input_containers_and_dtypes_agree(method):
    stack = _random_stack(8, 3, (6, 5, 4), 3)
    reference = fuse(stack, method, 3, generator=torch.Generator().manual_seed(0))
    variants = [
        torch.from_numpy(stack).long(),
        stack.astype(np.float32),
        stack.astype(np.uint16),
        list(stack),
        [torch.from_numpy(m).int() for m in stack],
        MetaTensor(torch.from_numpy(stack).float(), affine=torch.eye(4)),
    ]
    for raters in variants:
        fused = fuse(raters, method, 3, generator=torch.Generator().manual_seed(0))
        assert type(fused) is torch.Tensor
        torch.testing.assert_close(fused, reference)


def test_bool_raters_are_binary_labels():
    stack = _random_stack(9, 3, (6, 6), 2)
    torch.testing.assert_close(fuse(stack.astype(bool), "mean", 2), fuse(stack, "mean", 2))


def test_fuse_does_not_modify_input():
    stack = torch.from_numpy(_random_stack(11, 5, (6, 6, 6), 4))
    before = stack.clone()
    for method in FUSION_METHODS:
        fuse(stack, method, 4)
    assert torch.equal(stack, before)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("raters", "match"),
    [
        ([np.zeros((4, 4)), np.zeros((4, 5))], r"different shapes.*raters\[1\].*\(4, 5\)"),
        ([], "empty"),
        (np.zeros((0, 4, 4)), "zero raters"),
        (np.array([[[0, 1], [3, 1]]]), r"raters\[0\] contains label 3 outside \[0, 3\)"),
        (np.array([[[0, 1]], [[-1, 1]]]), r"raters\[1\] contains label -1 outside"),
        (np.array([[[0.0, np.nan]]]), r"raters\[0\] contains NaN"),
        (np.array([[[0.0, 1.0]], [[0.5, 1.0]]]), r"raters\[1\] contains non-integer value 0.5"),
        (np.array([[[0.0, np.inf]]]), "outside"),
        (np.zeros((2, 4)), r"2 or 3 spatial dims.*\(2, 4\)"),
        (np.zeros((2, 3, 4, 5, 6)), "2 or 3 spatial dims"),
        (np.zeros((2, 0, 4)), "empty spatial extent"),
        ("not an array", "numpy array or torch tensor"),
    ],
)
def test_bad_raters_raise(raters, match):
    with pytest.raises(ValueError, match=match):
        fuse(raters, "mean", 3)


def test_bad_arguments_raise():
    stack = _random_stack(12, 3, (4, 4), 2)
    with pytest.raises(ValueError, match="fuse: method must be one of .*got 'median'"):
        fuse(stack, "median", 2)
    with pytest.raises(ValueError, match="num_classes"):
        fuse(stack, "mean", 1)
    with pytest.raises(ValueError, match="weights only apply"):
        fuse(stack, "mean", 2, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="got 2 weights for 3 raters"):
        fuse(stack, "weighted", 2, weights=[1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        fuse(stack, "weighted", 2, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="all be zero"):
        fuse(stack, "weighted", 2, weights=[0, 0, 0])

"""Aggregations, active classes, masks and empty classes on tiny cases computed by hand.

The case: two images of two voxels (spatial 1 x 2), two classes, probabilities given directly
(``activation=None``), Jaccard metric loss with ``smooth = 0``:

    image 0: labels [1, 0], p(class 1) = [0.50, 0.25], p(class 0) = [0.50, 0.75]
        class 1: TP 0.5,  FP 0.25, FN 0.5   -> T = 0.5 / 1.25 = 0.4   loss 0.6
        class 0: TP 0.75, FP 0.5,  FN 0.25  -> T = 0.75 / 1.5 = 0.5   loss 0.5
    image 1: labels [0, 0], p(class 1) = [0.25, 0.25], p(class 0) = [0.75, 0.75]
        class 1: TP 0,    FP 0.5,  FN 0     -> T = 0                  loss 1    (class 1 absent)
        class 0: TP 1.5,  FP 0,    FN 0.5   -> T = 1.5 / 2 = 0.75     loss 0.25
    dataset sums: class 1: TP 0.5, FP 0.75, FN 0.5 -> T = 2/7 (loss 5/7); class 0: TP 2.25, FP 0.5, FN 0.75
        -> T = 9/14 (loss 5/14)
"""

import math

import pytest
import torch

from medjdt.losses import JaccardMetricLoss, JDTLoss, hard_cardinalities, jdt_loss, soft_cardinalities, tversky_loss

FOREGROUND = torch.tensor([[0.50, 0.25], [0.25, 0.25]], dtype=torch.float64)
PROBS = torch.stack([1 - FOREGROUND, FOREGROUND], dim=1).unsqueeze(2)  # (2, 2, 1, 2)
LABELS = torch.tensor([[1, 0], [0, 0]]).unsqueeze(1)  # (2, 1, 2)
ONE_HOT = torch.stack([1 - LABELS, LABELS], dim=1).to(torch.float64)  # (2, 2, 1, 2)


def _jml(target, mask=None, **options):
    return jdt_loss(PROBS, target, mask, smooth=0.0, **options).item()


@pytest.mark.parametrize("target", [LABELS, ONE_HOT], ids=["hard", "soft"])
def test_cardinalities_by_hand(target):
    cardinalities = hard_cardinalities if target is LABELS else soft_cardinalities
    tp, fp, fn = cardinalities(PROBS, target)
    # columns: class 0, class 1
    assert torch.allclose(tp, torch.tensor([[0.75, 0.5], [1.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(fp, torch.tensor([[0.5, 0.25], [0.0, 0.5]], dtype=torch.float64))
    assert torch.allclose(fn, torch.tensor([[0.25, 0.5], [0.5, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("target", [LABELS, ONE_HOT], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "aggregation,active,expected",
    [
        ("dataset", "all", (5 / 7 + 5 / 14) / 2),
        ("dataset", "present", (5 / 7 + 5 / 14) / 2),
        ("image", "all", ((0.6 + 0.5) / 2 + (1.0 + 0.25) / 2) / 2),
        ("image", "present", ((0.6 + 0.5) / 2 + 0.25) / 2),
        ("class", "all", ((0.6 + 1.0) / 2 + (0.5 + 0.25) / 2) / 2),
        ("class", "present", (0.6 + (0.5 + 0.25) / 2) / 2),
        ({"image": 0.5, "class": 0.5}, "present", 0.5 * 0.4 + 0.5 * 0.4875),
    ],
)
def test_aggregations_and_active_classes(target, aggregation, active, expected):
    assert _jml(target, aggregation=aggregation, active_classes=active) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("target", [LABELS, ONE_HOT], ids=["hard", "soft"])
def test_class_weights_and_background(target):
    assert _jml(target, class_weights=[1.0, 3.0]) == pytest.approx((5 / 14 + 3 * 5 / 7) / 4, rel=1e-12)
    assert _jml(target, include_background=False) == pytest.approx(5 / 7, rel=1e-12)
    assert _jml(target, aggregation="image", class_weights=[0.0, 1.0]) == pytest.approx((0.6 + 1.0) / 2, rel=1e-12)


@pytest.mark.parametrize("target", [LABELS, ONE_HOT], ids=["hard", "soft"])
def test_log_loss_focal_power_and_dice(target):
    assert _jml(target, log_loss=True) == pytest.approx((-math.log(2 / 7) - math.log(9 / 14)) / 2, rel=1e-12)
    assert _jml(target, aggregation="image", gamma=2.0) == pytest.approx(
        ((0.36 + 0.25) / 2 + (1.0 + 0.0625) / 2) / 2, rel=1e-12
    )
    # DML, image 0 only: class 1 T = 0.5 / (0.5 + 0.75/2) = 4/7, class 0 T = 0.75 / (0.75 + 0.75/2) = 2/3
    first_image = jdt_loss(PROBS[:1], target[:1], smooth=0.0, alpha=0.5, beta=0.5, aggregation="image").item()
    assert first_image == pytest.approx(((1 - 4 / 7) + (1 - 2 / 3)) / 2, rel=1e-12)


def test_smoothing_by_hand():
    # dataset sums with s = 1: class 1 T = 1.5 / 2.75, class 0 T = 3.25 / 4.5
    expected = ((1 - 1.5 / 2.75) + (1 - 3.25 / 4.5)) / 2
    assert jdt_loss(PROBS, LABELS, smooth=1.0).item() == pytest.approx(expected, rel=1e-12)


def test_mask_and_ignore_index_exclude_voxels():
    # dropping voxel 1 of image 0: class 1 TP 0.5 FP 0 FN 0.5 -> loss 0.5; class 0 TP 0 FP 0.5 FN 0 -> loss 1 (absent)
    mask = torch.tensor([[True, False], [True, True]]).unsqueeze(1)
    expected_image = (0.5 + 0.25) / 2  # present classes: image 0 -> class 1, image 1 -> class 0
    assert _jml(LABELS, mask, aggregation="image", active_classes="present") == pytest.approx(expected_image)
    assert _jml(ONE_HOT, mask, aggregation="image", active_classes="present") == pytest.approx(expected_image)
    ignored = LABELS.clone()
    ignored[0, 0, 1] = 255
    assert jdt_loss(
        PROBS, ignored, smooth=0.0, aggregation="image", active_classes="present", ignore_index=255
    ).item() == pytest.approx(expected_image)
    # excluded voxels contribute nothing, whatever their prediction or label
    changed_probs = PROBS.clone()
    changed_probs[0, :, 0, 1] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    changed = jdt_loss(
        changed_probs, ignored, smooth=0.0, aggregation="image", active_classes="present", ignore_index=255
    )
    assert changed.item() == pytest.approx(expected_image)


def test_present_uses_threshold_on_soft_targets():
    target = ONE_HOT.clone()
    target[:, 1] = torch.tensor([[0.005, 0.0], [0.0, 0.0]], dtype=torch.float64).unsqueeze(1)
    target[:, 0] = 1 - target[:, 1]
    # class 1's largest value 0.005 is below the default threshold 0.01: only class 0 counts
    tp, fp, fn = soft_cardinalities(PROBS, target)
    class0 = 1 - tp[:, 0].sum() / (tp[:, 0].sum() + fp[:, 0].sum() + fn[:, 0].sum())
    assert _jml(target, active_classes="present") == pytest.approx(class0.item(), rel=1e-12)
    assert _jml(target, active_classes="present", threshold=0.001) != pytest.approx(class0.item(), rel=1e-6)


@pytest.mark.parametrize("aggregation", ["dataset", "image", "class"])
def test_no_active_class_gives_zero_with_graph(aggregation):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.zeros(2, 3, 4, 4)
    loss = JaccardMetricLoss(aggregation=aggregation, active_classes="present")(logits, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("aggregation", ["dataset", "image", "class"])
@pytest.mark.parametrize("active", ["all", "present"])
def test_fully_masked_batch_gives_zero_without_nan(aggregation, active):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    for smooth in (0.0, 1.0):
        loss_fn = JDTLoss(aggregation=aggregation, active_classes=active, smooth=smooth, log_loss=True)
        loss = loss_fn(logits, labels, mask)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_empty_class_is_a_perfect_match(smooth):
    # class 2 is neither predicted nor labelled: T = (0 + s) / (0 + s), and 0/0 for s = 0 is taken as 1, not NaN
    probs = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    probs[:, 0] = 0.25
    probs[:, 1] = 0.75
    target = torch.zeros_like(probs)
    target[:, 1] = 1.0
    probs.requires_grad_()
    loss = jdt_loss(probs, target, smooth=smooth)
    # class 0: TP 0, FP 1, FN 0; class 1: TP 3, FP 0, FN 1
    expected = ((1 - smooth / (1 + smooth)) + (1 - (3 + smooth) / (4 + smooth)) + 0.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(probs.grad).all()


def test_tversky_loss_elementwise_by_hand():
    tp = torch.tensor([1.0, 0.0, 0.0])
    fp = torch.tensor([1.0, 0.0, 2.0])
    fn = torch.tensor([2.0, 0.0, 0.0])
    loss = tversky_loss(tp, fp, fn, alpha=0.5, beta=0.25, smooth=0.0)
    assert torch.allclose(loss, torch.tensor([1 - 1 / 2.0, 0.0, 1.0]))


def test_aggregation_weights_mix_linearly():
    mixed = _jml(LABELS, aggregation={"dataset": 0.2, "image": 0.3, "class": 0.5})
    parts = [_jml(LABELS, aggregation=name) for name in ("dataset", "image", "class")]
    assert mixed == pytest.approx(0.2 * parts[0] + 0.3 * parts[1] + 0.5 * parts[2], rel=1e-12)

"""JDT losses against independent references: classic soft Dice/Jaccard formulas and MONAI's DiceLoss."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss, JDTLoss, jdt_loss

SMOOTH = 1.0
# MONAI: 1 - (2 TP + s_nr) / (2 (TP + a FP + b FN) + s_dr); ours: 1 - (TP + s) / (TP + a FP + b FN + s),
# so s_nr = s_dr = 2 s
MONAI_SMOOTH = {"smooth_nr": 2 * SMOOTH, "smooth_dr": 2 * SMOOTH}
MONAI_BATCH = {"dataset": True, "image": False}


def _logits(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(batch, channels, spatial, seed=1):
    return torch.randint(0, channels, (batch, *spatial), generator=torch.Generator().manual_seed(seed))


def _soft_target(shape, seed=2):
    return torch.softmax(3 * _logits(shape, seed), dim=1)


def _one_hot(labels, channels):
    return F.one_hot(labels, channels).movedim(-1, 1).to(torch.float64)


def _classic_soft_dice_jaccard(probs, onehot, dims, smooth):
    """The textbook soft Dice and soft Jaccard losses per class for a one-hot target, averaged over entries."""
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + 2 * smooth) / (total + 2 * smooth)
    jaccard = (intersection + smooth) / (total - intersection + smooth)
    return (1 - dice).mean(), (1 - jaccard).mean()


@pytest.mark.parametrize("spatial", [(9, 7), (6, 5, 4)])
@pytest.mark.parametrize("aggregation", ["dataset", "image"])
def test_hard_labels_equal_classic_soft_dice_and_jaccard(spatial, aggregation):
    batch, channels = 3, 4
    logits = _logits((batch, channels, *spatial))
    labels = _labels(batch, channels, spatial)
    probs = torch.softmax(logits, dim=1)
    spatial_dims = tuple(range(2, logits.ndim))
    dims = (0, *spatial_dims) if aggregation == "dataset" else spatial_dims
    dice, jaccard = _classic_soft_dice_jaccard(probs, _one_hot(labels, channels), dims, SMOOTH)
    for variant in (1, 2):
        assert DiceSemimetricLoss(aggregation=aggregation, variant=variant)(logits, labels).item() == pytest.approx(
            dice.item(), rel=1e-12
        )
        assert JaccardMetricLoss(aggregation=aggregation, variant=variant)(logits, labels).item() == pytest.approx(
            jaccard.item(), rel=1e-12
        )


@pytest.mark.parametrize("aggregation", ["dataset", "image"])
@pytest.mark.parametrize("include_background", [True, False])
def test_hard_labels_equal_monai_dice(aggregation, include_background):
    logits = _logits((2, 3, 8, 7, 6))
    labels = _labels(2, 3, (8, 7, 6))
    monai = DiceLoss(
        softmax=True,
        to_onehot_y=True,
        batch=MONAI_BATCH[aggregation],
        include_background=include_background,
        **MONAI_SMOOTH,
    )
    ours = DiceSemimetricLoss(aggregation=aggregation, include_background=include_background)
    # MONAI one-hot encodes in float32, hence the tolerance
    assert ours(logits, labels).item() == pytest.approx(monai(logits, labels.unsqueeze(1)).item(), rel=1e-6)


@pytest.mark.parametrize("aggregation", ["dataset", "image"])
def test_ignore_index_equals_monai(aggregation):
    logits = _logits((2, 3, 10, 9))
    labels = _labels(2, 3, (10, 9))
    labels[:, :3] = 255
    labels[1, 5:, :2] = 255
    monai = DiceLoss(softmax=True, to_onehot_y=True, batch=MONAI_BATCH[aggregation], ignore_index=255, **MONAI_SMOOTH)
    ours = DiceSemimetricLoss(aggregation=aggregation, ignore_index=255)
    assert ours(logits, labels).item() == pytest.approx(monai(logits, labels.unsqueeze(1)).item(), rel=1e-6)


@pytest.mark.parametrize("aggregation", ["dataset", "image"])
def test_squared_cardinalities_equal_monai_squared_pred(aggregation):
    logits = _logits((2, 3, 8, 8))
    labels = _labels(2, 3, (8, 8))
    monai = DiceLoss(softmax=True, to_onehot_y=True, squared_pred=True, batch=MONAI_BATCH[aggregation], **MONAI_SMOOTH)
    ours = DiceSemimetricLoss(aggregation=aggregation, p=2)
    assert ours(logits, labels).item() == pytest.approx(monai(logits, labels.unsqueeze(1)).item(), rel=1e-6)


@pytest.mark.parametrize("spatial", [(12, 11), (7, 6, 5)])
@pytest.mark.parametrize("aggregation", ["dataset", "image"])
@pytest.mark.parametrize("jaccard", [False, True])
def test_soft_labels_equal_monai_soft_label(spatial, aggregation, jaccard):
    shape = (3, 4, *spatial)
    logits, target = _logits(shape), _soft_target(shape)
    monai = DiceLoss(softmax=True, soft_label=True, jaccard=jaccard, batch=MONAI_BATCH[aggregation], **MONAI_SMOOTH)
    ours = (JaccardMetricLoss if jaccard else DiceSemimetricLoss)(aggregation=aggregation)
    assert ours(logits, target).item() == pytest.approx(monai(logits, target).item(), rel=1e-10)


@pytest.mark.parametrize("jaccard", [False, True])
def test_sigmoid_soft_labels_equal_monai(jaccard):
    shape = (2, 3, 9, 8)
    logits = _logits(shape)
    target = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    monai = DiceLoss(sigmoid=True, soft_label=True, jaccard=jaccard, batch=True, **MONAI_SMOOTH)
    ours = (JaccardMetricLoss if jaccard else DiceSemimetricLoss)(activation="sigmoid")
    assert ours(logits, target).item() == pytest.approx(monai(logits, target).item(), rel=1e-10)


def test_binary_single_channel_hard_labels_equal_monai():
    logits = _logits((2, 1, 9, 8))
    labels = _labels(2, 2, (9, 8))
    monai = DiceLoss(sigmoid=True, batch=True, **MONAI_SMOOTH)
    ours = DiceSemimetricLoss(activation="sigmoid")
    assert ours(logits, labels).item() == pytest.approx(monai(logits, labels.unsqueeze(1).double()).item(), rel=1e-10)


@pytest.mark.parametrize("aggregation", ["dataset", "image"])
def test_log_loss_and_focal_power_from_monai_per_class_values(aggregation):
    shape = (2, 3, 9, 9)
    logits, target = _logits(shape), _soft_target(shape)
    monai = DiceLoss(softmax=True, soft_label=True, batch=MONAI_BATCH[aggregation], reduction="none", **MONAI_SMOOTH)
    per_entry = monai(logits, target).flatten()  # 1 - T for every (image, class) or class
    # with every class active, the image aggregation's mean of per-image class means is the plain mean too
    expected_log, expected_focal = (-torch.log(1 - per_entry)).mean(), (per_entry**2.5).mean()
    assert DiceSemimetricLoss(aggregation=aggregation, log_loss=True)(logits, target).item() == pytest.approx(
        expected_log.item(), rel=1e-10
    )
    assert DiceSemimetricLoss(aggregation=aggregation, gamma=2.5)(logits, target).item() == pytest.approx(
        expected_focal.item(), rel=1e-10
    )


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 0.5)])
def test_second_variant_equals_its_closed_form(alpha, beta):
    shape = (2, 3, 10, 7)
    probs, target = _soft_target(shape, seed=7), _soft_target(shape, seed=8)
    dims = (0, 2, 3)
    product = (probs * target).sum(dims)
    difference = (probs - target).abs().sum(dims)
    # JML2 = 1 - |x*y| / (|x*y| + |x - y|),  DML2 = 1 - 2|x*y| / (2|x*y| + |x - y|)
    scale = 1.0 if alpha == 1 else 2.0
    expected = (1 - scale * product / (scale * product + difference)).mean()
    ours = jdt_loss(probs, target, alpha=alpha, beta=beta, variant=2, smooth=0.0)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)


def test_first_and_second_variant_differ_on_soft_labels():
    shape = (2, 3, 10, 7)
    probs, target = _soft_target(shape, seed=7), _soft_target(shape, seed=8)
    first = jdt_loss(probs, target, variant=1)
    second = jdt_loss(probs, target, variant=2)
    assert abs(first.item() - second.item()) > 1e-3


@pytest.mark.parametrize("p,variant", [(1, 1), (2, 1), (1.5, 1), (1, 2)])
def test_hard_label_path_equals_soft_one_hot_path(p, variant):
    batch, channels, spatial = 2, 4, (7, 6, 5)
    logits = _logits((batch, channels, *spatial))
    labels = _labels(batch, channels, spatial)
    mask = torch.rand((batch, *spatial), generator=torch.Generator().manual_seed(3)) > 0.3
    loss = JDTLoss(alpha=0.3, beta=0.7, p=p, variant=variant, aggregation={"dataset": 1.0, "image": 0.5, "class": 0.5})
    assert loss(logits, labels, mask).item() == pytest.approx(
        loss(logits, _one_hot(labels, channels), mask).item(), rel=1e-12
    )


def test_tversky_weights_match_closed_form():
    shape = (2, 3, 6, 6)
    logits, target = _logits(shape), _soft_target(shape)
    probs = torch.softmax(logits, 1)
    dims = (0, 2, 3)
    tp = torch.minimum(probs, target).sum(dims)
    fp = (probs - target).clamp_min(0).sum(dims)
    fn = (target - probs).clamp_min(0).sum(dims)
    expected = (1 - (tp + 1) / (tp + 0.2 * fp + 0.8 * fn + 1)).mean()
    assert JDTLoss(alpha=0.2, beta=0.8)(logits, target).item() == pytest.approx(expected.item(), rel=1e-12)

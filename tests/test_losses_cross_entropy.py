"""SoftTargetCrossEntropy against scikit-learn and closed forms; SegmentationLoss as the weighted mix."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss, SegmentationLoss, SoftTargetCrossEntropy


def _logits(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _voxel_rows(tensor):
    """(B, C, *spatial) -> (voxels, C) numpy rows."""
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1]).detach().numpy()


@pytest.mark.parametrize("spatial", [(7, 6), (5, 4, 3)])
def test_hard_labels_equal_sklearn_log_loss(spatial):
    logits = _logits((2, 4, *spatial))
    labels = torch.randint(0, 4, (2, *spatial), generator=torch.Generator().manual_seed(1))
    expected = log_loss(labels.reshape(-1).numpy(), _voxel_rows(torch.softmax(logits, 1)), labels=[0, 1, 2, 3])
    assert SoftTargetCrossEntropy()(logits, labels).item() == pytest.approx(expected, rel=1e-10)


def test_soft_labels_equal_closed_form_and_kl_plus_entropy():
    logits = _logits((2, 3, 6, 5))
    target = torch.softmax(2 * _logits((2, 3, 6, 5), seed=3), 1)
    probs = _voxel_rows(torch.softmax(logits, 1))
    rows = _voxel_rows(target)
    expected = float(np.mean(-(rows * np.log(probs)).sum(1)))
    ours = SoftTargetCrossEntropy()(logits, target).item()
    assert ours == pytest.approx(expected, rel=1e-10)
    # cross-entropy = KL(y || x) + H(y)
    entropy = float(np.mean(-(rows * np.log(rows)).sum(1)))
    kl = F.kl_div(torch.log_softmax(logits, 1), target, reduction="sum").item() / rows.shape[0]
    assert ours == pytest.approx(kl + entropy, rel=1e-10)


def test_mask_and_ignore_index_average_over_kept_voxels_only():
    logits = _logits((2, 3, 6, 5))
    labels = torch.randint(0, 3, (2, 6, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(4)) > 0.4
    kept_probs = _voxel_rows(torch.softmax(logits, 1))[mask.reshape(-1).numpy()]
    expected = log_loss(labels[mask].numpy(), kept_probs, labels=[0, 1, 2])
    assert SoftTargetCrossEntropy()(logits, labels, mask).item() == pytest.approx(expected, rel=1e-10)
    ignored = torch.where(mask, labels, torch.full_like(labels, -100))
    assert SoftTargetCrossEntropy(ignore_index=-100)(logits, ignored).item() == pytest.approx(expected, rel=1e-10)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).double()
    assert SoftTargetCrossEntropy()(logits, one_hot, mask).item() == pytest.approx(expected, rel=1e-10)


def test_sigmoid_equals_binary_log_loss_per_channel():
    logits = _logits((2, 2, 5, 5))
    target = (torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(5)) > 0.5).double()
    probs = torch.sigmoid(logits)
    expected = np.mean(
        [log_loss(target[:, c].reshape(-1).numpy(), probs[:, c].reshape(-1).numpy(), labels=[0, 1]) for c in range(2)]
    )
    assert SoftTargetCrossEntropy(activation="sigmoid")(logits, target).item() == pytest.approx(expected, rel=1e-10)
    # hard labels with two sigmoid channels are one-hot: channel 1 is the complement of channel 0
    labels = torch.randint(0, 2, (2, 5, 5), generator=torch.Generator().manual_seed(6))
    one_hot = F.one_hot(labels, 2).movedim(-1, 1).double()
    assert SoftTargetCrossEntropy(activation="sigmoid")(logits, labels).item() == pytest.approx(
        SoftTargetCrossEntropy(activation="sigmoid")(logits, one_hot).item(), rel=1e-12
    )


def test_fully_masked_gives_zero_with_graph():
    logits = _logits((1, 3, 4, 4)).requires_grad_()
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    loss = SoftTargetCrossEntropy()(logits, labels, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_finite_float32_under_bf16_autocast():
    conv = torch.nn.Conv2d(2, 3, 1)
    image = 40 * torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = SegmentationLoss()(conv(image), labels)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())


@pytest.mark.parametrize("soft", [False, True])
def test_segmentation_loss_is_the_weighted_sum_of_its_parts(soft):
    logits = _logits((2, 3, 6, 5, 4)).requires_grad_()
    if soft:
        target = torch.softmax(2 * _logits((2, 3, 6, 5, 4), seed=9), 1)
    else:
        target = torch.randint(0, 3, (2, 6, 5, 4), generator=torch.Generator().manual_seed(9))
    mask = torch.rand(2, 6, 5, 4, generator=torch.Generator().manual_seed(10)) > 0.2
    total, parts = SegmentationLoss()(logits, target, mask)
    ce = SoftTargetCrossEntropy()(logits, target, mask)
    dml = DiceSemimetricLoss()(logits, target, mask)
    assert set(parts) == {"ce", "jdt"}
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-12)
    assert parts["jdt"].item() == pytest.approx(dml.item(), rel=1e-12)
    assert total.item() == pytest.approx(0.25 * ce.item() + 0.75 * dml.item(), rel=1e-12)
    assert not parts["ce"].requires_grad and not parts["jdt"].requires_grad
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_segmentation_loss_follows_its_jdt_loss():
    logits = _logits((2, 1, 6, 5))
    labels = torch.randint(0, 2, (2, 6, 5), generator=torch.Generator().manual_seed(11))
    labels[0, 0, 0] = 9
    loss = SegmentationLoss(ce_weight=1.0, jdt_weight=2.0, jdt=JaccardMetricLoss(activation="sigmoid", ignore_index=9))
    total, parts = loss(logits, labels)
    keep = labels != 9
    probs = torch.sigmoid(logits[:, 0])[keep]
    y = labels[keep].double()
    expected_ce = log_loss(y.numpy(), probs.numpy(), labels=[0, 1])
    tp = (probs * y).sum()
    expected_jml = 1 - (tp + 1) / (probs.sum() + y.sum() - tp + 1)
    assert parts["ce"].item() == pytest.approx(expected_ce, rel=1e-10)
    assert parts["jdt"].item() == pytest.approx(expected_jml.item(), rel=1e-10)
    assert total.item() == pytest.approx(expected_ce + 2 * expected_jml.item(), rel=1e-10)

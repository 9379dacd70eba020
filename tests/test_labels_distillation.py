"""medjdt.labels.teacher_targets against scipy's softmax; distillation_loss against its formula written out."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from medjdt.labels import distillation_loss, teacher_targets
from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss


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


# ------------------------------------------------------------------------------------------------ distillation_loss
def test_distillation_loss_matches_the_formula_with_a_confidence_mask():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    teacher = 2 * torch.randn(2, 3, 6, 5, dtype=torch.float64)
    t, threshold = 2.0, 0.7
    total, parts = distillation_loss(student, teacher, JaccardMetricLoss(smooth=1.0), t, threshold)
    # Independent reference: elementwise formulas with explicit voxel selection.
    p = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
    q = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
    confident = (torch.exp(teacher) / torch.exp(teacher).sum(1, keepdim=True)).max(1).values >= threshold
    assert 0 < confident.sum() < confident.numel()
    kl_voxel = (p * (p.log() - q.log())).sum(1)
    kl = kl_voxel[confident].mean()
    m = confident[:, None].double()
    # JML with dataset reduction and smooth 1: TP = (|x| + |y| - |x - y|) / 2 per class over counted voxels.
    sx, sy, sd = (q * m).sum((0, 2, 3)), (p * m).sum((0, 2, 3)), ((q - p).abs() * m).sum((0, 2, 3))
    tp = (sx + sy - sd) / 2
    fp, fn = sx - tp, sy - tp
    jml = (1 - (tp + 1) / (tp + fp + fn + 1)).mean()
    torch.testing.assert_close(parts["kl"].double(), kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["jdt"].double(), jml, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total.double(), t**2 * kl + jml, rtol=1e-5, atol=1e-7)
    assert float(parts["confident_fraction"]) == pytest.approx(confident.double().mean().item())
    # The target carries no gradient to the teacher; the student gets one.
    s = student.clone().requires_grad_(True)
    tt = teacher.clone().requires_grad_(True)
    distillation_loss(s, tt, JaccardMetricLoss(), t, threshold)[0].backward()
    assert tt.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_distillation_loss_without_a_threshold_counts_every_voxel_and_is_zero_only_at_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    for t in (0.5, 1.0, 3.0):
        p = torch.softmax(teacher / t, 1)
        kl = (p * (p.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
        total, parts = distillation_loss(student, teacher, DiceSemimetricLoss(), t)
        torch.testing.assert_close(parts["kl"], kl, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(total, t**2 * kl + DiceSemimetricLoss()(student / t, p), rtol=1e-5, atol=1e-7)
        assert float(parts["confident_fraction"]) == 1.0 and total > 0
        same, same_parts = distillation_loss(teacher.clone(), teacher, DiceSemimetricLoss(), t)
        assert abs(float(same)) < 1e-6 and abs(float(same_parts["kl"])) < 1e-6
    # Shifting every logit of a voxel by one constant leaves its softmax, so the loss, unchanged.
    shifted, _ = distillation_loss(teacher + 5.0, teacher, DiceSemimetricLoss(), 2.0)
    assert abs(float(shifted)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "distillation_loss: temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"confidence_threshold": 1.0}, r"confidence_threshold must be a finite number in \[0, 1\)"),
        ({"confidence_threshold": -0.1}, "confidence_threshold"),
        ({"jdt": DiceSemimetricLoss(activation="sigmoid")}, "softmax activation, got 'sigmoid'"),
        ({"teacher_logits": torch.zeros(1, 3, 4, 5)}, r"teacher logits \(1, 3, 4, 5\) differ"),
    ],
)
def test_distillation_loss_bad_arguments_raise(kwargs, match):
    args = {"student_logits": torch.zeros(1, 3, 4, 4), "teacher_logits": torch.zeros(1, 3, 4, 4),
            "jdt": DiceSemimetricLoss(), **kwargs}
    with pytest.raises(ValueError, match=match):
        distillation_loss(**args)

"""Bad inputs and arguments raise ValueError naming the problem."""

import pytest
import torch

from medjdt.losses import (
    DiceSemimetricLoss,
    JaccardMetricLoss,
    JDTLoss,
    SegmentationLoss,
    SoftTargetCrossEntropy,
    hard_cardinalities,
    jdt_loss,
    soft_cardinalities,
)

LOSSES = [DiceSemimetricLoss(), SoftTargetCrossEntropy(), SegmentationLoss()]


def _call(loss, logits, target, mask=None):
    return loss(logits, target, mask)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=generator)
    labels = torch.randint(0, 3, (2, 6, 5), generator=generator)
    soft = torch.softmax(torch.randn(2, 3, 6, 5, generator=generator), dim=1)
    return logits, labels, soft


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_shape_mismatch(loss):
    logits, labels, soft = _inputs()
    with pytest.raises(ValueError, match=r"target shape \(2, 6, 4\) matches neither"):
        _call(loss, logits, labels[..., :4])
    with pytest.raises(ValueError, match=r"target shape \(2, 3, 6, 4\)"):
        _call(loss, logits, soft[..., :4])
    with pytest.raises(ValueError, match=r"target shape \(3, 6, 5\)"):
        _call(loss, logits, torch.cat([labels, labels[:1]]))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_wrong_channel_count(loss):
    logits, _, soft = _inputs()
    with pytest.raises(ValueError, match=r"target shape \(2, 4, 6, 5\)"):
        _call(loss, logits, torch.cat([soft, soft[:, :1]], dim=1))
    with pytest.raises(ValueError, match="needs at least 2 channels"):
        _call(loss, logits[:, :1], soft[:, :1])


def test_class_weights_length_must_match_channels():
    logits, labels, _ = _inputs()
    with pytest.raises(ValueError, match="class_weights has 2 values but logits have 3 channels"):
        JDTLoss(class_weights=[1.0, 2.0])(logits, labels)


def test_include_background_false_needs_two_channels():
    logits, labels, _ = _inputs()
    with pytest.raises(ValueError, match="include_background=False needs at least 2 channels"):
        JDTLoss(activation="sigmoid", include_background=False)(logits[:, :1], labels.clamp(max=1))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_soft_target_outside_unit_interval(loss, bad):
    logits, _, soft = _inputs()
    soft = soft.clone()
    soft[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"soft target of shape \(2, 3, 6, 5\) must lie in \[0, 1\]"):
        _call(loss, logits, soft)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("bad", [3, -1, 255])
def test_integer_target_with_out_of_range_class(loss, bad):
    logits, labels, _ = _inputs()
    labels = labels.clone()
    labels[0, 2, 2] = bad
    with pytest.raises(ValueError, match=rf"class index {bad} outside \[0, 3\)"):
        _call(loss, logits, labels)


def test_out_of_range_class_is_fine_when_ignored_but_others_are_not():
    logits, labels, _ = _inputs()
    labels = labels.clone()
    labels[0, 2, 2] = 255
    assert torch.isfinite(JDTLoss(ignore_index=255)(logits, labels))
    labels[1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"class index 7 outside \[0, 3\)"):
        JDTLoss(ignore_index=255)(logits, labels)


def test_binary_single_channel_labels_must_be_zero_or_one():
    logits, labels, _ = _inputs()
    with pytest.raises(ValueError, match=r"class index 2 outside \[0, 2\)"):
        JDTLoss(activation="sigmoid")(logits[:, :1], labels.clamp(min=2))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits(loss, bad):
    logits, labels, _ = _inputs()
    logits = logits.clone()
    logits[1, 0, 5, 4] = bad
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3, 6, 5\) contain NaN or Inf"):
        _call(loss, logits, labels)


def test_huge_but_finite_logits_are_accepted():
    logits, labels, _ = _inputs()
    logits = logits.clone()
    logits[:, 0] = 3e38  # the sum overflows float32, each value does not
    assert torch.isfinite(JDTLoss()(logits, labels))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_bad_mask(loss):
    logits, labels, _ = _inputs()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        _call(loss, logits, labels, torch.ones(2, 6, 5))
    with pytest.raises(ValueError, match=r"mask shape \(2, 6, 4\) does not match"):
        _call(loss, logits, labels, torch.ones(2, 6, 4, dtype=torch.bool))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_bad_logits_and_target_dtypes(loss):
    logits, labels, soft = _inputs()
    with pytest.raises(ValueError, match=r"2 or 3 spatial dims, got shape \(2, 3, 6\)"):
        _call(loss, logits[..., 0], labels[..., 0])
    with pytest.raises(ValueError, match="logits must be a floating point tensor"):
        _call(loss, labels.unsqueeze(1).expand(2, 3, 6, 5), labels)
    with pytest.raises(ValueError, match="hard labels of shape .* must be an integer tensor"):
        _call(loss, logits, labels.float())
    with pytest.raises(ValueError, match="holds soft labels and must be floating"):
        _call(loss, logits, (soft > 0.5).long())


def test_probabilities_outside_unit_interval_with_activation_none():
    _, labels, soft = _inputs()
    with pytest.raises(ValueError, match=r"probabilities \(activation=None\) must lie in \[0, 1\]"):
        JDTLoss(activation=None)(soft * 2, labels)
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\]"):
        soft_cardinalities(soft - 0.5, soft)
    with pytest.raises(ValueError, match="needs a soft target"):
        soft_cardinalities(soft, labels)
    with pytest.raises(ValueError, match="needs \\(B, \\*spatial\\) labels"):
        hard_cardinalities(soft, soft)
    with pytest.raises(ValueError, match="jdt_loss takes probabilities"):
        jdt_loss(soft, labels, activation="softmax")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"variant": 3}, "variant must be one of 1, 2, got 3"),
        ({"p": 0.5}, "p must be a finite number >= 1"),
        ({"variant": 2, "p": 2}, "variant=2 is defined for p=1 only"),
        ({"aggregation": "mean"}, "aggregation must be one of 'dataset', 'image', 'class', got 'mean'"),
        ({"aggregation": "imag"}, "did you mean image"),
        ({"aggregation": {"image": -1.0}}, "aggregation weight for 'image' must be a finite number >= 0"),
        ({"aggregation": {"image": 0.0}}, "has no positive weight"),
        ({"aggregation": []}, "aggregation must be one of"),
        ({"active_classes": "some"}, "active_classes must be one of"),
        ({"presence_threshold": 1.0}, r"presence_threshold must be a finite number in \[0, 1\)"),
        ({"presence_threshold": -0.1}, r"presence_threshold must be a finite number in \[0, 1\)"),
        ({"smooth": -1.0}, "smooth must be a finite number >= 0"),
        ({"gamma": 0.0}, "gamma must be a finite number > 0"),
        ({"alpha": -0.5}, "alpha must be a finite number >= 0"),
        ({"alpha": 0.0, "beta": 0.0}, "must not both be 0"),
        ({"class_weights": [1.0, -1.0]}, "class_weights must be finite, >= 0"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"ignore_index": 1.5}, "ignore_index must be a finite integer"),
        ({"smooth": True}, "smooth must be a finite number >= 0, got True"),
        ({"gamma": float("nan")}, "gamma must be a finite number > 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JDTLoss(**kwargs)


def test_errors_name_the_class_and_function_that_was_called():
    with pytest.raises(ValueError, match="^DiceSemimetricLoss: smooth must be"):
        DiceSemimetricLoss(smooth=-1.0)
    with pytest.raises(ValueError, match="^SoftTargetCrossEntropy: activation must be one of 'softmax', 'sigmoid'"):
        SoftTargetCrossEntropy(activation=None)
    _, labels, soft = _inputs()
    with pytest.raises(ValueError, match="^soft_cardinalities: p must be"):
        soft_cardinalities(soft, soft, p=0)
    with pytest.raises(ValueError, match="^hard_cardinalities: ignore_index must be"):
        hard_cardinalities(soft, labels, ignore_index="255")


def test_presets_fix_alpha_and_beta():
    assert (JaccardMetricLoss().alpha, JaccardMetricLoss().beta) == (1.0, 1.0)
    assert (DiceSemimetricLoss().alpha, DiceSemimetricLoss().beta) == (0.5, 0.5)
    with pytest.raises(TypeError):
        DiceSemimetricLoss(alpha=1.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ce_weight": -1.0}, "ce_weight must be a finite number >= 0"),
        ({"ce_weight": 0.0, "jdt_weight": 0.0}, "must not both be 0"),
        ({"jdt": JDTLoss(activation=None)}, "SegmentationLoss takes logits"),
        ({"jdt": SoftTargetCrossEntropy()}, "jdt must be a JDTLoss"),
    ],
)
def test_bad_segmentation_loss_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentationLoss(**kwargs)


# ------------------------------------------------------------------------------------ deferred checks (accelerators)
@pytest.fixture
def deferred(monkeypatch):
    """Defer the value checks of CPU tensors as on an accelerator."""
    import medjdt.losses._inputs as inputs

    monkeypatch.setattr(inputs, "defers_checks", lambda device: True)


def _bad_inputs():
    logits, labels, soft = _inputs()
    nan_logits = logits.clone()
    nan_logits[1, 2, 3, 4] = float("nan")
    bad_labels = labels.clone()
    bad_labels[0, 0, 0] = 7
    bad_soft = soft.clone()
    bad_soft[1, 0, 2, 2] = 1.5
    return [
        (nan_logits, labels, r"logits of shape \(2, 3, 6, 5\) contain NaN or Inf"),
        (logits, bad_labels, r"class index 7 outside \[0, 3\)"),
        (logits, bad_soft, r"soft target of shape \(2, 3, 6, 5\) must lie in \[0, 1\], found values in \[.*, 1\.5\]"),
    ]


@pytest.mark.parametrize("make_loss", [DiceSemimetricLoss, lambda: JDTLoss(fused=False), SoftTargetCrossEntropy,
                                       SegmentationLoss], ids=["fused", "reference", "ce", "segmentation"])
def test_deferred_checks_report_bad_inputs_on_a_later_call(make_loss, deferred):
    logits, labels, soft = _inputs()
    for bad_logits, bad_target, message in _bad_inputs():
        loss = make_loss()
        loss(bad_logits, bad_target)  # queued, not raised: on a GPU this call does not wait for the data
        with pytest.raises(ValueError, match=message + r".*deferred check of an earlier call"):
            loss(logits, labels)
        loss(logits, soft)  # the failed check is gone; good inputs pass
        loss(bad_logits, bad_target)
        with pytest.raises(ValueError, match=message):
            loss.flush_checks()
        loss.flush_checks()


def test_deferred_bad_labels_never_index_out_of_range(deferred):
    # the reference path gathers and cross-entropy indexes by label: clamped until the deferred check reports
    logits, labels, _ = _inputs()
    bad = labels.clone()
    bad[0, 0, 0], bad[1, 2, 3] = 7, -4
    for loss in (JDTLoss(fused=False), DiceSemimetricLoss(), SoftTargetCrossEntropy()):
        assert torch.isfinite(loss(logits, bad))
        with pytest.raises(ValueError, match=r"class index -4 outside"):
            loss.flush_checks()


def test_segmentation_loss_checks_its_inputs_once(monkeypatch):
    calls = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or aminmax(*a, **k))
    logits, labels, soft = _inputs()
    SegmentationLoss()(logits, soft)
    assert len(calls) == 2  # logits and target, shared by the cross-entropy and the JDT term
    calls.clear()
    SegmentationLoss()(logits, labels)
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_cuda_training_step_loss_never_waits_for_the_device(hard):
    logits, labels, soft = (t.cuda() for t in _inputs())
    logits.requires_grad_()
    loss = SegmentationLoss()
    loss(logits, labels if hard else soft)  # warm-up: kernels compiled, allocator primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = loss(logits, labels if hard else soft)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.flush_checks()

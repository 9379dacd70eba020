"""Mean-teacher training: EMA teacher, consistency loss, ramp-up, CLI run and resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference

from medjdt.cli import main
from medjdt.data import make_phantom_dataset
from medjdt.data.datamodule import SegmentationDataModule
from medjdt.data.manifest import write_partly_labelled
from medjdt.labels import distillation_loss
from medjdt.losses import DiceSemimetricLoss, SegmentationLoss
from medjdt.models import build_network
from medjdt.models.semi import MeanTeacherSpec, SemiSupervisedModule, sigmoid_rampup

ROOT = Path(__file__).resolve().parents[1]
NET_2D = {"class_path": "UNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                              "channels": [4, 8], "strides": [2], "num_res_units": 0}}
TINY_NET = (
    '{"class_path": "UNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, '
    '"channels": [4, 8], "strides": [2], "num_res_units": 0}}'
)
SEMI = '{"ema_decay": 0.9, "temperature": 2.0, "rampup_epochs": 1, "confidence_threshold": 0.5}'


def _module(**semi) -> SemiSupervisedModule:
    return SemiSupervisedModule(network=NET_2D, roi_size=[8, 8], semi={"ema_decay": 0.6, **semi})


@pytest.fixture(scope="module")
def semi_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("semi_cli")
    full = make_phantom_dataset(out, cases=7, raters=2, shape=(24, 24, 24), dims=3, seed=0, folds=3)
    # Folds 1-2 hold 4 training cases: 2 keep their annotations (2 steps per epoch at batch size 1), 2 do not.
    return write_partly_labelled(full, out / "semi.csv", 0.5, keep_folds=[0], seed=0)


# ---------------------------------------------------------------------------------------------- settings, ramp-up
def test_sigmoid_rampup_closed_form():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    values = [sigmoid_rampup(e / 4, 10) for e in range(41)]
    assert all(a < b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="sigmoid_rampup: length must be a finite number >= 0"):
        sigmoid_rampup(1, -1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ema_decay": 1.0}, r"semi.ema_decay must be a finite number in \[0, 1\)"),
        ({"temperature": 0.0}, "semi.temperature"),
        ({"unlabelled_weight": -1.0}, "semi.unlabelled_weight"),
        ({"rampup_epochs": float("nan")}, "semi.rampup_epochs"),
        ({"confidence_threshold": 1.0}, "semi.confidence_threshold"),
        ({"evaluate": "ema"}, "semi.evaluate must be one of"),
        ({"decay": 0.9}, r"unknown keys \['decay'\]"),
    ],
)
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        MeanTeacherSpec.from_mapping(settings)


def test_without_semi_the_module_is_a_plain_segmentation_module():
    module = SemiSupervisedModule(network=NET_2D, roi_size=[8, 8])
    assert module.teacher_network is None and not any(k.startswith("ema_teacher") for k in module.state_dict())
    with pytest.raises(ValueError, match="update_teacher"):
        module.update_teacher()
    with pytest.raises(ValueError, match="model.semi is not set"):
        module.training_step({"labelled": {}, "unlabelled": {}}, 0)


def test_semi_needs_a_softmax_jdt_loss():
    with pytest.raises(ValueError, match="softmax activation"):
        SemiSupervisedModule(network=NET_2D, roi_size=[8, 8], semi={}, jdt=DiceSemimetricLoss(activation="sigmoid"))


# ---------------------------------------------------------------------------------------------- EMA teacher
def test_ema_update_follows_the_mean_teacher_formula():
    torch.manual_seed(0)
    module = _module()  # ema_decay 0.6
    teacher, student = module.teacher_network, module.network
    assert all(not p.requires_grad for p in teacher.parameters())
    reference = None
    for k in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        current = [p.detach().clone() for p in student.parameters()]
        module.update_teacher()
        # Mean teacher: alpha_k = min(1 - 1/(k+1), decay); the first update copies the student.
        alpha = min(1.0 - 1.0 / (k + 1), 0.6)
        reference = current if reference is None else [alpha * r + (1 - alpha) * c for r, c in zip(reference, current)]
        for got, want in zip(teacher.parameters(), reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(module.ema_teacher.n_averaged) == 5
    # Updating the teacher never touches the student.
    for got, want in zip(student.parameters(), current):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_teacher_stays_in_eval_mode_and_can_be_evaluated():
    torch.manual_seed(0)
    module = _module(evaluate="teacher").train()
    assert module.network.training and not module.teacher_network.training
    with torch.no_grad():
        for p in module.network.parameters():
            p.add_(0.5 * torch.randn_like(p))  # the student moves away from the teacher
    module.eval()
    image = torch.randn(1, 1, 12, 12)
    expected = sliding_window_inference(image, [8, 8], 2, module.teacher_network, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(module.infer(image), torch.softmax(expected, 1), rtol=1e-5, atol=1e-6)
    student = sliding_window_inference(image, [8, 8], 2, module.network, overlap=0.5, mode="gaussian")
    assert not torch.allclose(module.infer(image), torch.softmax(student, 1), atol=1e-3)


# ---------------------------------------------------------------------------------------------- unlabelled loss
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_unlabelled_loss_is_zero_when_student_and_teacher_agree(temperature):
    torch.manual_seed(0)
    module = _module(temperature=temperature)  # before any update the teacher is a copy of the student
    x = torch.randn(3, 1, 8, 8)
    loss, parts = module._unlabelled_loss(x, x.clone())
    torch.testing.assert_close(loss, torch.zeros(()), rtol=0, atol=1e-6)
    assert abs(float(parts["unlabelled_kl"])) < 1e-6 and abs(float(parts["unlabelled_jdt"])) < 1e-6
    # ... and positive once they disagree (other input for the student, or other weights).
    assert module._unlabelled_loss(x, x + 0.5 * torch.randn_like(x))[0].item() > 1e-3
    with torch.no_grad():
        for p in module.network.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert module._unlabelled_loss(x, x)[0].item() > 1e-3


def test_unlabelled_loss_is_the_distillation_loss_of_student_and_ema_teacher_with_the_semi_settings():
    torch.manual_seed(0)
    module = _module(temperature=2.0, confidence_threshold=0.5)
    with torch.no_grad():
        for p in module.teacher_network.parameters():
            p.add_(0.2 * torch.randn_like(p))
    weak = torch.randn(3, 1, 8, 8)
    strong = weak + 0.1 * torch.randn_like(weak)
    loss, parts = module._unlabelled_loss(weak, strong)
    with torch.no_grad():
        teacher_logits = module.teacher_network(weak)
    expected, expected_parts = distillation_loss(module.network(strong), teacher_logits, module.loss.jdt, 2.0, 0.5)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"unlabelled_kl", "unlabelled_jdt", "confident_fraction"}
    names = {"unlabelled_kl": "kl", "unlabelled_jdt": "jdt", "confident_fraction": "confident_fraction"}
    for name, shared in names.items():
        torch.testing.assert_close(parts[name], expected_parts[shared])
    assert 0 < float(parts["confident_fraction"]) < 1


def test_training_step_adds_the_ramped_unlabelled_loss_to_the_labelled_one():
    torch.manual_seed(0)
    module = _module(unlabelled_weight=0.5, rampup_epochs=0, temperature=1.5)
    with torch.no_grad():
        for p in module.teacher_network.parameters():
            p.add_(0.2 * torch.randn_like(p))  # a teacher that disagrees with the student
    image, weak = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    strong = weak + 0.1 * torch.randn_like(weak)
    label = torch.softmax(2 * torch.randn(2, 3, 8, 8), 1)
    batch = {"labelled": {"image": image, "label": label}, "unlabelled": {"weak": weak, "strong": strong}}
    total = module.training_step(batch, 0)
    labelled, _ = SegmentationLoss(0.25, 0.75, DiceSemimetricLoss())(module.network(image), label)
    with torch.no_grad():
        teacher_logits = module.teacher_network(weak)
    unlabelled, _ = distillation_loss(module.network(strong), teacher_logits, DiceSemimetricLoss(), 1.5)
    torch.testing.assert_close(total, labelled + 0.5 * unlabelled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs training batches"):
        module.training_step(batch["labelled"], 0)


# ---------------------------------------------------------------------------------------------- CLI
def _fit_args(manifest: Path, run_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "demo_semi.yaml"),
        "--data.manifest", str(manifest), "--data.demo", "null",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "1", "--data.num_workers", "0",
        "--data.num_folds", "3", "--data.samples_per_volume", "1",
        "--model.network", TINY_NET, "--model.sw_batch_size", "2", "--model.semi", SEMI,
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", '{"class_path": "pytorch_lightning.loggers.CSVLogger", '
        f'"init_args": {{"save_dir": "{run_dir}", "name": "run"}}}}',
        *extra,
    ]


class _TeacherAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.ema_teacher.state_dict())


def test_two_step_cli_run_then_resume_keeps_the_ema_teacher(semi_manifest, tmp_path):
    run_dir = tmp_path / "runs"
    assert main(_fit_args(semi_manifest, run_dir)) == 0
    version = sorted((run_dir / "run").glob("version_*"))[-1]
    metrics = pd.read_csv(version / "metrics.csv")
    for name in ("train/loss", "train/labelled_loss", "train/unlabelled_kl", "train/unlabelled_jdt", "val/dice"):
        values = metrics[name].dropna()
        assert len(values) >= 1 and np.isfinite(values).all(), name
    assert (metrics["train/unlabelled_kl"].dropna() >= -1e-6).all()
    # Ramp-up over 1 epoch of 2 steps: the weight at batch 0 and batch 1 of epoch 0.
    weight = MeanTeacherSpec().unlabelled_weight  # SEMI leaves the weight at its default
    np.testing.assert_allclose(metrics["train/unlabelled_weight"].dropna(),
                               [weight * math.exp(-5), weight * math.exp(-1.25)], rtol=1e-6)
    assert ((metrics["train/confident_fraction"].dropna() >= 0) & (metrics["train/confident_fraction"].dropna() <= 1)
            ).all()

    last = version / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 2 and int(ckpt["state_dict"]["ema_teacher.n_averaged"]) == 2
    student = {k[len("network."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("network.")}
    teacher = {k[len("ema_teacher.module."):]: v for k, v in ckpt["state_dict"].items()
               if k.startswith("ema_teacher.module.")}
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # the mean of two iterates, not a copy
    # The optimiser holds the student's parameters only.
    n_optimised = sum(len(group["params"]) for group in ckpt["optimizer_states"][0]["param_groups"])
    assert n_optimised == len(list(build_network(json.loads(TINY_NET)).parameters()))
    assert ckpt["hyper_parameters"]["semi"]["ema_decay"] == 0.9

    # Resume from that checkpoint: the teacher at the start of training is the saved one, and its update count
    # continues (2 saved + 2 new steps).
    module = SemiSupervisedModule(network=json.loads(TINY_NET), roi_size=[16, 16, 16],
                                  semi=ckpt["hyper_parameters"]["semi"], lr=0.01)
    dm = SegmentationDataModule(str(semi_manifest), num_folds=3, patch_size=[16, 16, 16], batch_size=1,
                                samples_per_volume=1, num_workers=0, unlabelled_ratio=1.0)
    probe = _TeacherAtStart()
    trainer = pl.Trainer(max_epochs=2, callbacks=[probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=5)
    trainer.fit(module, dm, ckpt_path=str(last))
    saved = {k[len("ema_teacher."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_teacher.")}
    assert probe.state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(probe.state[key], value, rtol=0, atol=0)
    assert trainer.global_step == 4 and int(module.ema_teacher.n_averaged) == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.unlabelled_ratio", "0"], "model.semi is set but data.unlabelled_ratio is 0"),
        (["--model.semi", "null"], "but model.semi is not set"),
        (["--model.semi", '{"ema_decay": 2.0}'], "semi.ema_decay"),
    ],
)
def test_mismatched_semi_settings_are_a_clear_error_before_training(semi_manifest, tmp_path, capsys, override,
                                                                    message):
    try:
        code = main(_fit_args(semi_manifest, tmp_path / "runs", *override))
    except SystemExit as exc:  # rejected while parsing the config
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))

"""SegmentationModule and the training command line, end to end on tiny phantoms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest
from medjdt.losses import DiceSemimetricLoss, SegmentationLoss
from medjdt.models import SegmentationModule, build_network

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

TINY_NET = (
    '{"class_path": "UNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, '
    '"channels": [4, 8], "strides": [2], "num_res_units": 0}}'
)
NET_3D = json.loads(TINY_NET)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, cases=7, raters=3, shape=(24, 24, 24), dims=3, seed=0, folds=3)


def _fit_args(manifest: Path, run_dir: Path | None, *extra: str, epochs: int = 1) -> list[str]:
    """Arguments of a tiny CPU run; ``run_dir=None`` keeps the default loggers (``runs/<config>/version_N``)."""
    logger = [] if run_dir is None else [
        "--trainer.logger", '{"class_path": "pytorch_lightning.loggers.CSVLogger", '
        f'"init_args": {{"save_dir": "{run_dir}", "name": "run"}}}}',
    ]
    return [
        "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--data.manifest", str(manifest), "--data.demo", "null",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.num_folds", "3", "--data.samples_per_volume", "1",
        "--model.network", TINY_NET, "--model.sw_batch_size", "2",
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *logger,
        *extra,
    ]


def _version_dir(run_dir: Path) -> Path:
    versions = sorted((run_dir / "run").glob("version_*"))
    assert versions, f"no run directory under {run_dir}"
    return versions[-1]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_with_print_config(config):
    out = subprocess.run(
        [sys.executable, "-m", "medjdt.cli", "fit", "--config", str(config), "--print_config"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = yaml.safe_load(out.stdout)
    assert parsed["model"]["network"]["class_path"].startswith("monai.networks.nets.")
    assert parsed["data"]["manifest"]


def test_training_step_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = SegmentationModule(
        network={"class_path": "UNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                                    "channels": [8, 16], "strides": [2]}},
        roi_size=[16, 16], lr=0.01, warmup_fraction=0.0,
    )
    image = torch.randn(2, 1, 16, 16)
    label = torch.softmax(3 * torch.randn(2, 3, 16, 16), dim=1)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = module.training_step({"image": image, "label": label}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_deep_supervision_trains_heads_on_area_downsampled_soft_targets():
    module = SegmentationModule(
        network={"class_path": "DynUNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                       "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                                       "upsample_kernel_size": [2, 2], "deep_supervision": True,
                                                       "deep_supr_num": 1}},
        roi_size=[16, 16, 16],
    ).train()
    image = torch.randn(2, 1, 16, 16, 16)
    label = torch.softmax(3 * torch.randn(2, 3, 16, 16, 16), dim=1)
    output = module.network(image)
    loss, _ = module._supervised_loss(output, label)
    # Independent recomputation: main head at full size, the 8^3 head against the 2x2x2 block means of the target.
    seg = SegmentationLoss(0.25, 0.75, DiceSemimetricLoss())
    main_loss, _ = seg(output[:, 0], label)
    head = module.network.heads[0]
    blocks = label.reshape(2, 3, 8, 2, 8, 2, 8, 2).mean(dim=(3, 5, 7))
    torch.testing.assert_close(blocks.sum(1), torch.ones(2, 8, 8, 8))
    head_loss, _ = seg(head, blocks)
    torch.testing.assert_close(loss, (main_loss + 0.5 * head_loss) / 1.5)


def test_fit_validate_predict_resume(phantoms, tmp_path):
    run_dir = tmp_path / "runs"
    assert main(_fit_args(phantoms, run_dir, epochs=1)) == 0
    version = _version_dir(run_dir)
    ckpts = {p.name for p in (version / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts)
    per_case = pd.read_csv(version / "val_per_case.csv")
    manifest = read_manifest(phantoms)
    val_cases = sorted(manifest.frame.loc[manifest.frame["fold"] == 0, "case_id"].unique())
    assert sorted(per_case["case_id"]) == val_cases
    metrics = pd.read_csv(version / "metrics.csv")
    for name in ("val/dice", "val/soft_dice", "val/thresholded_dice", "val/ece", "val/brier", "val/nll"):
        values = metrics[name].dropna()
        assert len(values) == 1 and np.isfinite(values).all(), name
    assert ((metrics["val/dice"].dropna() >= 0) & (metrics["val/dice"].dropna() <= 1)).all()
    # The logged per-image aggregates are the means of the per-case CSV's columns.
    for name in ("dice", "soft_dice", "thresholded_dice"):
        assert metrics[f"val/{name}"].dropna().iloc[-1] == pytest.approx(per_case[name].mean(), rel=1e-5)

    # The checkpoint loads as a plain SegmentationModule, weights included.
    last = version / "checkpoints" / "last.ckpt"
    loaded = SegmentationModule.load_from_checkpoint(last, map_location="cpu")
    saved = torch.load(last, weights_only=False)["state_dict"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)

    # Resume from last: the epoch count continues (1 done, 3 requested), in the same run folder. With validation at
    # epoch 1 only, last.ckpt still holds the state after the final epoch (2), not the last validated or best one.
    first = torch.load(last, weights_only=False)
    resume = _fit_args(phantoms, run_dir, "--ckpt_path", str(last), "--trainer.check_val_every_n_epoch", "2", epochs=3)
    assert main(resume) == 0
    assert _version_dir(run_dir) == version  # no new folder
    resumed = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * first["global_step"]

    # Predict: one probability map and one label map per case on the original grid and affine, written next to the
    # run that made the checkpoint (<run>/predict/<checkpoint name>/predictions).
    predict = _fit_args(phantoms, run_dir, "--ckpt_path", str(last), "--data.predict_on", "all",
                        "--model.overlap", "0.6")
    predict[0] = "predict"
    network_at = predict.index("--model.network")
    del predict[network_at : network_at + 2]  # the tiny network must come from the checkpoint, not demo.yaml
    assert main(predict) == 0
    evaluation = version / "predict" / "last"
    pred_dir = evaluation / "predictions"
    # The model's settings come from the checkpoint, but an explicit --model.* argument wins.
    config = yaml.safe_load((evaluation / "config.yaml").read_text())
    assert config["model"]["overlap"] == 0.6 and config["model"]["sw_batch_size"] == 2
    for case_id, rows in manifest.frame.groupby("case_id"):
        original = nib.load(rows["image"].iloc[0])
        probs = nib.load(pred_dir / f"{case_id}_probs.nii.gz")
        label = nib.load(pred_dir / f"{case_id}_label.nii.gz")
        np.testing.assert_allclose(probs.affine, original.affine, atol=1e-5)
        np.testing.assert_allclose(label.affine, original.affine, atol=1e-5)
        assert probs.shape == (*original.shape[:3], 3)
        assert label.shape == original.shape[:3]
        p = probs.get_fdata()
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(label.get_fdata().astype(int), p.argmax(-1))


def test_resume_with_ckpt_path_last_continues_the_latest_run(phantoms, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_fit_args(phantoms, None, "--ckpt_path", "last")) == 2  # nothing to resume yet
    assert "no run with a checkpoints/last.ckpt under runs/demo" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a command stopped by a check leaves nothing behind
    assert main(_fit_args(phantoms, None, epochs=1)) == 0
    runs = tmp_path / "runs" / "demo"
    first = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    capsys.readouterr()
    assert main(_fit_args(phantoms, None, "--ckpt_path", "last", epochs=2)) == 0
    out = capsys.readouterr().out
    assert "resuming runs/demo/version_0/checkpoints/last.ckpt (epoch 0, step 2) in its run folder" in out
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]  # resumed in place
    second = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["epoch"] == 1 and second["global_step"] == 2 * first["global_step"]
    # metrics.csv goes on: the first epoch's rows are kept, the second's appended
    assert sorted(pd.read_csv(runs / "version_0" / "metrics.csv")["epoch"].dropna().unique()) == [0, 1]


def test_bf16_mixed_precision_fit(phantoms, tmp_path):
    run_dir = tmp_path / "runs"
    assert main(_fit_args(phantoms, run_dir, "--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches",
                          "2")) == 0
    metrics = pd.read_csv(_version_dir(run_dir) / "metrics.csv")
    assert np.isfinite(metrics["train/loss"].dropna()).all()
    assert np.isfinite(metrics["val/dice"].dropna()).all()


def test_a_config_without_the_evaluation_tables_callback_still_writes_the_per_case_tables(phantoms, tmp_path):
    run_dir = tmp_path / "runs"
    assert main(_fit_args(phantoms, run_dir, "--trainer.callbacks", "[]", "--trainer.limit_train_batches", "1")) == 0
    version = _version_dir(run_dir)
    manifest = read_manifest(phantoms)
    val_cases = sorted(manifest.frame.loc[manifest.frame["fold"] == 0, "case_id"].unique())
    assert sorted(pd.read_csv(version / "val_per_case.csv")["case_id"]) == val_cases
    assert (version / "val_reliability.csv").is_file()
    assert "EvaluationTables" not in (version / "config.yaml").read_text()  # added by the command line


def test_distillation_from_a_teacher_checkpoint_through_the_cli(phantoms, tmp_path):
    teacher_dir = tmp_path / "teacher"
    bigger = TINY_NET.replace('"channels": [4, 8]', '"channels": [8, 16]')
    assert main(_fit_args(phantoms, teacher_dir, "--model.network", bigger, "--trainer.limit_train_batches", "2")) == 0
    teacher_ckpt = _version_dir(teacher_dir) / "checkpoints" / "last.ckpt"
    student_dir = tmp_path / "student"
    teacher = f'{{"checkpoint": "{teacher_ckpt}", "temperature": 2.0, "label_weight": 0.5, "teacher_weight": 0.5}}'
    assert main(_fit_args(phantoms, student_dir, "--model.teacher", teacher, "--trainer.limit_train_batches", "2")) == 0
    metrics = pd.read_csv(_version_dir(student_dir) / "metrics.csv")
    assert np.isfinite(metrics["train/kd_kl"].dropna()).all() and (metrics["train/kd_kl"].dropna() >= -1e-5).all()
    assert np.isfinite(metrics["train/kd_jdt"].dropna()).all()
    student_ckpt = torch.load(_version_dir(student_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("_teacher") for k in student_ckpt["state_dict"])


NET_2D = {"class_path": "UNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                              "channels": [4, 8], "strides": [2]}}


def _teacher_checkpoint(path: Path, network: torch.nn.Module, spec: dict = NET_2D) -> Path:
    """A checkpoint holding what load_teacher reads: the network spec and the ``network.*`` weights."""
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    torch.save({"hyper_parameters": {"network": spec}, "state_dict": state}, path)
    return path


def _student(teacher_ckpt: Path, temperature: float, weights: torch.nn.Module) -> SegmentationModule:
    teacher = {"checkpoint": str(teacher_ckpt), "temperature": temperature, "label_weight": 0.5, "teacher_weight": 0.5}
    module = SegmentationModule(network=NET_2D, roi_size=[8, 8], teacher=teacher)
    module.network.load_state_dict(weights.state_dict())
    return module


def test_teacher_loss_matches_the_formula(tmp_path):
    torch.manual_seed(0)
    teacher = SegmentationModule(network=NET_2D, roi_size=[8, 8]).network.eval()
    module = _student(_teacher_checkpoint(tmp_path / "t.ckpt", teacher), 2.0, build_network(NET_2D))
    image = torch.randn(2, 1, 8, 8)
    logits = torch.randn(2, 3, 8, 8)
    total, parts = module._teacher_loss(logits, image)
    with torch.no_grad():
        p_t = torch.softmax(teacher(image) / 2.0, dim=1)
    log_q = torch.log_softmax(logits / 2.0, dim=1)
    kl = (p_t * (torch.log(p_t) - log_q)).sum(1).mean()
    torch.testing.assert_close(parts["kd_kl"], kl, rtol=1e-4, atol=1e-6)
    jdt = DiceSemimetricLoss()(logits / 2.0, p_t)
    torch.testing.assert_close(total, 4.0 * kl + jdt, rtol=1e-4, atol=1e-6)


def test_distillation_term_uses_the_teacher_zero_at_its_weights_and_following_the_temperature(tmp_path):
    torch.manual_seed(0)
    teacher = build_network(NET_2D).eval()
    other = build_network(NET_2D)  # other random weights
    ckpt = _teacher_checkpoint(tmp_path / "teacher.ckpt", teacher)
    batch = {"image": torch.randn(2, 1, 8, 8), "label": torch.softmax(3 * torch.randn(2, 3, 8, 8), 1)}

    def losses(temperature: float, weights: torch.nn.Module) -> tuple[float, float, dict]:
        module = _student(ckpt, temperature, weights).eval()
        with torch.no_grad():
            total, parts = module._labelled_loss(batch)
            supervised, _ = module.loss(module.network(batch["image"]), batch["label"])
        return float(total), float(supervised), parts

    for t in (1.0, 4.0):  # a student with the teacher's weights: the teacher term adds nothing
        total, supervised, parts = losses(t, teacher)
        assert abs(float(parts["kd_kl"])) < 1e-6 and abs(float(parts["kd_jdt"])) < 1e-6
        assert total == pytest.approx(0.5 * supervised, abs=1e-6)
    kd = {}
    for t in (1.0, 4.0):  # another student: a positive teacher term, which changes with the temperature
        total, supervised, parts = losses(t, other)
        assert float(parts["kd_kl"]) > 1e-4 and float(parts["kd_jdt"]) > 1e-4
        kd[t] = (total - 0.5 * supervised) / 0.5
        assert kd[t] == pytest.approx(t**2 * float(parts["kd_kl"]) + float(parts["kd_jdt"]), rel=1e-5)
    assert abs(kd[4.0] - kd[1.0]) > 1e-3 * kd[1.0]


def test_bf16_mixed_precision_runs_the_network_in_bfloat16_with_the_float32_loss():
    """Lightning's ``bf16-mixed`` (torch.autocast on the CPU here, as on a GPU): the logits of the training step
    are bfloat16, the loss is computed in float32 from them and matches the float32 loss of the same weights and
    batch to within bfloat16 rounding."""
    import copy

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = SegmentationModule(network=NET_3D, roi_size=[16, 16, 16])
    image = torch.randn(2, 1, 16, 16, 16)
    label = torch.softmax(3 * torch.randn(2, 3, 16, 16, 16), 1)
    float32_module = copy.deepcopy(module)  # the weights the bf16 step starts from
    logits_dtypes: list[torch.dtype] = []
    module.network.register_forward_hook(lambda net, inputs, output: logits_dtypes.append(output.dtype))
    step_losses: list[torch.Tensor] = []

    class StepLoss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_losses.append(outputs["loss"].detach())

    trainer = pl.Trainer(
        precision="bf16-mixed", accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[StepLoss()],
    )
    trainer.fit(module, DataLoader([{"image": image[i], "label": label[i]} for i in range(2)], batch_size=2))
    assert logits_dtypes == [torch.bfloat16]
    (bf16_loss,) = step_losses
    assert bf16_loss.dtype == torch.float32
    with torch.no_grad():
        float32_loss, _ = float32_module._labelled_loss({"image": image, "label": label})
    # bfloat16 keeps 8 significant bits: one rounding is off by up to 2**-8 ~ 0.4% relative. Each logit is off by
    # a few such roundings (inputs and weights of the convolutions are rounded; they accumulate in float32), but
    # independently per voxel, and the loss sums over 2 x 16**3 voxels in float32, which averages the errors down:
    # measured 3e-6 here (at most 1.4e-4 over other seeds and larger weights). rtol 1e-3, a quarter of one bf16
    # rounding, keeps a margin of 7x over that and still fails a loss that is reduced in bfloat16 (off by up to
    # 2**-8) or computed from anything but these logits.
    torch.testing.assert_close(bf16_loss, float32_loss, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.fusion", "median"], "fusion"),
        (["--model.network", '{"class_path": "NoSuchNet", "init_args": {"in_channels": 1, "out_channels": 3}}'],
         "NoSuchNet"),
        (["--data.patch_size", "[64, 64, 64]"], "patch"),
        (["--model.network", TINY_NET.replace('"out_channels": 3', '"out_channels": 4')], "out_channels=4"),
        (["--model.teacher.checkpoint", "/nonexistent/teacher.ckpt"], "teacher checkpoint"),
    ],
)
def test_bad_configuration_is_a_clear_error_before_training(phantoms, tmp_path, capsys, override, message):
    try:
        code = main(_fit_args(phantoms, tmp_path / "runs", *override))
    except SystemExit as exc:  # rejected while parsing the config (jsonargparse)
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert main(_fit_args(tmp_path / "missing.csv", tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err


def test_teacher_with_other_classes_is_rejected(phantoms, tmp_path):
    from medjdt.models import load_teacher

    net = {"class_path": "UNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                               "channels": [4, 8], "strides": [2]}}
    module = SegmentationModule(network=net, roi_size=[8, 8, 8])
    ckpt = tmp_path / "two_class.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    with pytest.raises(ValueError, match="output channels"):
        load_teacher(ckpt, num_classes=3, in_channels=1)
    assert isinstance(load_teacher(ckpt, num_classes=2, in_channels=1), torch.nn.Module)


def test_ddp_two_cpu_processes_sync_metrics_and_write_each_case_once(phantoms, tmp_path):
    run_dir = tmp_path / "runs"
    args = _fit_args(phantoms, run_dir, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "2")
    out = subprocess.run([sys.executable, "-m", "medjdt.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    per_case = pd.read_csv(_version_dir(run_dir) / "val_per_case.csv")
    manifest = read_manifest(phantoms)
    val_cases = sorted(manifest.frame.loc[manifest.frame["fold"] == 0, "case_id"].unique())
    assert len(val_cases) % 2 == 1  # an uneven split: a padding sampler would evaluate one case twice
    assert sorted(per_case["case_id"]) == val_cases  # every validation case exactly once


def test_empty_training_fold_is_a_clear_error(phantoms, tmp_path, capsys):
    import shutil

    for name in ("manifest.csv", "manifest.json"):
        shutil.copy(phantoms.parent / name, tmp_path / name)
    frame = pd.read_csv(tmp_path / "manifest.csv")
    frame["image"] = [str(phantoms.parent / p) for p in frame["image"]]
    frame["label"] = [str(phantoms.parent / p) for p in frame["label"]]
    frame["fold"] = 0  # every case in the validation fold: nothing left to train on
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    assert main(_fit_args(tmp_path / "manifest.csv", tmp_path / "runs")) == 2
    assert "no cases in train folds" in capsys.readouterr().err

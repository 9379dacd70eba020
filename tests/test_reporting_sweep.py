"""``medjdt sweep`` end to end on tiny phantoms (training subprocesses), its resuming and skipping, the report of
its runs, ``--dry-run`` and bad input."""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medjdt.cli import main
from medjdt.data import read_manifest
from medjdt.reporting.sweep import plan_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.yaml")
TINY_NET = (
    '{"class_path": "UNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, '
    '"channels": [4, 8], "strides": [2], "num_res_units": 0}}'
)


def tiny_overrides(manifest: Path) -> list[str]:
    """``medjdt fit`` options for a one-epoch run of a tiny network on tiny phantoms."""
    return [
        "--data.manifest", str(manifest), "--data.demo", "null",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.samples_per_volume", "1", "--model.network", TINY_NET, "--model.sw_batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, str]:
    """A finished sweep (mean and majority, seed 0): (manifest, sweep folder, printed output)."""
    root = tmp_path_factory.mktemp("sweep")
    # a fresh demo-data manifest, trained as it is (its folds are read from it)
    assert main(["demo-data", "--out", str(root / "phantoms"), "--cases", "6", "--shape", "16", "16", "16",
                 "--folds", "3"]) == 0
    manifest = root / "phantoms" / "manifest.csv"
    out = root / "runs"
    capture = root / "stdout.txt"
    with capture.open("w") as f, contextlib.redirect_stdout(f):
        code = main(["sweep", "--config", CONFIG, "--fusion", "mean", "majority", "--seeds", "0", "--out", str(out),
                     "--", *tiny_overrides(manifest)])
    assert code == 0, capture.read_text()
    return manifest, out, capture.read_text()


def test_each_run_is_trained_evaluated_on_its_last_checkpoint_and_recorded(sweep):
    manifest, out, printed = sweep
    assert sorted(p.name for p in out.iterdir()) == ["majority-seed0", "mean-seed0"]
    lines = printed.splitlines()
    assert lines[0].startswith("[1/2] mean-seed0: training") and lines[2].startswith("[2/2] majority-seed0: training")
    assert lines[1].startswith("[1/2] mean-seed0: done in") and lines[3].startswith("[2/2] majority-seed0: done in")
    val_cases = sorted(r.case_id for r in read_manifest(manifest).cases([0]))
    for fusion in ("mean", "majority"):
        run = out / f"{fusion}-seed0"
        state = json.loads((run / "sweep.json").read_text())
        assert state["stage"] == "done" and (state["fusion"], state["seed"]) == (fusion, 0)
        assert state["manifest"] == str(manifest)
        assert state["evaluated_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["data"]["fusion"], config["seed_everything"], config["data"]["seed"]) == (fusion, 0, 0)
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
        # The run's results are those of the validation of last.ckpt: the fit's own, as its final epoch validated
        # (run.json records that validation's step, the final step), so no second validation runs.
        commands = [shlex.split(line[2:]) for line in (run / "sweep.log").read_text().splitlines()
                    if line.startswith("$ ")]
        assert [c[3] for c in commands] == ["fit"]
        assert commands[0][commands[0].index("--run_dir") + 1] == str(run)
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "finished" and record["last_validation"]["step"] == record["global_step"]
        assert not (run / "final").exists()
        assert sorted(pd.read_csv(run / "val_per_case.csv", dtype={"case_id": str})["case_id"]) == val_cases
        # A fresh run folder holding only the sweep's own files is not a reused log folder.
        assert "exists and is not empty" not in (run / "sweep.log").read_text()


def test_rerunning_skips_finished_runs(sweep, capsys):
    manifest, out, _ = sweep
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["sweep", "--config", CONFIG, "--fusion", "mean", "majority", "--seeds", "0", "--out", str(out),
                 "--", *tiny_overrides(manifest)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["[1/2] mean-seed0: done already, skipped", "[2/2] majority-seed0: done already, skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_the_report_of_the_sweep_equals_the_recomputation_from_its_csvs(sweep, tmp_path):
    _, out, _ = sweep
    runs = sorted(out.iterdir())
    assert main(["report", *map(str, runs), "--out", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("fusion")
    assert list(summary.index) == ["mean", "majority"]
    for run in runs:
        values = pd.read_csv(run / "val_per_case.csv")
        fusion = run.name.split("-")[0]
        for metric in ("dice", "soft_dice", "thresholded_dice", "ece", "brier", "nll"):
            data = values[metric].dropna().to_numpy()
            assert summary.loc[fusion, f"{metric}_mean"] == pytest.approx(np.mean(data), rel=1e-12)
            assert summary.loc[fusion, f"{metric}_std"] == pytest.approx(np.std(data, ddof=1), rel=1e-12, nan_ok=True)
        assert (tmp_path / f"reliability_{fusion}-seed0.png").is_file()


def test_interrupted_runs_resume_from_their_last_checkpoint_or_evaluation(sweep, capsys):
    manifest, out, _ = sweep
    mean, majority = out / "mean-seed0", out / "majority-seed0"
    # As if training of mean had been interrupted after writing last.ckpt, and majority's final evaluation.
    for run, stage in ((mean, "training"), (majority, "trained")):
        state = json.loads((run / "sweep.json").read_text())
        (run / "sweep.json").write_text(json.dumps({**state, "stage": stage}))
    metrics = (mean / "metrics.csv").read_bytes()
    assert main(["sweep", "--config", CONFIG, "--fusion", "mean", "majority", "--seeds", "0", "--out", str(out),
                 "--", *tiny_overrides(manifest)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"[1/2] mean-seed0: resuming from {mean / 'checkpoints' / 'last.ckpt'}"
    assert printed[1].startswith("[1/2] mean-seed0: done in")
    assert printed[2] == "[2/2] majority-seed0: trained already, evaluating the last checkpoint"
    assert printed[3].startswith("[2/2] majority-seed0: done in")

    def commands(run: Path) -> list[list[str]]:
        return [shlex.split(line[2:]) for line in (run / "sweep.log").read_text().splitlines() if line.startswith("$ ")]

    mean_commands = commands(mean)
    # The resumed fit has nothing left to train (max_epochs reached), so last.ckpt is validated separately.
    assert [c[3] for c in mean_commands] == ["fit", "fit", "validate"]
    assert "--ckpt_path" not in mean_commands[0]
    assert mean_commands[1][mean_commands[1].index("--ckpt_path") + 1] == str(mean / "checkpoints" / "last.ckpt")
    assert mean_commands[2][mean_commands[2].index("--run_dir") + 1] == str(mean / "final")
    # majority's fit had validated last.ckpt at its final epoch: its results stand, nothing runs again.
    assert [c[3] for c in commands(majority)] == ["fit"]
    # The resumed run continues metrics.csv in place (nothing was logged after last.ckpt, so nothing is dropped).
    assert (mean / "metrics.csv").read_bytes().startswith(metrics)
    for run in (mean, majority):
        assert json.loads((run / "sweep.json").read_text())["stage"] == "done"


def test_a_run_directory_of_other_settings_is_an_error(sweep, capsys):
    manifest, out, _ = sweep
    overrides = [*tiny_overrides(manifest), "--model.lr", "0.5"]
    assert main(["sweep", "--config", CONFIG, "--fusion", "mean", "--seeds", "0", "--out", str(out),
                 "--", *overrides]) == 2
    assert "created with other settings" in capsys.readouterr().err


def test_a_failing_run_stops_the_sweep_naming_the_run_and_its_log(sweep, tmp_path, capsys):
    manifest, _, _ = sweep
    overrides = [*tiny_overrides(manifest), "--data.patch_size", "[64, 64, 64]"]  # larger than the volumes
    assert main(["sweep", "--config", CONFIG, "--fusion", "random", "mean", "--seeds", "0", "--out", str(tmp_path),
                 "--", *overrides]) == 1
    err = capsys.readouterr().err
    assert "run random-seed0: training failed" in err and str(tmp_path / "random-seed0" / "sweep.log") in err
    assert json.loads((tmp_path / "random-seed0" / "sweep.json").read_text())["stage"] == "training"
    assert not (tmp_path / "mean-seed0").exists()


def test_dry_run_prints_one_resumable_command_per_run_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["sweep", "--config", CONFIG, "--fusion", "mean", "staple", "--seeds", "0", "1", "--out", str(out),
                 "--dry-run", "--", "--trainer.max_epochs", "3"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert not out.exists()
    runs = {(c[c.index("--fusion") + 1], c[c.index("--seeds") + 1]) for c in commands}
    assert len(commands) == 4 and runs == {(f, s) for f in ("mean", "staple") for s in ("0", "1")}
    for command in commands:
        assert command[1:4] == ["-m", "medjdt.cli", "sweep"]
        assert command[command.index("--out") + 1] == str(out)
        assert command[command.index("--") + 1 :] == ["--trainer.max_epochs", "3"]


def test_runs_are_planned_seed_by_seed():
    runs = plan_sweep(["mean", "majority"], [1, 0], "/tmp/sweep")
    assert [r.name for r in runs] == ["mean-seed1", "majority-seed1", "mean-seed0", "majority-seed0"]
    assert runs[0].directory == Path("/tmp/sweep/mean-seed1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fusion", "median", "--seeds", "0"], "invalid choice: 'median'"),
        (["--fusion", "mean", "mean", "--seeds", "0"], "repeated fusion method"),
        (["--fusion", "mean", "--seeds", "0", "0"], "repeated seed"),
        (["--fusion", "mean", "--seeds", "-1"], "non-negative"),
        (["--fusion", "mean", "--seeds", "0", "--", "--data.fusion", "staple"], "sets --data.fusion itself"),
        (["--fusion", "mean", "--seeds", "0", "--", "--trainer.logger=null"], "sets --trainer.logger itself"),
        (["--fusion", "mean", "--seeds", "0", "--", "--trainer.logger.init_args.save_dir", "x"], "sets --trainer.lo"),
    ],
)
def test_bad_sweeps_are_rejected_before_anything_runs(tmp_path, capsys, args, message):
    assert main(["sweep", "--config", CONFIG, "--out", str(tmp_path / "runs"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_foreign_run_directory_is_an_error(tmp_path, capsys):
    (tmp_path / "mean-seed0").mkdir()
    (tmp_path / "mean-seed0" / "metrics.csv").write_text("epoch\n0\n")
    assert main(["sweep", "--config", CONFIG, "--fusion", "mean", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "is not a sweep run directory" in capsys.readouterr().err


def test_a_missing_config_is_an_error(tmp_path, capsys):
    missing = tmp_path / "none.yaml"
    assert main(["sweep", "--config", str(missing), "--fusion", "mean", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err

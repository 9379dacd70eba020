"""The README is a contract: every ``bash`` block in it runs, in order, in one working folder, on phantoms and a
miniature KiTS layout, with small overrides (tiny network, one or two epochs) appended to the training commands."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pandas as pd
from _layouts import make_kits21

from medjdt.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY = ["--model.network.init_args.channels", "[4, 8]", "--model.network.init_args.strides", "[2]",
        "--model.network.init_args.num_res_units", "0"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# The demo config's phantoms, smaller; identical in every command so that they describe one dataset.
DEMO_SMALL = ["--data.demo", json.dumps({"cases": 4, "raters": 3, "shape": [16, 16, 16], "dims": 3, "seed": 0,
                                         "folds": 2}),
              "--data.patch_size", "16", "16", "16", "--data.num_workers", "0", *TINY, *QUIET]
KITS_TINY = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.num_workers", "0",
             "--model.network", json.dumps({"class_path": "monai.networks.nets.UNet", "init_args": {
                 "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2],
                 "num_res_units": 0}}),
             "--data.patch_size", "16", "16", "8", "--data.batch_size", "1", "--data.samples_per_volume", "1",
             "--trainer.max_epochs", "1", *QUIET]


def readme_commands() -> list[list[str]]:
    """Every command of every ``bash`` block, in order (``&&`` chains split, continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def overrides(args: list[str]) -> list[str]:
    """The small overrides for one README command (nothing for the commands that train nothing)."""
    command = args[1]
    config = args[args.index("--config") + 1] if "--config" in args else ""
    if command == "demo-data" and args[args.index("--out") + 1] == "my_data":
        return ["--cases", "6", "--shape", "32", "32", "24"]  # "Your own data": smaller phantoms, same layout
    if command == "plan":
        return ["--max-epochs", "1"]
    if command in ("fit", "check", "predict", "validate", "test"):
        if config.endswith("kits.yaml"):
            return KITS_TINY
        if config.endswith("plan.yaml"):
            return ["--data.num_workers", "0", *QUIET]
        epochs = ["--trainer.max_epochs", "2" if "--ckpt_path" in args and command == "fit" else "1"]
        return [*DEMO_SMALL, *(epochs if command == "fit" else [])]
    if command == "sweep":
        return ["--", *DEMO_SMALL, "--trainer.max_epochs", "1"]
    return []


def test_every_readme_command_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data_manifests").mkdir()
    kits = tmp_path / "kits21"
    make_kits21(kits / "dataset")  # the published repository layout: the data lie in dataset/
    ran = []
    for args in readme_commands():
        if args[0] == "pip" or args[:3] == ["python", "-m", "pytest"]:
            continue  # installing, and this very test suite
        assert args[0] == "medjdt", f"README command is not a medjdt command: {shlex.join(args)}"
        args = [a.replace("/data/kits21", str(kits)) for a in args]
        expanded = [m for a in args[1:] for m in (sorted(glob.glob(a)) if "*" in a else [a])]
        code = main([*expanded, *overrides(args)])
        captured = capsys.readouterr()
        assert code == 0, f"{shlex.join(args)} failed:\n{captured.err[-3000:]}"
        ran.append(args[1])
    assert ran.count("fit") >= 4 and {"check", "predict", "evaluate", "sweep", "report", "manifest"} <= set(ran)
    assert {"raters", "plan"} <= set(ran)
    # "Your own data": the rater report, the plan, the case views of the evaluation
    assert (tmp_path / "runs/my_raters/raters.md").read_text().startswith("# Rater agreement")
    assert (tmp_path / "runs/my_plan/plan.md").is_file()
    assert len(list((tmp_path / "runs/plan/version_0/predict/last/case_views").glob("*.png"))) >= 1
    # What the blocks promise: a resumed run in place, predictions next to it, evaluated case by case.
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["version_0"]
    evaluation = pd.read_csv(tmp_path / "runs/demo/version_0/predict/last/evaluation.csv")
    assert evaluation["case_id"].nunique() == 2  # the validation fold of the small phantoms
    assert (tmp_path / "runs" / "sweep_report").is_dir() and len(list((tmp_path / "runs" / "sweep").iterdir())) == 8


def test_the_readme_study_file_is_a_valid_study(tmp_path):
    from medjdt.reporting.study_spec import read_study

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
                 if "arms:" in b)
    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    (tmp_path / "study.yaml").write_text(block)
    spec = read_study(tmp_path / "study.yaml")
    assert spec.baseline == "majority" and len(spec.arms) == 4
    assert spec.training_name(spec.arm("majority_ts")) == "majority"  # temperature scaling reuses the training
    assert spec.arm("majority_ts").temperature == "auto"

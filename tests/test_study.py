"""A miniature fusion study through the command line: 3 arms (two trainings, one temperature-scaled), one seed, a
few steps, phantoms with a separate held-out test manifest; resuming, the job-array output, and the study file's
checks."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest, write_manifest
from medjdt.reporting.study_spec import read_study

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.patch_size", "[16, 16, 16]", "--data.num_workers", "0", "--data.samples_per_volume", "1",
        "--model.network.init_args.channels", "[4, 8]", "--model.network.init_args.strides", "[2]",
        "--model.network.init_args.num_res_units", "0", "--trainer.max_epochs", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path, Path, Path, str]:
    """A finished miniature study: (study file, output folder, training manifest, test manifest, its output)."""
    root = tmp_path_factory.mktemp("study")
    full = read_manifest(make_phantom_dataset(root / "phantoms", cases=9, raters=3, shape=(16, 16, 16), dims=3,
                                              seed=3, folds=3))
    meta = {"num_classes": 3, "class_names": full.class_names, "modality": "CT", "spatial_dims": 3}
    test_ids = sorted(full.frame["case_id"].unique())[-3:]
    train_rows = full.frame[~full.frame["case_id"].isin(test_ids)]
    train_rows = train_rows.assign(fold=train_rows["case_id"].rank(method="dense").astype(int) % 3)
    train = write_manifest(train_rows, root / "train.csv", num_folds=3, **meta)
    test = write_manifest(full.frame[full.frame["case_id"].isin(test_ids)].assign(fold=0), root / "test.csv",
                          num_folds=1, **meta)
    spec = {
        "name": "mini",
        "config": str(ROOT / "configs" / "demo.yaml"),
        "data": {"manifest": "train.csv", "test_manifest": "test.csv"},
        "seeds": [0],
        "baseline": "majority",
        "checkpoint": "best",
        "arms": [
            {"name": "majority", "overrides": {"data.fusion": "majority"}},
            {"name": "mean", "overrides": {"data.fusion": "mean"}},
            {"name": "majority_ts", "overrides": {"data.fusion": "majority"}, "temperature": "auto"},
        ],
        "notes": ["phantoms: synthetic raters and intensities"],
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = root / "out"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["study", "run", str(path), "--out", str(out), "--", *TINY])
    assert code == 0, printed.getvalue()
    return path, out, train, test, printed.getvalue()


def test_every_arm_is_trained_tested_and_reported(study):
    path, out, train, test, printed = study
    assert printed.splitlines()[0].startswith("study mini: 2 training(s) x 1 seed(s) = 2 run(s), 3 test evaluation(s)")
    report = out / "report"
    per_case = pd.read_csv(report / "per_case.csv", dtype={"case_id": str})
    test_ids = sorted(read_manifest(test).frame["case_id"].unique())
    assert sorted(per_case["arm"].unique()) == ["majority", "majority_ts", "mean"]
    for _, group in per_case.groupby("arm"):
        assert sorted(group["case_id"]) == test_ids
    summary = pd.read_csv(report / "summary.csv")
    assert {"dice", "ece", "soft_dice", "rater_dice"} <= set(summary["metric"])
    paired = pd.read_csv(report / "paired.csv")
    assert set(paired["arm"]) == {"mean", "majority_ts"} and set(paired["baseline"]) == {"majority"}
    markdown = (report / "summary.md").read_text()
    assert markdown.startswith("# mini: fusion study on held-out cases\n\n")
    assert "phantoms: synthetic raters and intensities" in markdown and "Inter-rater ceiling" in markdown
    for name in ("reliability.png", "dice_vs_ece.png", "forest.png", "temperatures.csv"):
        assert (report / name).is_file(), name
    # Temperature scaling changes calibration, never the argmax: Dice equal case by case to its untreated arm.
    dice = per_case.pivot_table(index="case_id", columns="arm", values="dice")
    pd.testing.assert_series_equal(dice["majority"], dice["majority_ts"], check_names=False)
    assert not per_case.loc[per_case["arm"] == "majority_ts", "ece"].equals(
        per_case.loc[per_case["arm"] == "majority", "ece"])


def test_test_cases_never_entered_training_or_selection(study):
    _, out, train, test, _ = study
    test_ids = set(read_manifest(test).frame["case_id"])
    train_ids = set(read_manifest(train).frame["case_id"])
    assert not test_ids & train_ids
    for run in ("majority-seed0", "mean-seed0"):
        folder = out / "runs" / run
        record = json.loads((folder / "run.json").read_text())
        assert record["manifest"]["path"] == str(train)  # trained on the training manifest only
        validated = set(pd.read_csv(folder / "val_per_case.csv", dtype={"case_id": str})["case_id"])
        assert validated and validated <= train_ids  # the checkpoint was selected on training cases
    temperature = next((out / "runs" / "majority-seed0" / "checkpoints").glob("*.temperature.json"))
    fitted = json.loads(temperature.read_text())["fitted_on"]
    assert fitted["manifest"] == str(train) and set(fitted["cases"]) <= train_ids
    predicted = json.loads((out / "runs" / "majority-seed0" / "test-majority" / "run.json").read_text())
    assert predicted["manifest"]["path"] == str(test) and set(predicted["cases"]) == test_ids


def test_rerunning_resumes_without_training_again(study, capsys):
    path, out, _, _, _ = study
    assert main(["study", "run", str(path), "--out", str(out), "--", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "training" not in printed.split("\n", 1)[1].replace("training(s)", "")
    log = (out / "runs" / "majority-seed0" / "study.log").read_text()
    commands = [shlex.split(line[2:])[3] for line in log.splitlines() if line.startswith("$ ")]
    assert commands == ["fit", "predict", "predict"]  # nothing ran twice


def test_dry_run_prints_a_job_array_and_the_report_command(study, capsys):
    path, out, _, _, _ = study
    assert main(["study", "run", str(path), "--out", str(out), "--dry-run", "--seeds", "0", "--", "--x", "1"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    assert lines[0][lines[0].index("--arms") + 1 : lines[0].index("--seeds")] == ["majority", "majority_ts"]
    assert lines[1][lines[1].index("--arms") + 1 : lines[1].index("--seeds")] == ["mean"]
    assert all(line[line.index("--") + 1 :] == ["--x", "1"] for line in lines[:2])
    assert lines[2][3:5] == ["study", "report"]


def test_a_test_manifest_sharing_cases_with_training_is_refused(study, tmp_path, capsys):
    path, _, train, _, _ = study
    assert main(["study", "run", str(path), "--out", str(tmp_path), "--test-manifest", str(train)]) == 2
    assert "held-out cases must never be trained on" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"baseline": "nope"}, "baseline 'nope' is not one of the arms"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "repeated arm name(s) ['a']"),
        ({"arms": [{"name": "a", "overrides": {"data.manifest": "x"}}]}, "the study sets --data.manifest itself"),
        ({"seeds": [0, 0]}, "seeds must be a list of distinct non-negative integers"),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"arms": [{"name": "a/b"}]}, "arm name 'a/b'"),
    ],
)
def test_bad_study_files_are_one_line_errors(study, tmp_path, capsys, change, message):
    path = study[0]
    raw = {**yaml.safe_load(path.read_text()), **change}
    if "arms" in change and "baseline" not in change:
        raw["baseline"] = raw["arms"][0]["name"]
    bad = path.parent / f"bad-{len(list(path.parent.glob('bad-*')))}.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=None) as info:
        read_study(bad)
    assert message in str(info.value)
    assert main(["study", "run", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

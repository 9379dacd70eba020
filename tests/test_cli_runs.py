"""Runs and inputs a researcher can trust, driven through the real command line on phantoms: run folders and their
record, resuming, folds, demo data only on purpose, paths, file modes, one-line errors for bad inputs, quick
answers, clean stops (SIGTERM, Ctrl-C, kill -9) and determinism across DataLoader workers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY_NET = ["--model.network.init_args.channels", "[4, 8]", "--model.network.init_args.strides", "[2]",
            "--model.network.init_args.num_res_units", "0"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Six 16^3 phantoms in three folds (two validation cases in fold 0)."""
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, cases=6, raters=3, shape=(16, 16, 16), dims=3, seed=0, folds=3)


def fit_args(manifest: Path, *extra: str, epochs: int = 1, command: str = "fit") -> list[str]:
    """A tiny CPU run of configs/demo.yaml on ``manifest``."""
    return [
        command, "--config", DEMO, "--data.manifest", str(manifest), "--data.patch_size", "16", "16", "16",
        "--data.batch_size", "2", "--data.num_workers", "0", "--data.samples_per_volume", "1",
        *TINY_NET, "--model.sw_batch_size", "2", "--trainer.max_epochs", str(epochs),
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1", *QUIET, *extra,
    ]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medjdt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def wait_for(path: Path, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    start = time.monotonic()
    while not path.is_file():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stderr.read()[-2000:] if process.stderr else ''}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------- run folders
def test_default_root_dir_decides_where_a_run_goes_and_the_run_records_what_made_it(phantoms, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git working tree
    old = os.umask(0o022)
    try:
        assert main(fit_args(phantoms, "--trainer.default_root_dir", str(tmp_path / "exp"))) == 0
    finally:
        os.umask(old)
    run = tmp_path / "exp" / "version_0"
    assert not (tmp_path / "runs").exists()
    rec = record(run)
    expected_hash = hashlib.sha256(phantoms.read_bytes() + b"\0" + phantoms.with_suffix(".json").read_bytes())
    assert rec["manifest"] == {"path": str(phantoms), "sha256": expected_hash.hexdigest()}
    assert rec["identity"]["manifest"] == {"sha256": expected_hash.hexdigest()}
    assert rec["identity"]["data"]["fusion"] == "mean" and rec["identity"]["data"]["patch_size"] == [16, 16, 16]
    assert rec["identity"]["model"]["network"]["init_args"]["channels"] == [4, 8]
    assert rec["status"] == "finished" and rec["kind"] == "fit"
    for package in ("medjdt", "torch", "monai", "pytorch-lightning"):
        assert rec["versions"][package]
    assert rec["git"] is None
    assert rec["sessions"][0]["command"][:2] == ["medjdt", "fit"] and rec["sessions"][0]["cwd"] == str(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["manifest"] == str(phantoms)
    # files medjdt writes get the umask's mode, like any other tool's output (not a temp file's 0600)
    for name in ("run.json", "val_per_case.csv", "val_reliability.csv", "metrics.csv"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    # the summary says where everything is and gives the per-class table
    out = capsys.readouterr().out
    assert f"run folder       {Path('exp/version_0')}" in out
    assert "best checkpoint  exp/version_0/checkpoints/best-epoch000.ckpt (val/dice" in out
    assert "    organ " in out and "    lesion " in out and "ece " in out


def test_the_git_commit_of_the_working_tree_is_recorded(phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert main(fit_args(phantoms, "--run_dir", "my-run", "--trainer.limit_train_batches", "1")) == 0
    assert record(tmp_path / "my-run")["git"] == {"root": str(tmp_path), "commit": head, "dirty": False}


def test_a_loggers_save_dir_decides_the_run_folder(phantoms, tmp_path):
    logger = json.dumps({"class_path": "pytorch_lightning.loggers.CSVLogger",
                         "init_args": {"save_dir": str(tmp_path / "logs"), "name": "exp"}})
    assert main(fit_args(phantoms, "--trainer.logger", logger)) == 0
    assert main(fit_args(phantoms, "--trainer.logger", logger)) == 0
    for n in (0, 1):
        run = tmp_path / "logs" / "exp" / f"version_{n}"
        assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert record(run)["status"] == "finished"


def test_two_fits_started_together_never_share_a_folder(phantoms, tmp_path):
    args = fit_args(phantoms, "--trainer.default_root_dir", str(tmp_path / "runs"), epochs=2)
    processes = [subprocess.Popen([sys.executable, "-m", "medjdt.cli", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    pids = {record(f)["sessions"][0]["pid"] for f in folders}
    assert pids == {p.pid for p in processes}
    for folder in folders:  # each run's own complete outputs
        metrics = pd.read_csv(folder / "metrics.csv")
        assert sorted(metrics["epoch"].dropna().unique()) == [0, 1]
        assert not (folder / ".medjdt.lock").exists()


def test_a_folder_in_use_is_refused(phantoms, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    parent = os.getppid()  # a live process of this host holds the lock
    (run / ".medjdt.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": parent, "since": "now"}))
    assert main(fit_args(phantoms, "--run_dir", str(run))) == 2
    err = capsys.readouterr().err
    assert f"run folder {run} is in use by process {parent}" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------- resume
def test_resume_last_matches_manifest_and_settings_and_says_what_it_found(phantoms, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(phantoms)) == 0
    assert main(fit_args(phantoms, "--data.fusion", "majority")) == 0
    capsys.readouterr()
    # another manifest (same cases, other content) matches neither run
    other = tmp_path / "other"
    shutil.copytree(phantoms.parent, other, ignore=shutil.ignore_patterns(".cache"))
    frame = pd.read_csv(other / "manifest.csv")
    frame.iloc[::-1].to_csv(other / "manifest.csv", index=False)
    assert main(fit_args(other / "manifest.csv", "--ckpt_path", "last", epochs=2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no run under runs/demo matches this command; found version_0: manifest content" in err
    assert "version_1: manifest content" in err
    # the majority run is found for a majority command, the mean run for a mean one
    assert main(fit_args(phantoms, "--data.fusion", "majority", "--ckpt_path", "last", epochs=2)) == 0
    out = capsys.readouterr().out
    assert "resuming runs/demo/version_1/checkpoints/last.ckpt (epoch 0, step" in out
    assert torch.load(tmp_path / "runs/demo/version_1/checkpoints/last.ckpt", weights_only=False)["epoch"] == 1
    assert torch.load(tmp_path / "runs/demo/version_0/checkpoints/last.ckpt", weights_only=False)["epoch"] == 0
    # an explicit checkpoint of a run made with other settings is refused too
    ckpt = tmp_path / "runs/demo/version_0/checkpoints/last.ckpt"
    assert main(fit_args(phantoms, "--data.fusion", "staple", "--ckpt_path", str(ckpt), epochs=2)) == 2
    assert "made with other settings (data.fusion 'mean' vs 'staple')" in capsys.readouterr().err


def test_kill_9_then_resume_keeps_the_best_checkpoint_over_the_whole_run(phantoms, tmp_path):
    run = tmp_path / "run"
    args = fit_args(phantoms, "--run_dir", str(run), epochs=200)
    process = subprocess.Popen([sys.executable, "-m", "medjdt.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    try:
        wait_for(last, process=process)
        start = time.monotonic()  # let a few more epochs (and best checkpoints) pass
        while torch.load(last, weights_only=False)["epoch"] < 3 and time.monotonic() - start < 120:
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    killed = torch.load(last, weights_only=False)
    assert (run / ".medjdt.lock").exists()  # left by the killed process: stale, taken over by the resume
    epochs = killed["epoch"] + 3
    assert main(fit_args(phantoms, "--run_dir", str(run), "--ckpt_path", "last", epochs=epochs)) == 0
    resumed = torch.load(last, weights_only=False)
    assert resumed["epoch"] == epochs - 1
    metrics = pd.read_csv(run / "metrics.csv").dropna(subset=["val/dice"])
    assert list(metrics["epoch"]) == list(range(epochs))  # one validation row per epoch, none repeated or lost
    best_state = next(s for k, s in resumed["callbacks"].items() if "val/dice" in k)
    best_epoch = int(metrics.loc[metrics["val/dice"].idxmax(), "epoch"])
    assert float(best_state["best_model_score"]) == pytest.approx(metrics["val/dice"].max(), rel=1e-6)
    best_files = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert [p.name for p in best_files] == [f"best-epoch{best_epoch:03d}.ckpt"]  # the best of the whole run
    assert Path(best_state["best_model_path"]) == best_files[0]


@pytest.mark.parametrize(("sent", "code", "what"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_stop_at_the_next_step_with_last_ckpt(phantoms, tmp_path, sent, code, what):
    run = tmp_path / "run"
    args = fit_args(phantoms, "--run_dir", str(run), "--data.num_workers", "2", epochs=500)
    process = subprocess.Popen([sys.executable, "-m", "medjdt.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(last, process=process)
    time.sleep(0.5)
    os.killpg(process.pid, sent)  # the whole process group, as a scheduler or a terminal does
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    final = err.strip().splitlines()[-1]
    assert final.startswith(f"medjdt fit: stopped by {what} at epoch ")
    assert f"saved {last}" in final and final.endswith("--ckpt_path last")
    assert "Traceback" not in err
    stopped = torch.load(last, weights_only=False)
    assert record(run)["status"] == "stopped" and not (run / ".medjdt.lock").exists()
    epochs = stopped["epoch"] + 2
    assert main(fit_args(phantoms, "--run_dir", str(run), "--ckpt_path", "last", epochs=epochs)) == 0
    assert torch.load(last, weights_only=False)["epoch"] == epochs - 1
    assert record(run)["status"] == "finished"


# ------------------------------------------------------------------------------------------------- folds and demo
@pytest.mark.parametrize("cases", [2, 3])
def test_demo_data_of_any_size_trains_with_the_demo_configs(tmp_path, cases):
    data = tmp_path / "data"
    assert main(["demo-data", "--out", str(data), "--cases", str(cases), "--shape", "16", "16", "16",
                 "--labelled-fraction", "0.25"]) == 0
    assert json.loads((data / "manifest.json").read_text())["num_folds"] == cases
    # configs/demo.yaml says num_folds 4 in no place any more: the manifest's folds are the truth
    assert main(fit_args(data / "manifest.csv", "--trainer.default_root_dir", str(tmp_path / "runs"))) == 0
    if cases >= 3:  # one validation case, one labelled and one unlabelled training case
        semi = ["fit", "--config", str(ROOT / "configs" / "demo_semi.yaml"), "--data.manifest",
                str(data / "manifest_labelled25.csv"), "--data.patch_size", "16", "16", "16", "--data.num_workers",
                "0", *TINY_NET, "--trainer.max_epochs", "1", *QUIET, "--trainer.default_root_dir",
                str(tmp_path / "semi")]
        assert main(semi) == 0


def test_num_folds_given_on_the_command_line_must_agree_with_the_manifest(phantoms, tmp_path, capsys):
    assert main(fit_args(phantoms, "--data.num_folds", "4", "--trainer.default_root_dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"data.num_folds=4 disagrees with manifest {phantoms}, which is split into 3 folds" in err
    assert not any(tmp_path.iterdir())


def test_demo_data_are_written_only_at_the_path_the_config_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(Path(DEMO).read_text())
    config["data"]["demo"] = {"cases": 3, "raters": 2, "shape": [16, 16, 16], "dims": 3, "seed": 0}
    config["data"]["manifest"] = "demo_data/manifest.csv"
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    base = ["fit", "--config", "demo.yaml", "--data.patch_size", "16", "16", "16", "--data.num_workers", "0",
            *TINY_NET, "--trainer.max_epochs", "1", *QUIET]
    assert main([*base, "--data.manifest", "demo_dat/manifest.csv"]) == 2  # a typo: an error, nothing written
    err = capsys.readouterr().err
    assert err.strip() == "medjdt fit: error: manifest demo_dat/manifest.csv does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.yaml"]
    assert main(base) == 0  # the config's own path: the phantoms are generated there
    assert len(read_manifest(tmp_path / "demo_data" / "manifest.csv").cases()) == 3


# ---------------------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "", "tab\there"])
def test_case_ids_that_could_leave_an_output_folder_are_refused_naming_the_line(phantoms, tmp_path, capsys, bad):
    frame = read_manifest(phantoms).frame
    frame.loc[frame["case_id"] == frame["case_id"].iloc[-1], "case_id"] = bad
    shutil.copy(phantoms.with_suffix(".json"), tmp_path / "m.json")
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert main(["check", "--config", DEMO, "--data.manifest", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip()
    line = len(frame) + 1 - 2  # the first row of the last case (three raters), 1-based with the header
    if bad == "":  # read as a missing value
        assert f"line(s) {line}, {line + 1}, {line + 2} have no case_id" in err
    else:
        assert f"line {line}: case_id {bad!r}" in err
    assert len(err.splitlines()) == 1


def test_manifest_accepts_a_kits_repository_root(tmp_path):
    from _layouts import make_kits21

    make_kits21(tmp_path / "kits23" / "dataset")
    assert main(["manifest", "--layout", "kits23", "--root", str(tmp_path / "kits23"),
                 "--out", str(tmp_path / "m.csv"), "--folds", "2"]) == 0
    assert read_manifest(tmp_path / "m.csv").cases()


# ------------------------------------------------------------------------------------------ every bad input, 1 line
def _copy_dataset(phantoms: Path, folder: Path) -> Path:
    shutil.copytree(phantoms.parent, folder, ignore=shutil.ignore_patterns(".cache"))
    return folder / "manifest.csv"


def _first_case(manifest: Path) -> tuple[Path, Path]:
    rows = pd.read_csv(manifest, dtype=str)
    return manifest.parent / rows["image"].iloc[0], manifest.parent / rows["label"].iloc[0]


def _bad(kind: str, manifest: Path, tmp: Path) -> tuple[list[str], str]:
    """Break the copied dataset behind ``manifest`` in one way; the extra arguments and the expected message."""
    image, label = _first_case(manifest)
    img = nib.load(image)
    if kind == "image is not NIfTI":
        image.write_text("this is not an image")
        return [], f"image {image} is not a readable NIfTI file"
    if kind == "truncated image":
        image.write_bytes(image.read_bytes()[:200])
        return [], f"{image}"
    if kind == "two-channel image":
        data = np.stack([img.get_fdata()] * 2, axis=-1)
        nib.save(nib.Nifti1Image(data.astype(np.int16), img.affine), image)
        return [], f"image {image} has 2 channel(s), the manifest declares in_channels=1"
    if kind == "metadata in_channels disagrees with the model":
        meta = json.loads(manifest.with_suffix(".json").read_text())
        manifest.with_suffix(".json").write_text(json.dumps({**meta, "in_channels": 2}))
        return [], "the network takes in_channels=1 but manifest"
    if kind == "NaN voxels":
        data = img.get_fdata().astype(np.float32)
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), image)
        return [], f"image {image} contains 1 NaN/inf value(s)"
    if kind == "label outside the classes":
        lab = nib.load(label)
        data = np.asarray(lab.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, lab.affine), label)
        return [], "values [7] outside the declared classes 0..2"
    if kind == "label on another grid":
        lab = nib.load(label)
        affine = lab.affine.copy()
        affine[0, 3] += 2.0
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), label)
        return [], f"label {label} is not on the grid of image {image}"
    if kind == "label path is a folder":
        label.unlink()
        label.mkdir()
        return [], f"{label}"
    if kind == "missing label file":
        label.unlink()
        return [], f"label file {label} does not exist"
    if kind == "metadata is not JSON":
        manifest.with_suffix(".json").write_text("{num_classes: 3")
        return [], f"manifest metadata {manifest.with_suffix('.json')} is not valid JSON"
    if kind == "negative epochs":
        return ["--trainer.max_epochs", "-5"], "trainer.max_epochs must be a finite integer >= -1"
    if kind == "no limit with a schedule":
        return ["--trainer.max_epochs", "-1"], "trainer.max_epochs -1 (no limit) leaves no training length"
    if kind == "tiny spacing":
        return ["--data.spacing", "0.01", "0.01", "0.01"], "more than data.max_case_gb=8; choose a coarser data.spacing"
    if kind == "cache folder is a file":
        (tmp / "cache").write_text("")
        return ["--data.cache_dir", str(tmp / "cache")], f"cache folder (data.cache_dir) {tmp / 'cache'} is a file"
    if kind == "run root is a file":
        (tmp / "root").write_text("")
        return ["--trainer.default_root_dir", str(tmp / "root")], f"{tmp / 'root'} is a file, not a folder"
    if kind == "patch larger than a case":
        return ["--data.patch_size", "500", "500", "500"], "patch_size [500, 500, 500] is larger than 4 of 4 case(s)"
    if kind == "mistyped option":
        return ["--data.manifset", "x"], "unknown option --data.manifset (did you mean --data.manifest?)"
    if kind == "mistyped config key":
        config = tmp / "typo.yaml"
        config.write_text("data:\n  fusoin: mean\n")
        return ["--config", str(config)], "unknown config key data.fusoin (did you mean data.fusion?)"
    if kind == "truncated checkpoint":
        ckpt = tmp / "cut.ckpt"
        ckpt.write_bytes(b"PK\x03\x04" + os.urandom(300))
        return ["--ckpt_path", str(ckpt)], f"checkpoint {ckpt} cannot be read: it is truncated or not a PyTorch"
    if kind == "foreign checkpoint":
        ckpt = tmp / "foreign.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, ckpt)
        return ["--ckpt_path", str(ckpt)], f"checkpoint {ckpt} is not a medjdt checkpoint"
    raise AssertionError(kind)


BAD_INPUTS = [
    "image is not NIfTI", "truncated image", "two-channel image", "metadata in_channels disagrees with the model",
    "NaN voxels", "label outside the classes", "label on another grid", "label path is a folder",
    "missing label file", "metadata is not JSON", "negative epochs", "no limit with a schedule", "tiny spacing",
    "cache folder is a file", "run root is a file", "patch larger than a case", "mistyped option",
    "mistyped config key", "truncated checkpoint", "foreign checkpoint",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_every_bad_input_is_one_clear_line_and_leaves_nothing_behind(phantoms, tmp_path, capsys, kind):
    manifest = _copy_dataset(phantoms, tmp_path / "data")
    extra, message = _bad(kind, manifest, tmp_path)
    runs = tmp_path / "runs"
    args = fit_args(manifest, "--data.cache_dir", str(tmp_path / "c2"))
    if "--trainer.default_root_dir" not in extra:
        args += ["--trainer.default_root_dir", str(runs)]
    code = main([*args, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("medjdt fit: error: "), err
    assert message in err, err
    assert not runs.exists() or not any(runs.iterdir())  # no run folder, no checkpoint


def test_predict_refuses_an_untrained_network_unless_asked(phantoms, tmp_path, capsys):
    args = fit_args(phantoms, "--trainer.default_root_dir", str(tmp_path / "runs"), command="predict")
    assert main(args) == 2
    assert "medjdt predict needs --ckpt_path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main([*args, "--allow_untrained", "true"]) == 0
    folder = tmp_path / "runs" / "version_0"
    assert len(list((folder / "predictions").glob("*_probs.nii.gz"))) == 2  # the two cases of validation fold 0
    assert record(folder)["inputs"]["checkpoint"] is None


def test_evaluations_write_next_to_their_checkpoints_run_without_warnings(phantoms, tmp_path, recwarn, capsys):
    assert main(fit_args(phantoms, "--run_dir", str(tmp_path / "run"))) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    recwarn.clear()
    for command in ("validate", "test", "predict"):
        assert main(fit_args(phantoms, "--ckpt_path", str(ckpt), command=command)) == 0
        folder = tmp_path / "run" / command / "last"
        assert record(folder)["inputs"]["checkpoint"]["path"] == str(ckpt)
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "dirpath has changed" in m or "callbacks used to create" in m], messages
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == [
        "checkpoints", "predict", "test", "validate"]
    assert (tmp_path / "run" / "test" / "last" / "test_per_case.csv").is_file()
    # the same inputs again replace the results; other inputs get their own folder
    assert main(fit_args(phantoms, "--ckpt_path", str(ckpt), command="predict")) == 0
    assert main(fit_args(phantoms, "--ckpt_path", str(ckpt), "--data.predict_on", "all", command="predict")) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "predict").iterdir()) == ["last", "last-2"]
    out = capsys.readouterr().out
    assert "medjdt evaluate --manifest" in out
    # evaluate scores the cases predict wrote, as its summary suggests
    folder = tmp_path / "run" / "predict" / "last-2"
    assert main(["evaluate", "--manifest", str(phantoms), "--predictions", str(folder / "predictions"),
                 "--out", str(folder / "evaluation.csv")]) == 0
    assert pd.read_csv(folder / "evaluation.csv")["case_id"].nunique() == 6


# ----------------------------------------------------------------------------------------------------- quick answers
@pytest.mark.parametrize(
    "args",
    [["--help"], ["fuse", "--help"], ["fuse"], ["fuse", "--manifest", "none.csv", "--method", "mean", "--out", "o"],
     ["evaluate", "--manifest", "none.csv", "--predictions", ".", "--out", "r.csv"], ["check", "--help"],
     ["sweep", "--config", "none.yaml", "--fusion", "mean", "--seeds", "0", "--out", "o"],
     ["manifest", "--layout", "kits23", "--root", "nowhere", "--out", "m.csv"], ["report", "nowhere", "--out", "o"],
     ["demo-data", "--help"], ["fit", "--config", "none.yaml"], ["evalute"], ["plan", "--help"],
     ["plan", "--manifest", "none.csv", "--out", "o"], ["raters", "--help"],
     ["raters", "--manifest", "none.csv", "--out", "o"],
     ["manifest", "--layout", "folders", "--root", "nowhere", "--out", "m.csv", "--classes", "bg", "x"]],
)
def test_help_and_argument_errors_answer_before_torch_monai_and_lightning_load(tmp_path, args):
    probe = (
        "import sys\nfrom medjdt.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'monai', 'pytorch_lightning', 'pandas', 'nibabel') if m in sys.modules]\n"
        "print('HEAVY', heavy, code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert "HEAVY [] " in out.stdout, out.stdout + out.stderr
    if "--help" not in args:
        assert out.stderr.count("\n") == 1 and "error: " in out.stderr, out.stderr


def test_medjdt_check_runs_the_checks_alone(phantoms, tmp_path):
    out = cli("check", "--config", DEMO, "--data.manifest", str(phantoms), "--data.cache_dir", str(tmp_path / "c"),
              "--data.patch_size", "16", "16", "16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"medjdt check: fit can start: manifest {phantoms} (train 4, val 2 case(s); 3 classes" in out.stdout
    assert not (tmp_path / "runs").exists() and len(list((tmp_path / "c").rglob("*.pt"))) == 6


# ------------------------------------------------------------------------------------------------------ determinism
def test_the_same_seed_gives_the_same_run_with_0_or_2_workers(phantoms, tmp_path):
    results = []
    for workers in ("0", "2"):
        run = tmp_path / f"workers{workers}"
        args = fit_args(phantoms, "--run_dir", str(run), "--data.num_workers", workers,
                        "--data.samples_per_volume", "2", "--data.fusion", "random", epochs=2)
        assert main(args) == 0
        results.append((pd.read_csv(run / "metrics.csv"), torch.load(run / "checkpoints" / "last.ckpt",
                                                                      weights_only=False)["state_dict"]))
    (m0, w0), (m2, w2) = results
    pd.testing.assert_series_equal(m0["train/loss"].dropna(), m2["train/loss"].dropna(), rtol=1e-6)
    for name in w0:
        torch.testing.assert_close(w0[name], w2[name], rtol=1e-6, atol=1e-7)

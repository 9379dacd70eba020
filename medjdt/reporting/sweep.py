"""``medjdt sweep``: one training run per (fusion method, seed), sequentially, resumable.

Each run is a ``medjdt fit`` subprocess (``python -m medjdt.cli fit --config CONFIG [overrides] --data.fusion F
--seed_everything S --data.seed S --run_dir <out>/<fusion>-seed<seed>``) whose run folder is the run directory:
``run.json``, ``config.yaml``, ``hparams.yaml``, ``metrics.csv``, ``checkpoints/`` (``last.ckpt``, ``best-*.ckpt``),
``val_per_case.csv``, ``val_reliability.csv``, plus ``sweep.log`` (the subprocesses' output) and ``sweep.json``.

Which checkpoint the results describe: the **last** one. When the fit's final epoch was a validation epoch, its
``val_per_case.csv`` and ``val_reliability.csv`` already score ``last.ckpt`` (``run.json`` says so: its last
validation's step is the final step); otherwise ``medjdt validate --ckpt_path checkpoints/last.ckpt`` evaluates it
(in ``<run>/final/``) and its files replace the run's. Every fusion method thus gets the same training budget and
is evaluated once, on the last checkpoint (the best-by-``val/dice`` checkpoint is selected on these very cases,
which would flatter Dice and pick the calibration metrics' epoch by chance).

``sweep.json`` records the run's settings (config, overrides, fusion, seed), the dataset manifest (absolute path,
from the run's ``config.yaml``) and its ``stage``: ``"training"`` -> ``"trained"`` -> ``"done"``. Re-running the
sweep skips ``done`` runs, evaluates ``trained`` ones, resumes others that have ``checkpoints/last.ckpt``
(``--ckpt_path``; ``metrics.csv`` continues, without the rows logged after that checkpoint) and starts the rest
afresh. A run directory created with other settings is an error, never silently reused, and so is a non-empty run
directory without ``sweep.json``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from medjdt._documents import read_json_object
from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.reporting.logged_run import run_logged
from medjdt.reporting.runs import CONFIG_FILE, PER_CASE_FILE, RELIABILITY_FILE, SWEEP_STATE_FILE
from medjdt.reporting.tables import FUSION_ORDER
from medjdt.runs import read_record

LOG_FILE = "sweep.log"
FINAL_DIR = "final"
# The sweep sets these itself; the same options among the overrides would be silently overridden.
_RESERVED = ("--data.fusion", "--seed_everything", "--data.seed", "--trainer.logger", "--ckpt_path", "--run_dir")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a fusion method, a seed, and the run directory ``<out>/<fusion>-seed<seed>``."""

    fusion: str
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.fusion}-seed{self.seed}"

    @property
    def last_checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"


def plan_sweep(fusions: Sequence[str], seeds: Sequence[int], out: str | os.PathLike) -> list[SweepRun]:
    """The runs of a sweep, seed by seed (every fusion method of seed 0 first, then seed 1, ...).

    Raises:
        ValueError: no fusion method or seed, an unknown or repeated fusion method, a negative or repeated seed.
    """
    if not fusions or not seeds:
        raise ValueError("a sweep needs at least one fusion method and one seed")
    unknown = [f for f in fusions if f not in FUSION_ORDER]
    if unknown:
        raise ValueError(f"unknown fusion method(s) {unknown}; expected some of {FUSION_ORDER}")
    for name, values in (("fusion method", fusions), ("seed", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"repeated {name}(s) {repeated}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad}")
    root = Path(out).absolute()
    return [SweepRun(f, s, root / f"{f}-seed{s}") for s in seeds for f in fusions]


def _check_overrides(overrides: Sequence[str]) -> None:
    for arg in overrides:
        option = arg.split("=", 1)[0]
        if any(option == r or option.startswith(f"{r}.") for r in _RESERVED):
            raise ValueError(f"the sweep sets {option} itself; remove it from the overrides")


def training_command(
    stage: str, run: SweepRun, config: str | os.PathLike, overrides: Sequence[str], ckpt_path: Path | None = None
) -> list[str]:
    """The ``medjdt fit|validate`` command line of ``run``.

    ``fit`` runs in the run directory itself, ``validate`` in ``<run>/final`` (``--run_dir``); the sweep's options
    come after the overrides, so they take precedence.
    """
    folder = run.directory if stage == "fit" else run.directory / FINAL_DIR
    command = [sys.executable, "-m", "medjdt.cli", stage, "--config", str(config), *overrides]
    command += ["--data.fusion", run.fusion, "--seed_everything", str(run.seed), "--data.seed", str(run.seed)]
    command += ["--run_dir", str(folder)]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    return command


def sweep_commands(
    config: str | os.PathLike,
    fusions: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
) -> list[str]:
    """One shell command per run, for a job scheduler: a one-run ``medjdt sweep`` (training, resuming, the final
    evaluation and ``sweep.json``), writing to the same run directory as the full sweep would."""
    _check_overrides(overrides)
    commands = []
    for run in plan_sweep(fusions, seeds, out):
        args = [sys.executable, "-m", "medjdt.cli", "sweep", "--config", str(Path(config).absolute())]
        args += ["--fusion", run.fusion, "--seeds", str(run.seed), "--out", str(run.directory.parent)]
        if overrides:
            args += ["--", *overrides]
        commands.append(shlex.join(args))
    return commands


def read_state(run: SweepRun) -> dict | None:
    """The run's ``sweep.json``, or None when it has none."""
    path = run.directory / SWEEP_STATE_FILE
    return read_json_object(path, "sweep state") if path.exists() else None


def _write_state(run: SweepRun, state: dict) -> None:
    atomic_write_text(run.directory / SWEEP_STATE_FILE, json.dumps(state, indent=2) + "\n")


def _execute(command: list[str], run: SweepRun, what: str) -> None:
    run_logged(command, run.directory / LOG_FILE, f"run {run.name}: {what}")


def _manifest_of(run: SweepRun) -> str | None:
    """``data.manifest`` of the run's ``config.yaml`` as an absolute path (relative ones are from this folder)."""
    try:
        config = yaml.safe_load((run.directory / CONFIG_FILE).read_text(encoding="utf-8"))
        manifest = config["data"]["manifest"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return str(Path(manifest).absolute()) if isinstance(manifest, str) else None


def _copy_atomically(source: Path, destination: Path) -> None:
    atomic_write(destination, lambda tmp: shutil.copyfile(source, tmp), suffix=destination.suffix)


def _train(run: SweepRun, config: Path, overrides: Sequence[str], state: dict, say: Callable[[str], None]) -> None:
    resume = run.last_checkpoint.is_file()
    _write_state(run, {**state, "stage": "training"})
    if resume:
        say(f"resuming from {run.last_checkpoint}")
    else:
        say(f"training in {run.directory}")
    ckpt = run.last_checkpoint if resume else None
    _execute(training_command("fit", run, config, overrides, ckpt), run, "training")
    if not run.last_checkpoint.is_file():
        raise RuntimeError(
            f"run {run.name}: training left no {run.last_checkpoint}; the sweep evaluates the last checkpoint, "
            "which medjdt fit writes after every epoch"
        )
    _write_state(run, {**state, "stage": "trained", "manifest": _manifest_of(run)})


def _validated_at_the_end(run: SweepRun) -> bool:
    """True when the fit's last validation scored the weights of ``last.ckpt`` (the final epoch was a validation
    epoch), so that its ``val_per_case.csv`` already holds the results and a second validation is not needed."""
    record = read_record(run.directory) or {}
    last = record.get("last_validation") or {}
    return (
        record.get("kind") == "fit"
        and record.get("status") == "finished"
        and last.get("step") is not None
        and last.get("step") == record.get("global_step")
        and (run.directory / PER_CASE_FILE).is_file()
        and (run.directory / RELIABILITY_FILE).is_file()
    )


def _evaluate(run: SweepRun, config: Path, overrides: Sequence[str]) -> pd.DataFrame:
    if not _validated_at_the_end(run):
        _execute(training_command("validate", run, config, overrides, run.last_checkpoint), run, "final validation")
        final = run.directory / FINAL_DIR
        for name in (PER_CASE_FILE, RELIABILITY_FILE):
            if not (final / name).is_file():
                raise RuntimeError(f"run {run.name}: the final validation wrote no {final / name}")
            _copy_atomically(final / name, run.directory / name)
    return pd.read_csv(run.directory / PER_CASE_FILE)


def run_sweep(
    config: str | os.PathLike,
    fusions: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    progress: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Train, evaluate and record every run of the sweep in turn (layout and resuming in the module docstring).

    Args:
        config: the LightningCLI config file of the experiment.
        fusions: fusion methods (``data.fusion``), e.g. ``["mean", "majority", "random", "staple"]``.
        seeds: seeds (``seed_everything`` and ``data.seed``).
        out: the sweep folder; run ``(f, s)`` lives in ``<out>/<f>-seed<s>``.
        overrides: further ``medjdt fit`` arguments, e.g. ``["--trainer.max_epochs", "20"]``.
        progress: receives the progress lines (``[i/n] <run>: ...``).

    Returns:
        The runs, all done.

    Raises:
        ValueError: a missing config file, bad fusion methods or seeds, an override of an option the sweep sets, a
            run directory created with other settings, or a non-empty run directory that is not a sweep's.
        RuntimeError: a training or evaluation subprocess failed (the message names the run and shows the end of
            its log); the runs before it are done, re-running continues from there.
    """
    config_path = Path(config).absolute()
    if not config_path.is_file():
        raise ValueError(f"config file {config} does not exist")
    _check_overrides(overrides)
    runs = plan_sweep(fusions, seeds, out)
    for i, run in enumerate(runs, start=1):

        def say(message: str, run: SweepRun = run, i: int = i) -> None:
            progress(f"[{i}/{len(runs)}] {run.name}: {message}")

        settings = {"config": str(config_path), "overrides": list(overrides), "fusion": run.fusion, "seed": run.seed}
        state = read_state(run)
        if state is not None and {k: state.get(k) for k in settings} != settings:
            recorded = {k: state.get(k) for k in settings}
            raise ValueError(
                f"run directory {run.directory} was created with other settings ({recorded}); choose another --out"
            )
        if state is None and run.directory.is_dir() and any(run.directory.iterdir()):
            raise ValueError(f"{run.directory} exists but is not a sweep run directory (no {SWEEP_STATE_FILE})")
        if state is not None and state.get("stage") == "done":
            say("done already, skipped")
            continue
        start = time.monotonic()
        run.directory.mkdir(parents=True, exist_ok=True)
        if state is None or state.get("stage") != "trained":
            _train(run, config_path, overrides, settings, say)
            state = read_state(run)
        else:
            say("trained already, evaluating the last checkpoint")
        per_case = _evaluate(run, config_path, overrides)
        _write_state(run, {**state, "stage": "done", "evaluated_checkpoint": str(run.last_checkpoint)})
        means = ", ".join(f"{m} {per_case[m].mean():.3f}" for m in ("dice", "soft_dice", "ece", "brier"))
        say(f"done in {time.monotonic() - start:.0f} s: {means} (means over {len(per_case)} validation cases)")
    return runs

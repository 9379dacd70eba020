"""``medjdt study run``: every arm x seed of a study, trained, tested on held-out cases, evaluated and reported.

For each training (arms with the same overrides share one) and seed, in ``<out>/runs/<training>-seed<seed>``:

1. ``train``: ``medjdt fit --config <base> <arm overrides> <overrides after --> --data.manifest <train>
   --data.cache_dir <out>/cache --seed_everything S --data.seed S --run_dir <run>`` (resumed from its
   ``last.ckpt`` when a previous study run was interrupted);
2. ``test-<arm>``, for every arm on that training: ``medjdt predict`` of the held-out test manifest with the run's
   selected checkpoint (``best`` by the config's monitor on the validation fold, or ``last``), with
   ``--model.temperature`` for a temperature-scaled arm (``auto``: fitted on the run's validation fold, never on
   test cases), into ``<run>/test-<arm>/predictions``; then ``medjdt evaluate``'s rows (``evaluation.csv``), the
   headline scores per case (``case_scores.csv``, :mod:`.case_scores`) and the pooled reliability bins against the
   mean of the raters (``reliability.csv``).

Each step records its completion in ``<run>/study.json``; re-running the study skips what is done and resumes
the rest, so a killed study continues where it stopped. Preprocessing is cached once for the whole study in
``<out>/cache`` and shared safely by its runs. The report (:mod:`.study_report`) is written at the end.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medjdt._documents import read_json_object
from medjdt.data.atomic import atomic_write_text
from medjdt.reporting.case_scores import case_scores
from medjdt.reporting.logged_run import run_logged
from medjdt.reporting.study_spec import RESERVED, Arm, StudySpec
from medjdt.reporting.study_tables import write_csv
from medjdt.runs import read_record

__all__ = ["StudyRun", "plan_study", "run_study", "study_commands"]

STATE_FILE = "study.json"
LOG_FILE = "study.log"


@dataclass(frozen=True)
class StudyRun:
    """One training of a study: the arms that use it, its seed and its folder."""

    training: str
    arms: tuple[Arm, ...]
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.training}-seed{self.seed}"


def plan_study(spec: StudySpec, out: Path, arms: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> list[StudyRun]:
    """The trainings of the study (or of the chosen ``arms`` and ``seeds``), seed by seed.

    Raises:
        ValueError: an unknown arm or a seed the study does not have.
    """
    chosen = [spec.arm(name) for name in arms] if arms else list(spec.arms)
    unknown = sorted(set(seeds or ()) - set(spec.seeds))
    if unknown:
        raise ValueError(f"study {spec.path} has no seed(s) {unknown}; its seeds: {list(spec.seeds)}")
    chosen_seeds = list(seeds) if seeds else list(spec.seeds)
    trainings: dict[str, list[Arm]] = {}
    for arm in chosen:
        trainings.setdefault(spec.training_name(arm), []).append(arm)
    return [
        StudyRun(training, tuple(group), seed, out / "runs" / f"{training}-seed{seed}")
        for seed in chosen_seeds for training, group in trainings.items()
    ]


def _check_overrides(overrides: Sequence[str]) -> None:
    for word in overrides:
        option = word.split("=", 1)[0]
        if any(option == r or option.startswith(r + ".") for r in RESERVED):
            raise ValueError(f"the study sets {option} itself; remove it from the overrides")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medjdt.cli", *args]


def _read_state(run: StudyRun) -> dict:
    path = run.directory / STATE_FILE
    if not path.is_file():
        return {}
    return read_json_object(path, f"study run {run.directory}: state")


def _write_state(run: StudyRun, state: dict) -> None:
    atomic_write_text(run.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")


class _Runner:
    """Runs the steps of one study run, logging the subprocesses' output to ``<run>/study.log``."""

    def __init__(self, spec: StudySpec, out: Path, train: Path, test: Path, overrides: Sequence[str],
                 say: Callable[[str], None]):
        self.spec, self.out, self.train_manifest, self.test_manifest = spec, out, train, test
        self.overrides = list(overrides)
        self.say = say

    def _execute(self, command: list[str], run: StudyRun, what: str) -> None:
        run_logged(command, run.directory / LOG_FILE, f"study run {run.name}: {what}")

    def _common(self, arm: Arm, run: StudyRun) -> list[str]:
        return ["--config", str(self.spec.config), *arm.overrides, *self.overrides,
                "--data.cache_dir", str(self.out / "cache"), "--seed_everything", str(run.seed),
                "--data.seed", str(run.seed)]

    def train(self, run: StudyRun, state: dict) -> None:
        record = read_record(run.directory) if run.directory.is_dir() else None
        if record and record.get("kind") == "fit" and record.get("status") == "finished" and state.get("trained"):
            return
        arm = run.arms[0]
        command = _cli("fit", *self._common(arm, run), "--data.manifest", str(self.train_manifest), "--run_dir",
                       str(run.directory))
        if (run.directory / "checkpoints" / "last.ckpt").is_file():
            command += ["--ckpt_path", "last"]
            self.say("resuming training")
        start = time.monotonic()
        self._execute(command, run, "training")
        record = read_record(run.directory) or {}
        state.update(trained=True, training_seconds=round(time.monotonic() - start, 1),
                     best_checkpoint=record.get("best_checkpoint"), last_checkpoint=record.get("last_checkpoint"),
                     best_score=record.get("best_score"))
        _write_state(run, state)

    def checkpoint(self, run: StudyRun, state: dict) -> Path:
        key = "best_checkpoint" if self.spec.checkpoint == "best" else "last_checkpoint"
        path = state.get(key) or str(run.directory / "checkpoints" / "last.ckpt")
        if not Path(path).is_file():
            raise RuntimeError(f"study run {run.name}: its {self.spec.checkpoint} checkpoint {path} is missing")
        return Path(path)

    def test(self, run: StudyRun, arm: Arm, state: dict) -> None:
        tests = state.setdefault("tests", {})
        if tests.get(arm.name, {}).get("evaluated"):
            return
        folder = run.directory / f"test-{arm.name}"
        checkpoint = self.checkpoint(run, state)
        command = _cli("predict", *self._common(arm, run), "--data.manifest", str(self.test_manifest),
                       "--data.predict_on", "all", "--ckpt_path", str(checkpoint), "--run_dir", str(folder))
        if arm.temperature is not None:
            command += ["--model.temperature", str(arm.temperature)]
        self._execute(command, run, f"test predictions of arm {arm.name}")
        from medjdt.reporting.evaluate import evaluate_with_reliability

        evaluation, reliability = evaluate_with_reliability(self.test_manifest, folder / "predictions")
        write_csv(evaluation, folder / "evaluation.csv")
        write_csv(case_scores(evaluation), folder / "case_scores.csv")
        write_csv(reliability, folder / "reliability.csv")
        record = read_record(folder) or {}
        inputs = record.get("inputs") or {}
        temperature = (inputs.get("inference") or {}).get("temperature")
        tests[arm.name] = {"evaluated": True, "checkpoint": str(checkpoint), "temperature": temperature}
        _write_state(run, state)


def run_study(
    spec: StudySpec,
    out: str | Path,
    *,
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    test_manifest: str | Path | None = None,
    overrides: Sequence[str] = (),
    report: bool = True,
    progress: Callable[[str], None] = print,
) -> list[StudyRun]:
    """Run (or resume) the study: train, test and evaluate every planned run, then write the report.

    Args:
        spec: the study (:func:`medjdt.reporting.study_spec.read_study`).
        out: the study's output folder (runs, cache, built manifests, report by default).
        arms, seeds: run only these (the report then covers what exists).
        test_manifest: a held-out manifest replacing the study file's.
        overrides: ``medjdt fit`` options applied to every run (after the arm's), e.g. a shorter schedule.
        report: write the report at the end.
        progress: receives the plan and progress lines.

    Raises:
        ValueError: a bad study, manifest or override (before anything runs).
        RuntimeError: a step failed (the message names the run and its log); finished steps stay done.
    """
    from medjdt.reporting.study_data import study_manifests

    out = Path(out).absolute()
    _check_overrides(overrides)
    runs = plan_study(spec, out, arms, seeds)
    train, test = study_manifests(spec.data, out, test_manifest)
    tests_total = sum(len(r.arms) for r in runs)
    progress(
        f"study {spec.name}: {len({r.training for r in runs})} training(s) x {len({r.seed for r in runs})} seed(s) = "
        f"{len(runs)} run(s), {tests_total} test evaluation(s); training manifest {train}, test manifest {test}; "
        f"output {out}"
    )
    runner = _Runner(spec, out, train, test, overrides, progress)
    start, worked = time.monotonic(), 0
    for i, run in enumerate(runs, start=1):
        run.directory.mkdir(parents=True, exist_ok=True)

        def say(message: str, run: StudyRun = run, i: int = i) -> None:
            progress(f"[{i}/{len(runs)}] {run.name}: {message}")

        runner.say = say
        state = _read_state(run)
        settings = {"study": str(spec.path), "overrides": list(overrides), "training": run.training,
                    "arm_overrides": list(run.arms[0].overrides), "seed": run.seed}
        recorded = state.get("settings")
        if recorded is not None and recorded != settings:
            raise ValueError(f"study run {run.directory} was made with other settings ({recorded}); use another --out")
        state["settings"] = settings
        began = time.monotonic()
        finished = state.get("trained") and all(state.get("tests", {}).get(a.name, {}).get("evaluated")
                                                for a in run.arms)
        if not state.get("trained"):
            say("training")
        runner.train(run, state)
        for arm in run.arms:
            runner.test(run, arm, state)
        scores = pd.read_csv(run.directory / f"test-{run.arms[0].name}" / "case_scores.csv")
        summary = f"test dice {scores['dice'].mean():.3f}, ece {scores['ece'].mean():.4f} ({len(scores)} cases)"
        if finished:
            say(f"done already: {summary}")
            continue
        worked += 1
        left = len(runs) - i
        eta = f", about {(time.monotonic() - start) / worked * left / 60:.0f} min left" if left else ""
        say(f"done in {time.monotonic() - began:.0f} s: {summary}{eta}")
    if report:
        from medjdt.reporting.study_report import write_study_report

        files = write_study_report(spec, out)
        progress(f"report: {files.markdown}")
    return runs


def study_commands(spec: StudySpec, out: str | Path, *, arms: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, test_manifest: str | Path | None = None,
                   overrides: Sequence[str] = ()) -> list[str]:
    """One shell command per training run (for a job array; each resumable), then the report command."""
    _check_overrides(overrides)
    out = Path(out).absolute()
    commands = []
    for run in plan_study(spec, out, arms, seeds):
        args = _cli("study", "run", str(spec.path), "--out", str(out), "--no-report", "--arms",
                    *[a.name for a in run.arms], "--seeds", str(run.seed))
        if test_manifest is not None:
            args += ["--test-manifest", str(Path(test_manifest).absolute())]
        if overrides:
            args += ["--", *overrides]
        commands.append(shlex.join(args))
    commands.append(shlex.join(_cli("study", "report", str(spec.path), "--out", str(out))))
    return commands

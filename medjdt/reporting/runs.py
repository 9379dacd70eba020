"""Reading finished training runs: which experiment a run directory holds, and its per-case validation results.

A run directory is the log directory of one ``medjdt fit`` (e.g. ``runs/demo/version_0``) or one run of
``medjdt sweep`` (e.g. ``runs/sweep/mean-seed0``). It must hold:

* ``config.yaml``: the parsed training config; ``data.fusion`` and ``seed_everything`` name the experiment;
* ``val_per_case.csv``: one row per validation case (``case_id`` plus the metric columns of
  :data:`TABLE_METRICS`, and ``dice/<class>`` per foreground class);
* ``val_reliability.csv``: pooled reliability bins (``bin_lower, bin_upper, count, confidence, accuracy``).

A sweep run also holds ``sweep.json`` (see :mod:`medjdt.reporting.sweep`); it is read only once its ``stage`` is
``"done"``, so an unfinished run never enters a table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medjdt._documents import read_json_object, read_yaml_mapping

CONFIG_FILE = "config.yaml"
PER_CASE_FILE = "val_per_case.csv"
RELIABILITY_FILE = "val_reliability.csv"
SWEEP_STATE_FILE = "sweep.json"
RELIABILITY_COLUMNS = ("bin_lower", "bin_upper", "count", "confidence", "accuracy")
# Per-case metrics compared across fusion methods. Dice is the hard Dice against the raters' majority vote;
# soft and thresholded Dice, ECE, Brier and NLL are measured against the mean of the raters.
TABLE_METRICS = ("dice", "soft_dice", "thresholded_dice", "ece", "brier", "nll")


@dataclass(frozen=True)
class Run:
    """The results of one training run.

    Attributes:
        path: the run directory.
        fusion: the rater fusion method it was trained with (``data.fusion``).
        seed: its seed (``seed_everything``).
        per_case: ``val_per_case.csv``, one row per validation case, sorted by ``case_id``.
        reliability: ``val_reliability.csv``, one row per confidence bin.
        class_names: the foreground classes, from the ``dice/<class>`` columns of ``per_case``.
        manifest: the dataset manifest it was trained on, when known (a sweep records it as an absolute path;
            otherwise ``data.manifest`` of the config, which may be relative to the folder training ran in).
    """

    path: Path
    fusion: str
    seed: int
    per_case: pd.DataFrame
    reliability: pd.DataFrame
    class_names: tuple[str, ...]
    manifest: Path | None

    @property
    def name(self) -> str:
        """``<fusion>-seed<seed>``: unique within a report."""
        return f"{self.fusion}-seed{self.seed}"


def _read_csv(path: Path, run: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"run {run} has no {what} ({path.name} is missing)")
    try:
        frame = pd.read_csv(path, dtype={"case_id": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"run {run}: cannot read {path.name}: {err}") from err
    if frame.empty:
        raise ValueError(f"run {run}: {path.name} has no rows")
    return frame


def _check_numeric(frame: pd.DataFrame, columns: Iterable[str], path: Path, run: Path) -> None:
    for column in columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(f"run {run}: column {column!r} of {path.name} is not numeric")


def _experiment(config: dict, run: Path) -> tuple[str, int, str | None]:
    """``(fusion, seed, manifest)`` from a parsed ``config.yaml``."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("fusion"), str):
        raise ValueError(f"run {run}: {CONFIG_FILE} has no data.fusion")
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"run {run}: {CONFIG_FILE} has no integer seed_everything (got {seed!r})")
    manifest = data.get("manifest")
    return data["fusion"], seed, manifest if isinstance(manifest, str) else None


def _sweep_manifest(run: Path) -> str | None:
    """The manifest a finished sweep run recorded; ``ValueError`` for an unfinished sweep run."""
    path = run / SWEEP_STATE_FILE
    if not path.exists():
        return None
    state = read_json_object(path, "sweep state")
    if state.get("stage") != "done":
        stage = state.get("stage")
        raise ValueError(
            f"run {run} is an unfinished sweep run (stage {stage!r}, not 'done'); finish it by re-running medjdt sweep"
        )
    manifest = state.get("manifest")
    return manifest if isinstance(manifest, str) else None


def load_run(path: str | os.PathLike) -> Run:
    """Read one run directory (layout in the module docstring).

    Raises:
        ValueError: naming the run, when the directory is missing or unreadable, is an unfinished sweep run, lacks
            ``config.yaml`` (or its ``data.fusion``/``seed_everything``), lacks per-case results or reliability
            bins, or their files are unreadable, empty, miss columns, repeat a case or hold non-numeric values.
    """
    run = Path(path)
    if not run.exists():
        raise ValueError(f"run directory {run} does not exist")
    if not run.is_dir():
        raise ValueError(f"run directory {run} is not a directory")
    if not os.access(run, os.R_OK | os.X_OK):
        raise ValueError(f"run directory {run} is not readable")
    recorded_manifest = _sweep_manifest(run)
    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"run {run} has no {CONFIG_FILE}: not a medjdt training run directory")
    fusion, seed, config_manifest = _experiment(read_yaml_mapping(config_path, "run config"), run)

    per_case_path = run / PER_CASE_FILE
    per_case = _read_csv(per_case_path, run, "per-case results")
    missing = [c for c in ("case_id", *TABLE_METRICS) if c not in per_case.columns]
    if missing:
        raise ValueError(f"run {run}: {PER_CASE_FILE} lacks the column(s) {missing}")
    if per_case["case_id"].isna().any():
        raise ValueError(f"run {run}: {PER_CASE_FILE} has rows without a case_id")
    repeated = sorted(set(per_case.loc[per_case["case_id"].duplicated(), "case_id"]))
    if repeated:
        raise ValueError(f"run {run}: {PER_CASE_FILE} repeats the case(s) {repeated}")
    _check_numeric(per_case, TABLE_METRICS, per_case_path, run)
    class_names = tuple(c.split("/", 1)[1] for c in per_case.columns if c.startswith("dice/"))

    reliability_path = run / RELIABILITY_FILE
    reliability = _read_csv(reliability_path, run, "reliability bins")
    missing = [c for c in RELIABILITY_COLUMNS if c not in reliability.columns]
    if missing:
        raise ValueError(f"run {run}: {RELIABILITY_FILE} lacks the column(s) {missing}")
    _check_numeric(reliability, RELIABILITY_COLUMNS, reliability_path, run)

    manifest = recorded_manifest or config_manifest
    return Run(
        path=run,
        fusion=fusion,
        seed=seed,
        per_case=per_case.sort_values("case_id").reset_index(drop=True),
        reliability=reliability,
        class_names=class_names,
        manifest=None if manifest is None else Path(manifest),
    )


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Read several run directories of one dataset, for comparison.

    Raises:
        ValueError: no run given; any run that :func:`load_run` rejects; two runs of the same fusion method and seed;
            runs whose validation case sets or foreground class names differ (mixed datasets or folds). The
            message names the runs concerned.
    """
    runs = [load_run(p) for p in paths]
    if not runs:
        raise ValueError("no run directory given")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            first_path = seen[run.name].path
            raise ValueError(f"runs {first_path} and {run.path} are both fusion {run.fusion!r}, seed {run.seed}")
        seen[run.name] = run
    first = runs[0]
    cases = set(first.per_case["case_id"])
    for run in runs[1:]:
        other = set(run.per_case["case_id"])
        if other != cases:
            only_here, only_there = sorted(other - cases), sorted(cases - other)
            raise ValueError(
                f"run {run.path} was validated on other cases than run {first.path} (mixed datasets or folds): "
                f"only in {run.path.name}: {only_here[:10]}, only in {first.path.name}: {only_there[:10]}"
            )
        if run.class_names != first.class_names:
            raise ValueError(
                f"run {run.path} has the classes {list(run.class_names)} but run {first.path} has "
                f"{list(first.class_names)} (mixed datasets)"
            )
    return runs

"""The study file: what a fusion study trains, on which data, and how it is compared.

A study file is YAML (paths relative to the file's folder)::

    name: kits23_fusion
    config: config.yaml                # the base medjdt fit config of every run
    data:                              # either two manifests ...
      manifest: train.csv              #   training cases, with folds (the config's data.fold validates)
      test_manifest: test.csv          #   held-out cases: never trained on, never used to select a checkpoint
    # ... or a dataset in its published layout, split by the study itself:
    #   data: {layout: kits23, root: ../data/kits23, test_cases: 8, folds: 4, split_seed: 0,
    #          groups: {file: index.csv, case: case, group: patient}, manifest_suffix: _lidc-nodule_task01}
    seeds: [0, 1, 2]
    baseline: majority                 # the arm every other arm is compared with, case by case
    checkpoint: best                   # the checkpoint each run is tested with: best (by the config's monitor) or last
    report_dir: results                # where the report goes (default: <out>/report)
    arms:
      - {name: mean, overrides: {data.fusion: mean}}
      - {name: majority, overrides: {data.fusion: majority}}
      - {name: majority_ts, overrides: {data.fusion: majority}, temperature: auto}

An arm is a name, ``medjdt fit`` overrides (a mapping of dotted keys, or a list of command-line words) and an
optional ``temperature`` (``auto``: post-hoc temperature scaling fitted on the run's validation fold, or a
number). Arms with the same overrides share their trained runs: ``majority_ts`` is ``majority``'s models,
temperature-scaled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medjdt._documents import read_yaml_mapping
from medjdt._paths import check_name
from medjdt.validation import check_number

__all__ = ["Arm", "DataSpec", "StudySpec", "read_study"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Options the study sets itself for every run.
RESERVED = ("--data.manifest", "--data.seed", "--seed_everything", "--run_dir", "--ckpt_path", "--data.cache_dir",
            "--trainer.logger", "--model.temperature", "--data.predict_on")


@dataclass(frozen=True)
class Arm:
    """One arm: ``name``, the ``medjdt fit`` arguments it adds, and its post-hoc ``temperature`` (None, "auto" or
    a number)."""

    name: str
    overrides: tuple[str, ...]
    temperature: str | float | None = None

    @property
    def training_key(self) -> str:
        """Arms with equal keys share their trained runs."""
        return json.dumps(list(self.overrides))


@dataclass(frozen=True)
class DataSpec:
    """Where the study's cases come from (see the module docstring)."""

    manifest: Path | None = None
    test_manifest: Path | None = None
    layout: str | None = None
    root: Path | None = None
    manifest_suffix: str = ""
    test_cases: int | None = None
    folds: int = 4
    split_seed: int = 0
    groups: Mapping[str, str] | None = None


@dataclass(frozen=True)
class StudySpec:
    """A parsed, checked study file."""

    path: Path
    name: str
    config: Path
    data: DataSpec
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    baseline: str
    checkpoint: str = "best"
    report_dir: Path | None = None
    metrics: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ValueError(f"study {self.path} has no arm {name!r}; its arms: {[a.name for a in self.arms]}")

    def training_name(self, arm: Arm) -> str:
        """The name of the runs ``arm`` uses: the first arm with the same training overrides."""
        return next(a.name for a in self.arms if a.training_key == arm.training_key)


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        words: list[str] = []
        for key, item in value.items():
            text = item if isinstance(item, str) else json.dumps(item)
            words += [f"--{str(key).lstrip('-')}", text]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        words = [str(v) for v in value]
    else:
        raise ValueError(f"{where}: overrides must be a mapping of options or a list of words, got {value!r}")
    for word in words:
        option = word.split("=", 1)[0]
        if any(option == r or option.startswith(r + ".") for r in RESERVED):
            raise ValueError(f"{where}: the study sets {option} itself; remove it from the overrides")
    return tuple(words)


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"study file {base}: {what} must be a path, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _data(raw: Any, base: Path, where: str) -> DataSpec:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: data must be a mapping (manifest/test_manifest, or layout/root)")
    known = {"manifest", "test_manifest", "layout", "root", "manifest_suffix", "test_cases", "folds", "split_seed",
             "groups"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown data key(s) {unknown}; known: {sorted(known)}")
    if ("manifest" in raw) == ("layout" in raw):
        raise ValueError(f"{where}: data needs either manifest (and test_manifest) or layout and root")
    if "layout" in raw:
        if "root" not in raw or "test_cases" not in raw:
            raise ValueError(f"{where}: data with a layout needs root and test_cases")
        test_cases = check_number("data.test_cases", raw["test_cases"], low=1, integer=True, where=where)
        groups = raw.get("groups")
        if groups is not None and (not isinstance(groups, Mapping) or set(groups) != {"file", "case", "group"}):
            raise ValueError(f"{where}: data.groups must be {{file, case, group}}, got {groups!r}")
        return DataSpec(
            layout=str(raw["layout"]), root=_path(base, raw["root"], "data.root"),
            manifest_suffix=str(raw.get("manifest_suffix", "")), test_cases=test_cases,
            folds=int(raw.get("folds", 4)), split_seed=int(raw.get("split_seed", 0)),
            groups=None if groups is None else {k: str(v) for k, v in groups.items()},
        )
    test = raw.get("test_manifest")
    return DataSpec(manifest=_path(base, raw["manifest"], "data.manifest"),
                    test_manifest=None if test is None else _path(base, test, "data.test_manifest"))


def _arm(raw: Any, index: int, where: str) -> Arm:
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ValueError(f"{where}: arm {index} must be a mapping with a name, got {raw!r}")
    name = str(raw["name"])
    if not _NAME.match(name):
        raise ValueError(f"{where}: arm name {name!r} must be letters, digits, '_', '.', '+' or '-'")
    check_name(name, "arm name")
    unknown = sorted(set(raw) - {"name", "overrides", "temperature"})
    if unknown:
        raise ValueError(f"{where}: arm {name!r} has unknown key(s) {unknown}")
    temperature = raw.get("temperature")
    if temperature is not None and temperature != "auto":
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"{where}: arm {name!r}: temperature must be 'auto' or a positive number")
        temperature = float(temperature)
    return Arm(name=name, overrides=_overrides(raw.get("overrides"), f"{where}: arm {name!r}"),
               temperature=temperature)


def read_study(path: str | os.PathLike) -> StudySpec:
    """Read and check a study file (format in the module docstring).

    Raises:
        ValueError: naming the file and the problem: not YAML, missing or unknown keys, bad arms (duplicate names,
            reserved options), an unknown baseline, seeds that are not distinct non-negative integers, a missing
            config.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file {path} does not exist")
    raw = read_yaml_mapping(path, "study file")
    where = f"study file {path}"
    known = {"name", "description", "config", "data", "seeds", "arms", "baseline", "checkpoint", "report_dir",
             "metrics", "notes"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("config", "data", "seeds", "arms", "baseline"):
        if key not in raw:
            raise ValueError(f"{where}: missing key {key!r}")
    base = path.parent
    config = _path(base, raw["config"], "config")
    if not config.is_file():
        raise ValueError(f"{where}: config {config} does not exist")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{where}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    seeds = [check_number("each seed", seed, low=0, integer=True, where=where) for seed in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        raise ValueError(f"{where}: arms must be a non-empty list")
    arms = tuple(_arm(a, i, where) for i, a in enumerate(raw["arms"]))
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: repeated arm name(s) {repeated}")
    baseline = str(raw["baseline"])
    if baseline not in names:
        raise ValueError(f"{where}: baseline {baseline!r} is not one of the arms {names}")
    checkpoint = str(raw.get("checkpoint", "best"))
    if checkpoint not in ("best", "last"):
        raise ValueError(f"{where}: checkpoint must be best or last, got {checkpoint!r}")
    report_dir = raw.get("report_dir")
    return StudySpec(
        path=path.absolute(),
        name=str(raw.get("name") or path.stem),
        config=config.absolute(),
        data=_data(raw["data"], base.absolute(), where),
        seeds=tuple(seeds),
        arms=arms,
        baseline=baseline,
        checkpoint=checkpoint,
        report_dir=None if report_dir is None else _path(base.absolute(), report_dir, "report_dir"),
        metrics=tuple(str(m) for m in raw.get("metrics") or ()),
        notes=tuple(str(n) for n in raw.get("notes") or ()),
    )

"""``medjdt report`` on run directories: the table is recomputed from the per-case CSVs, pooled reliability bins
match the merged voxels, and every kind of bad run is an error naming the run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medjdt.cli import main
from medjdt.labels import FUSION_METHODS
from medjdt.metrics import reliability_bins
from medjdt.reporting import load_runs, pooled_reliability, write_report
from medjdt.reporting.commands import METHODS
from medjdt.reporting.tables import FUSION_ORDER

METRICS = ["dice", "soft_dice", "thresholded_dice", "ece", "brier", "nll"]
CASES = [f"case_{i:03d}" for i in range(5)]


def _reliability(rng: np.random.Generator, n_bins: int = 10) -> pd.DataFrame:
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 6, 6, 6))) * 2, dim=1)
    target = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 6, 6, 6))), dim=1)
    bins = reliability_bins(probs, target, n_bins=n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    return pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": bins.count[0].numpy(),
                         "confidence": bins.confidence[0].numpy(), "accuracy": bins.accuracy[0].numpy()})


def make_run(root: Path, fusion: str, seed: int, *, cases=CASES, classes=("organ", "lesion"), rng=None,
             sweep_stage: str | None = None) -> Path:
    """A run directory as training writes it, with random per-case values."""
    rng = rng or np.random.default_rng(seed)
    run = root / f"{fusion}-{seed}"
    run.mkdir(parents=True)
    config = {"seed_everything": seed, "data": {"fusion": fusion, "manifest": "/data/manifest.csv"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    frame = pd.DataFrame({"case_id": list(cases), "n_voxels": 1000.0})
    for metric in METRICS:
        frame[metric] = rng.uniform(0, 1, len(cases))
    for c in classes:
        frame[f"dice/{c}"] = rng.uniform(0, 1, len(cases))
    frame.to_csv(run / "val_per_case.csv", index=False)
    _reliability(rng).to_csv(run / "val_reliability.csv", index=False)
    if sweep_stage is not None:
        (run / "sweep.json").write_text(json.dumps({"stage": sweep_stage, "manifest": "/abs/manifest.csv"}))
    return run


def test_table_equals_the_recomputation_from_the_per_case_csvs(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", f, s) for f in ("staple", "majority", "mean") for s in (0, 1)]
    # An undefined value (e.g. a class empty in prediction and reference) is left out of the statistics.
    frame = pd.read_csv(runs[0] / "val_per_case.csv")
    frame.loc[2, "dice"] = np.nan
    frame.to_csv(runs[0] / "val_per_case.csv", index=False)
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["fusion"]) == ["mean", "majority", "staple"]
    assert list(summary["target"]) == ["soft", "hard", "soft"]
    markdown = (out / "summary.md").read_text().splitlines()
    assert capsys.readouterr().out.startswith(markdown[0])
    for fusion, line in zip(summary["fusion"], markdown[2:]):
        values = pd.concat([pd.read_csv(r / "val_per_case.csv") for r in runs if r.name.startswith(f"{fusion}-")])
        row = summary[summary["fusion"] == fusion].iloc[0]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [fusion, row["target"], "0 1", "5"]
        for metric, cell in zip(METRICS, cells[4:]):
            data = values[metric].to_numpy()
            data = data[~np.isnan(data)]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(data), rel=1e-12)
            assert row[f"{metric}_std"] == pytest.approx(np.std(data, ddof=1), rel=1e-12)
            assert row[f"{metric}_n"] == len(data)
            assert cell == f"{np.mean(data):.4f} ± {np.std(data, ddof=1):.4f}"
        assert row["n_rows"] == 10
    assert summary.loc[summary["fusion"] == "staple", "dice_n"].item() == 9

    per_case = pd.read_csv(out / "per_case.csv")
    assert len(per_case) == 30 and set(per_case["run"]) == {f"{f}-seed{s}" for f in ("mean", "majority", "staple")
                                                              for s in (0, 1)}
    for name in ["comparison.png", *(f"reliability_{f}-seed{s}.png" for f in ("mean", "staple") for s in (0, 1))]:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _bad_runs(tmp_path: Path) -> dict[str, tuple[list[Path], Path, str]]:
    """Scenario -> (run directories, the run the error must name, message)."""
    root = tmp_path / "runs"
    good = make_run(root, "mean", 0)
    scenarios = {}

    missing = root / "missing"
    scenarios["missing directory"] = ([good, missing], missing, "does not exist")

    not_a_dir = root / "file.txt"
    not_a_dir.write_text("x")
    scenarios["not a directory"] = ([good, not_a_dir], not_a_dir, "is not a directory")

    no_config = make_run(root, "majority", 0)
    (no_config / "config.yaml").unlink()
    scenarios["no config"] = ([good, no_config], no_config, "config.yaml")

    no_fusion = make_run(root, "random", 0)
    (no_fusion / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 0, "data": {}}))
    scenarios["no fusion"] = ([good, no_fusion], no_fusion, "data.fusion")

    bad_yaml = make_run(root, "staple", 0)
    (bad_yaml / "config.yaml").write_text("data: [unclosed")
    scenarios["unreadable config"] = ([good, bad_yaml], bad_yaml, "config.yaml is not readable YAML")

    no_results = make_run(root, "majority", 1)
    (no_results / "val_per_case.csv").unlink()
    scenarios["no per-case results"] = ([good, no_results], no_results, "no per-case results")

    empty = make_run(root, "majority", 2)
    (empty / "val_per_case.csv").write_text("")
    scenarios["empty per-case results"] = ([good, empty], empty, "cannot read val_per_case.csv")

    no_column = make_run(root, "majority", 3)
    pd.read_csv(no_column / "val_per_case.csv").drop(columns="ece").to_csv(no_column / "val_per_case.csv")
    scenarios["missing metric"] = ([good, no_column], no_column, r"lacks the column\(s\) \['ece'\]")

    no_bins = make_run(root, "majority", 4)
    (no_bins / "val_reliability.csv").unlink()
    scenarios["no reliability bins"] = ([good, no_bins], no_bins, "no reliability bins")

    unfinished = make_run(root, "majority", 5, sweep_stage="training")
    scenarios["unfinished sweep run"] = ([good, unfinished], unfinished, "unfinished sweep run")

    other_cases = make_run(root, "majority", 6, cases=CASES[:-1])
    scenarios["other cases"] = ([good, other_cases], other_cases, "other cases")

    other_classes = make_run(root, "majority", 7, classes=("kidney", "tumour"))
    scenarios["other classes"] = ([good, other_classes], other_classes, "classes")

    twin = root / "copy"
    twin.mkdir()
    for name in ("config.yaml", "val_per_case.csv", "val_reliability.csv"):
        (twin / name).write_bytes((good / name).read_bytes())
    scenarios["same fusion and seed"] = ([good, twin], twin, "both fusion 'mean', seed 0")
    return scenarios


def test_bad_runs_are_errors_naming_the_run_and_nothing_is_written(tmp_path, capsys):
    for scenario, (runs, culprit, message) in _bad_runs(tmp_path).items():
        with pytest.raises(ValueError, match=message) as info:
            write_report(runs, tmp_path / "out")
        assert str(culprit) in str(info.value), scenario
        assert main(["report", *map(str, runs), "--out", str(tmp_path / "out")]) == 2, scenario
        assert str(culprit) in capsys.readouterr().err, scenario
        assert not (tmp_path / "out").exists(), scenario


def test_a_finished_sweep_run_is_read_with_its_recorded_manifest(tmp_path):
    run = make_run(tmp_path, "mean", 3, sweep_stage="done")
    (loaded,) = load_runs([run])
    assert (loaded.fusion, loaded.seed, loaded.name) == ("mean", 3, "mean-seed3")
    assert loaded.manifest == Path("/abs/manifest.csv")
    assert loaded.class_names == ("organ", "lesion")


def test_pooled_reliability_equals_the_bins_of_all_voxels():
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 8, 8, 12))) * 3, dim=1)
    target = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 8, 8, 12))), dim=1)
    edges = np.linspace(0, 1, 11)

    def frame(p, t):
        bins = reliability_bins(p, t, n_bins=10)
        return pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": bins.count[0].numpy(),
                             "confidence": bins.confidence[0].numpy(), "accuracy": bins.accuracy[0].numpy()})

    parts = [frame(probs[..., :5], target[..., :5]), frame(probs[..., 5:], target[..., 5:])]
    pooled = pooled_reliability(parts)
    whole = frame(probs, target)
    np.testing.assert_array_equal(pooled["count"], whole["count"])
    np.testing.assert_allclose(pooled["confidence"], whole["confidence"], rtol=1e-9)
    np.testing.assert_allclose(pooled["accuracy"], whole["accuracy"], rtol=1e-9)
    with pytest.raises(ValueError, match="different edges"):
        pooled_reliability([parts[0], parts[1].iloc[:5]])


def test_fusion_names_agree_with_medjdt_labels():
    assert FUSION_ORDER == FUSION_METHODS
    assert all(method in METHODS for method in FUSION_METHODS)

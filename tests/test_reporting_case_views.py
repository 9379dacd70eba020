"""Case views: the best, median and worst case by Dice drawn with their raters' contours, checked against the masks
(reoriented by nibabel), slices chosen with numpy, and the selection against a direct sort; through ``medjdt
evaluate`` and ``medjdt report`` on phantoms; progress bars of ``evaluate`` and ``fuse``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.contour import ContourSet
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import f1_score

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest, write_nifti
from medjdt.reporting.case_views import (
    DEFAULT_CT_WINDOW,
    ViewCase,
    case_view_figure,
    load_view_case,
    select_cases,
)
from medjdt.reporting.evaluate import evaluate_predictions

C = 3
CLASSES = ("background", "organ", "lesion")
RATERS = ("ann", "bob", "cyd")


def _majority(raters: np.ndarray) -> np.ndarray:
    return np.stack([(raters == c).sum(0) for c in range(C)]).argmax(0)  # ties: the lowest label


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Mean over the foreground classes present in the reference of scikit-learn's F1 (= Dice)."""
    present = [c for c in range(1, C) if (reference == c).any()]
    return float(np.mean([f1_score((reference == c).ravel(), (prediction == c).ravel()) for c in present]))


def _direct_ranks(dice: dict) -> dict:
    keys = [k for k in dice if np.isfinite(dice[k])]
    order = sorted(keys, key=lambda k: (dice[k], k))
    return {"worst": order[0], "median": order[(len(order) - 1) // 2], "best": order[-1]}


def test_selection_matches_a_direct_sort_of_the_dice():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7, 10):
        dice = {f"case_{i:02d}": float(v) for i, v in enumerate(rng.uniform(0, 1, n))}
        dice["empty_reference"] = float("nan")
        values = np.array([v for v in dice.values() if np.isfinite(v)])
        names = [k for k, v in dice.items() if np.isfinite(v)]
        chosen = select_cases(dice)
        assert chosen["best"] == names[int(np.argmax(values))]
        assert len(set(chosen.values())) == len(chosen) == min(n, 3)  # each case drawn once
        if n >= 2:
            assert chosen["worst"] == names[int(np.argmin(values))]
        if n >= 3:
            assert dice[chosen["median"]] == np.sort(values)[(n - 1) // 2]
            assert chosen == _direct_ranks(dice)
    assert select_cases({"a": float("nan")}) == {}


def _fabricated_case() -> tuple[ViewCase, dict[str, np.ndarray]]:
    """A case on an LPS grid (x and y flipped) with lopsided masks, and its arrays in RAS order (from nibabel)."""
    rng = np.random.default_rng(3)
    shape = (16, 12, 9)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, -0.6, 0, 20.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
    raters = np.zeros((3, *shape), dtype=np.int64)
    raters[:, 2:7, 1:5, 2:7] = 1  # every rater: organ in one corner
    raters[:, 3:5, 2:4, 3:5] = 2
    raters[1, 7:9, 1:5, 4] = 1  # bob alone goes further on slice 4
    raters[2, 7:10, 1:3, 4] = 1  # cyd too
    raters[0, 3:5, 2:4, 5] = 0  # ann sees no lesion on slice 5
    raters[2, 12:14, 8:10, 1] = 2  # cyd alone marks a lesion elsewhere on slice 1
    majority = _majority(raters)
    logits = 4.0 * np.moveaxis(np.eye(C)[majority], -1, 0) + 0.3 * rng.standard_normal((C, *shape))
    logits[2, 9:15, 5:11, 6] += 10.0  # the prediction's largest error is on slice 6
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    image = rng.normal(0, 100, shape).astype(np.float32)
    case = ViewCase("c1", image, raters, probs.astype(np.float32), affine, RATERS, CLASSES, "CT")

    def canonical(a: np.ndarray) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(a, affine)).dataobj)

    ras_affine = nib.as_closest_canonical(nib.Nifti1Image(image, affine)).affine
    arrays = {"affine": ras_affine, "raters": np.stack([canonical(r.astype(np.int16)) for r in raters]),
              "probs": np.stack([canonical(p) for p in probs]), "image": canonical(image)}
    return case, arrays


def _contours(ax) -> dict[str, ContourSet]:
    return {c.get_gid(): c for c in ax.collections if isinstance(c, ContourSet)}


def _vertices(contour: ContourSet | None) -> np.ndarray:
    if contour is None:
        return np.zeros((0, 2))
    return np.concatenate([p.vertices for p in contour.get_paths()] or [np.zeros((0, 2))])


def test_slices_and_contours_come_from_the_masks_of_the_case_shown():
    case, ras = _fabricated_case()
    raters, probs, affine = ras["raters"], ras["probs"], ras["affine"]
    majority, predicted = _majority(raters), probs.argmax(0)
    expected = {
        "disagreement": int(np.argmax((raters != raters[0]).any(0).sum((0, 1)))),
        "error": int(np.argmax((predicted != majority).sum((0, 1)))),
    }
    assert expected == {"disagreement": 4, "error": 6}  # the test case is built so (4 beats slice 1's 4 voxels)
    fig = case_view_figure(case, dice=0.5)
    axes = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert set(axes) == {f"{panel}:{row}" for panel in ("image", "uncertainty", "disagreement")
                         for row in ("disagreement", "error")}
    assert "case c1" in fig.get_suptitle() and "Dice 0.5000" in fig.get_suptitle()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(any(name in t for t in legend) for name in (*RATERS, "organ", "lesion", "prediction"))
    for name, k in expected.items():
        ax = axes[f"image:{name}"]
        assert int(re.match(r"slice (\d+) ", ax.get_title()).group(1)) == k
        contours = _contours(ax)
        colours = set()
        for r, rater in enumerate(RATERS):
            for c in (1, 2):
                mask = raters[r, :, :, k] == c
                contour = contours.get(f"rater={rater}/class={CLASSES[c]}")
                vertices = _vertices(contour)
                assert (len(vertices) > 0) == mask.any(), (name, rater, c)
                if mask.any():
                    colours.add(tuple(np.round(contour.get_edgecolor()[0], 3)))
                    # the contour lies around the mask's voxels, in mm, in the RAS display
                    i, j = np.nonzero(mask)
                    world = affine @ np.stack([i, j, np.full_like(i, k), np.ones_like(i)])
                    sx, sy = np.linalg.norm(affine[:3, :2], axis=0)
                    assert vertices[:, 0].min() >= world[0].min() - sx and vertices[:, 0].max() <= world[0].max() + sx
                    assert vertices[:, 1].min() >= world[1].min() - sy and vertices[:, 1].max() <= world[1].max() + sy
        assert len(colours) == len(RATERS)  # one colour per rater
        for c in (1, 2):
            shown = len(_vertices(contours.get(f"prediction/class={CLASSES[c]}"))) > 0
            assert shown == (predicted[:, :, k] == c).any()
        uncertainty_ax, disagreement_ax = axes[f"uncertainty:{name}"], axes[f"disagreement:{name}"]
        np.testing.assert_allclose(ax.images[0].get_array(), ras["image"][:, :, k].T)
        assert ax.images[0].get_clim() == DEFAULT_CT_WINDOW
        reference = scipy_entropy(probs[:, :, :, k], base=C, axis=0).T
        np.testing.assert_allclose(uncertainty_ax.images[0].get_array(), reference, atol=1e-5)
        np.testing.assert_allclose(disagreement_ax.images[0].get_array(), (raters != majority).mean(0)[:, :, k].T)


def test_other_modalities_use_the_percentiles_and_bad_shapes_are_errors():
    case, ras = _fabricated_case()
    mri = ViewCase(**{**case.__dict__, "modality": "MR"})
    clim = case_view_figure(mri, dice=0.1).axes[0].images[0].get_clim()
    np.testing.assert_allclose(clim, np.percentile(case.image, [1, 99]), rtol=1e-6)
    with pytest.raises(ValueError, match="case 'c1'.*spatial shape"):
        case_view_figure(ViewCase(**{**case.__dict__, "probs": case.probs[:, :-1]}), dice=0.1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path, dict[str, float]]:
    """Phantoms, a prediction of each case near its majority vote, and each case's Dice (scikit-learn)."""
    root = tmp_path_factory.mktemp("views")
    manifest = make_phantom_dataset(root / "data", cases=4, raters=3, shape=(20, 20, 16), dims=3, seed=5, folds=2)
    rng = np.random.default_rng(1)
    predictions = root / "run" / "predict" / "last" / "predictions"
    dice = {}
    for case_id, rows in read_manifest(manifest).frame.groupby("case_id"):
        raters = np.stack([np.asarray(nib.load(p).dataobj).astype(np.int64) for p in rows["label"]])
        majority = _majority(raters)
        logits = 1.0 * rng.standard_normal((C, *raters.shape[1:])) + (1.5 + 0.5 * len(dice)) * np.moveaxis(
            np.eye(C)[majority], -1, 0)
        probs = (np.exp(logits) / np.exp(logits).sum(0, keepdims=True)).astype(np.float32)
        write_nifti(np.moveaxis(probs, 0, -1), nib.load(rows["image"].iloc[0]).affine,
                    predictions / f"{case_id}_probs.nii.gz")
        dice[case_id] = _dice(majority, probs.argmax(0))
    return manifest, predictions, dice


def test_evaluate_writes_the_best_median_and_worst_case(phantoms, tmp_path, capsys):
    manifest, predictions, dice = phantoms
    out = tmp_path / "eval" / "results.csv"
    (out.parent / "case_views").mkdir(parents=True)
    (out.parent / "case_views" / "best_case_from_an_earlier_evaluation.png").write_bytes(b"")
    assert main(["evaluate", "--manifest", str(manifest), "--predictions", str(predictions), "--out", str(out)]) == 0
    ranks = _direct_ranks(dice)
    expected = {f"{rank}_{case_id}.png" for rank, case_id in ranks.items()}
    views = out.parent / "case_views"
    assert {p.name for p in views.iterdir()} == expected
    for png in views.iterdir():
        assert matplotlib.image.imread(png).shape[2] in (3, 4)
    assert "case views (best, median, worst by Dice)" in capsys.readouterr().out


def test_a_written_uncertainty_map_is_the_one_shown(phantoms, tmp_path):
    manifest, predictions, _ = phantoms
    data = read_manifest(manifest)
    record = data.cases()[0]
    folder = tmp_path / "pred"
    folder.mkdir()
    probs = folder / f"{record.case_id}_probs.nii.gz"
    probs.write_bytes((predictions / probs.name).read_bytes())
    case = load_view_case(data, record, folder)
    assert case.uncertainty is None and case.rater_names == tuple(record.raters)
    image = nib.load(record.image)
    write_nifti(np.full(image.shape, 0.25, np.float32), image.affine, folder / f"{record.case_id}_uncertainty.nii.gz")
    fig = case_view_figure(load_view_case(data, record, folder), dice=0.5)
    shown = [a.images[0].get_array() for a in fig.axes if str(a.get_gid()).startswith("uncertainty:")]
    assert len(shown) == 2 and all(np.allclose(s, 0.25) for s in shown)
    write_nifti(np.zeros((3, 3, 3), np.float32), image.affine, folder / f"{record.case_id}_uncertainty.nii.gz")
    with pytest.raises(ValueError, match=f"case '{record.case_id}': uncertainty map .* has shape"):
        load_view_case(data, record, folder)


def test_two_dimensional_cases_are_drawn(tmp_path):
    manifest = make_phantom_dataset(tmp_path / "data", cases=3, raters=3, shape=(24, 24), dims=2, seed=1, folds=3)
    rng = np.random.default_rng(0)
    for case_id, rows in read_manifest(manifest).frame.groupby("case_id"):
        raters = np.stack([np.asarray(nib.load(p).dataobj).astype(np.int64) for p in rows["label"]])
        logits = rng.standard_normal((C, *raters.shape[1:])) + 2 * np.moveaxis(np.eye(C)[_majority(raters)], -1, 0)
        probs = (np.exp(logits) / np.exp(logits).sum(0, keepdims=True)).astype(np.float32)
        write_nifti(np.moveaxis(probs, 0, -1), nib.load(rows["image"].iloc[0]).affine,
                    tmp_path / "pred" / f"{case_id}_probs.nii.gz")
    evaluate_predictions(manifest, tmp_path / "pred", case_views=tmp_path / "views")
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "views").iterdir()) == ["best", "median", "worst"]


def _run(root: Path, fusion: str, dice: dict[str, float], manifest: Path | None) -> Path:
    """A run directory (config, per-case results, reliability bins) and, with ``manifest``, predictions of its last
    checkpoint as ``medjdt predict`` writes them."""
    run = root / f"{fusion}-seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 0, "data": {"fusion": fusion}}))
    frame = pd.DataFrame({"case_id": list(dice), "dice": list(dice.values())})
    for metric in ("soft_dice", "thresholded_dice", "ece", "brier", "nll"):
        frame[metric] = 0.5
    frame["dice/organ"] = frame["dice/lesion"] = frame["dice"]
    frame.to_csv(run / "val_per_case.csv", index=False)
    pd.DataFrame({"bin_lower": [0.0, 0.5], "bin_upper": [0.5, 1.0], "count": [3, 4], "confidence": [0.3, 0.8],
                  "accuracy": [0.2, 0.9]}).to_csv(run / "val_reliability.csv", index=False)
    return run


def test_report_draws_the_cases_of_the_runs_that_have_predictions(phantoms, tmp_path, capsys):
    manifest, predictions, _ = phantoms
    cases = sorted(p.name.removesuffix("_probs.nii.gz") for p in predictions.iterdir())
    rng = np.random.default_rng(2)
    runs = {}
    for fusion in ("mean", "majority", "staple"):
        runs[fusion] = _run(tmp_path / "runs", fusion, dict(zip(cases, rng.uniform(0.1, 0.9, len(cases)))), manifest)
    for fusion, subset in (("mean", cases[:2]), ("majority", cases)):  # staple has no predictions
        folder = runs[fusion] / "predict" / "last" / "predictions"
        folder.mkdir(parents=True)
        for case_id in subset:
            (folder / f"{case_id}_probs.nii.gz").write_bytes((predictions / f"{case_id}_probs.nii.gz").read_bytes())
        (folder.parent / "run.json").write_text(json.dumps({"kind": "predict", "manifest": {"path": str(manifest)}}))
    scores = {}
    for fusion, subset in (("mean", cases[:2]), ("majority", cases)):
        table = pd.read_csv(runs[fusion] / "val_per_case.csv").set_index("case_id")["dice"]
        scores.update({(f"{fusion}-seed0", c): float(table[c]) for c in subset})
    expected = {f"{rank}_{run}_{case}.png" for rank, (run, case) in _direct_ranks(scores).items()}

    assert main(["report", *map(str, runs.values()), "--out", str(tmp_path / "report")]) == 0
    assert {p.name for p in (tmp_path / "report" / "case_views").iterdir()} == expected
    assert "3 case view(s)" in capsys.readouterr().out
    assert main(["report", str(runs["staple"]), "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "case_views").exists()
    assert main(["report", *map(str, runs.values()), "--out", str(tmp_path / "off"), "--no-case-views"]) == 0
    assert not (tmp_path / "off" / "case_views").exists()


def test_evaluate_without_case_views_and_progress_bars_of_evaluate_and_fuse(phantoms, tmp_path, monkeypatch,
                                                                           capsys):
    manifest, predictions, _ = phantoms
    monkeypatch.setenv("MEDJDT_PROGRESS", "1")
    argv = ["evaluate", "--manifest", str(manifest), "--predictions", str(predictions), "--no-case-views"]
    assert main([*argv, "--out", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").is_file() and not (tmp_path / "case_views").exists()
    assert re.search(r"evaluate: .*\d/4 ", capsys.readouterr().err)  # the bar counts the 4 cases
    assert main(["fuse", "--manifest", str(manifest), "--method", "mean", "--out", str(tmp_path / "fused")]) == 0
    assert re.search(r"fuse \(mean\): .*\d/4 ", capsys.readouterr().err)

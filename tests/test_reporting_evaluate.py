"""``medjdt evaluate``: saved probability maps against the raters, checked with scikit-learn, torchmetrics and
closed-form cases; grid mismatches and missing predictions are errors naming the case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, log_loss
from torchmetrics.classification import MulticlassCalibrationError

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest, write_nifti
from medjdt.reporting.evaluate import evaluate_predictions

C = 3


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, cases=3, raters=3, shape=(20, 20, 20), dims=3, seed=2, folds=3)


def _cases(manifest: Path) -> dict[str, tuple[nib.Nifti1Image, list[str], np.ndarray]]:
    """Case id -> (image, rater names, rater label maps (R, *spatial)), read with nibabel."""
    frame = read_manifest(manifest).frame
    out = {}
    for case_id, rows in frame.groupby("case_id"):
        raters = np.stack([np.asarray(nib.load(p).dataobj).astype(np.int64) for p in rows["label"]])
        out[case_id] = (nib.load(rows["image"].iloc[0]), list(rows["rater"]), raters)
    return out


def _majority(raters: np.ndarray) -> np.ndarray:
    votes = np.stack([(raters == c).sum(0) for c in range(C)])
    return votes.argmax(0)  # ties: the lowest label


def _write_probs(folder: Path, case_id: str, probs: np.ndarray, affine: np.ndarray) -> None:
    """``probs`` (C, *spatial) -> ``<case_id>_probs.nii.gz`` channels-last."""
    write_nifti(np.moveaxis(probs, 0, -1).astype(np.float32), affine, folder / f"{case_id}_probs.nii.gz")


def _noisy_predictions(manifest: Path, folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A softmax prediction near the majority vote of every case, written as ``predict`` would."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for case_id, (image, _, raters) in _cases(manifest).items():
        majority = np.moveaxis(np.eye(C)[_majority(raters)], -1, 0)
        logits = 1.5 * rng.standard_normal((C, *raters.shape[1:])) + 2.0 * majority
        probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
        _write_probs(folder, case_id, probs, image.affine)
        out[case_id] = np.moveaxis(np.asarray(nib.load(folder / f"{case_id}_probs.nii.gz").dataobj), -1, 0)
    return out


def _row(results: pd.DataFrame, case_id: str, predictor: str, reference: str, rater: str = "") -> pd.Series:
    rater_col = results["rater"].fillna("").astype(str)
    match = results[
        (results["case_id"] == case_id)
        & (results["predictor"] == predictor)
        & (results["reference"] == reference)
        & (rater_col == rater)
    ]
    assert len(match) == 1, (case_id, predictor, reference, rater)
    return match.iloc[0]


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Mean over the foreground classes of scikit-learn's F1 (= Dice) of the binary masks."""
    return float(np.mean([f1_score((reference == c).ravel(), (prediction == c).ravel()) for c in range(1, C)]))


def test_metrics_match_independent_references(phantoms, tmp_path):
    predictions = _noisy_predictions(phantoms, tmp_path / "pred")
    results = evaluate_predictions(phantoms, tmp_path / "pred")
    cases = _cases(phantoms)
    for case_id, (_, names, raters) in cases.items():
        probs = predictions[case_id]
        flat = probs.reshape(C, -1).T
        argmax = probs.argmax(0)
        majority = _majority(raters)
        for c in range(1, C):
            assert (majority == c).any() and (argmax == c).any()  # Dice is defined for every class

        row = _row(results, case_id, "model", "majority")
        assert row["dice"] == pytest.approx(_dice(majority, argmax), abs=1e-6)
        one_hot = np.eye(C)[majority.ravel()]
        assert row["brier"] == pytest.approx(((flat - one_hot) ** 2).sum(1).mean(), abs=1e-5)
        assert row["nll"] == pytest.approx(log_loss(majority.ravel(), flat, labels=list(range(C))), abs=1e-4)
        ece = MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(
            torch.from_numpy(flat), torch.from_numpy(majority.ravel())
        )
        assert row["ece"] == pytest.approx(float(ece), abs=1e-5)

        mean = np.stack([(raters == c).mean(0) for c in range(C)]).reshape(C, -1).T
        row = _row(results, case_id, "model", "mean")
        assert row["brier"] == pytest.approx(((flat - mean) ** 2).sum(1).mean(), abs=1e-5)
        assert row["nll"] == pytest.approx(-(mean * np.log(flat)).sum(1).mean(), abs=1e-4)

        for r, name in enumerate(names):
            row = _row(results, case_id, "model", "rater", name)
            assert row["dice"] == pytest.approx(_dice(raters[r], argmax), abs=1e-6)
            others = np.delete(raters, r, axis=0)
            others_majority = _majority(others)
            row = _row(results, case_id, "rater", "others_majority", name)
            assert row["dice"] == pytest.approx(_dice(others_majority, raters[r]), abs=1e-6)
            row = _row(results, case_id, "model", "others_majority", name)
            assert row["dice"] == pytest.approx(_dice(others_majority, argmax), abs=1e-6)
            others_mean = np.stack([(others == c).mean(0) for c in range(C)])
            rater_one_hot = np.stack([raters[r] == c for c in range(C)])
            row = _row(results, case_id, "rater", "others_mean", name)
            assert row["brier"] == pytest.approx(((rater_one_hot - others_mean) ** 2).sum(0).mean(), abs=1e-5)
        # the inter-rater ceiling: every pair of raters, one against the other, averaged
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        row = _row(results, case_id, "raters", "pairwise")
        assert row["dice"] == pytest.approx(np.mean([_dice(raters[j], raters[i]) for i, j in pairs]), abs=1e-6)
        assert row["grid"] == "original"
    # Two references for the model, then per rater: the rater, and others' mean and majority for model and rater;
    # and the pairwise inter-rater row.
    assert len(results) == sum(3 + 5 * len(names) for _, names, _ in cases.values())
    assert not results.duplicated(["case_id", "predictor", "rater", "reference"]).any()


def test_closed_form_cases(phantoms, tmp_path):
    """A model that outputs rater 2's mask agrees perfectly with rater 2, and is exactly that rater against the
    others; a model that outputs the raters' mean is perfect against the mean."""
    cases = _cases(phantoms)
    for folder, make in (("as_rater", lambda raters: np.eye(C)[raters[1]]), ("as_mean", None)):
        (tmp_path / folder).mkdir()
        for case_id, (image, _, raters) in cases.items():
            if make is None:
                probs = np.stack([(raters == c).mean(0) for c in range(C)])
            else:
                probs = np.moveaxis(make(raters), -1, 0)
            _write_probs(tmp_path / folder, case_id, probs, image.affine)
    as_rater = evaluate_predictions(phantoms, tmp_path / "as_rater")
    as_mean = evaluate_predictions(phantoms, tmp_path / "as_mean")
    metrics = ["dice", "iou", "soft_dice", "thresholded_dice", "ece", "brier", "nll"]
    for case_id, (_, names, _) in cases.items():
        second = names[1]
        row = _row(as_rater, case_id, "model", "rater", second)
        assert (row["dice"], row["soft_dice"], row["iou"]) == (1.0, 1.0, 1.0)
        assert row["brier"] == 0.0 and row["ece"] == 0.0
        for reference in ("others_mean", "others_majority"):
            model = _row(as_rater, case_id, "model", reference, second)[metrics].astype(float)
            rater = _row(as_rater, case_id, "rater", reference, second)[metrics].astype(float)
            np.testing.assert_allclose(model.to_numpy(), rater.to_numpy(), rtol=1e-6)
        row = _row(as_mean, case_id, "model", "mean")
        assert row["soft_dice"] == pytest.approx(1.0, abs=1e-6)
        assert row["brier"] == pytest.approx(0.0, abs=1e-7)
        assert row["ece"] == pytest.approx(0.0, abs=1e-6)


def test_cli_writes_the_results_csv_for_the_selected_folds(phantoms, tmp_path, capsys):
    _noisy_predictions(phantoms, tmp_path / "pred")
    out = tmp_path / "results.csv"
    assert main(["evaluate", "--manifest", str(phantoms), "--predictions", str(tmp_path / "pred"),
                 "--out", str(out), "--folds", "0"]) == 0
    written = pd.read_csv(out, dtype={"case_id": str, "rater": str}, keep_default_na=False, na_values=[""])
    fold0 = {r.case_id for r in read_manifest(phantoms).cases([0])}
    assert set(written["case_id"]) == fold0
    expected = evaluate_predictions(phantoms, tmp_path / "pred", folds=[0])
    np.testing.assert_allclose(written["dice"].to_numpy(), expected["dice"].to_numpy(), rtol=1e-12)
    assert "others_majority" in capsys.readouterr().out


def _expect_error(phantoms, folder: Path, capsys, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(phantoms, folder)
    out = folder.parent / "results.csv"
    assert main(["evaluate", "--manifest", str(phantoms), "--predictions", str(folder), "--out", str(out)]) == 2
    assert not out.exists()
    capsys.readouterr()


def test_a_prediction_off_the_case_grid_is_an_error_naming_the_case(phantoms, tmp_path, capsys):
    predictions = _noisy_predictions(phantoms, tmp_path / "pred")
    cases = _cases(phantoms)
    case_id = sorted(cases)[1]
    image = cases[case_id][0]
    shifted = image.affine.copy()
    shifted[0, 3] += 1.0
    _write_probs(tmp_path / "pred", case_id, predictions[case_id], shifted)
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}'.*not on the case's image grid")

    _write_probs(tmp_path / "pred", case_id, predictions[case_id][:, :-1], image.affine)
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}'.*shape")

    _write_probs(tmp_path / "pred", case_id, predictions[case_id][:2], image.affine)
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}'.*3 channels")


def test_missing_or_invalid_predictions_are_errors_naming_the_case(phantoms, tmp_path, capsys):
    predictions = _noisy_predictions(phantoms, tmp_path / "pred")
    cases = _cases(phantoms)
    case_id = sorted(cases)[0]
    (tmp_path / "pred" / f"{case_id}_probs.nii.gz").unlink()
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}': no prediction")

    _write_probs(tmp_path / "pred", case_id, 2 * predictions[case_id], cases[case_id][0].affine)
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}'")

    (tmp_path / "pred" / f"{case_id}_probs.nii.gz").write_bytes(b"truncated")
    _expect_error(phantoms, tmp_path / "pred", capsys, f"case '{case_id}': cannot read prediction")

    _expect_error(phantoms, tmp_path / "nowhere", capsys, "does not exist")

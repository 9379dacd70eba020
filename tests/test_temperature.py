"""Post-hoc temperature scaling: the fitted temperature minimises the NLL (against an independent computation and a
closed-form case), T = 1 changes nothing, and ``--model.temperature auto`` fits on the run's validation fold only."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest
from medjdt.models import SegmentationModule
from medjdt.models.temperature import fit_temperature, nll_at_temperature

ROOT = Path(__file__).resolve().parents[1]


def _logits(n: int = 4000, c: int = 3, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def test_the_fitted_temperature_minimises_the_nll_against_scipy_on_torch_cross_entropy():
    logits = _logits()
    generator = torch.Generator().manual_seed(1)
    labels = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=generator)[:, 0]  # overconfident logits

    def reference(log_t: float) -> float:  # independent NLL: torch's cross-entropy
        return float(F.cross_entropy(logits.double() / np.exp(log_t), labels))

    expected = np.exp(minimize_scalar(reference, bounds=(-3, 3), method="bounded", options={"xatol": 1e-8}).x)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(expected, rel=1e-3)
    assert fit.temperature > 1.5  # the logits were sharper than the labels: the temperature softens them
    assert fit.nll_after == pytest.approx(reference(np.log(fit.temperature)), rel=1e-9)
    assert fit.nll_before == pytest.approx(reference(0.0), rel=1e-9) and fit.nll_after < fit.nll_before
    for t in np.geomspace(0.2, 10, 25):  # no temperature on a grid does better
        assert nll_at_temperature(logits, labels, t) >= fit.nll_after - 1e-12


def test_soft_targets_made_at_a_known_temperature_give_that_temperature_back():
    logits = _logits(seed=2)
    for true_t in (0.5, 1.0, 3.0):
        fit = fit_temperature(logits, torch.softmax(logits.double() / true_t, 1))
        assert fit.temperature == pytest.approx(true_t, rel=1e-3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="probability vectors"):
        fit_temperature(torch.zeros(2, 3), torch.full((2, 3), 0.5))


def test_temperature_one_leaves_predictions_unchanged_and_any_temperature_keeps_the_argmax():
    net = {"class_path": "UNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                               "channels": [4, 8], "strides": [2]}}
    torch.manual_seed(0)
    module = SegmentationModule(network=net, roi_size=[16, 16]).eval()
    image = torch.randn(1, 1, 16, 16)
    plain = module.infer(image)
    module.temperature = 1.0
    torch.testing.assert_close(module.infer(image), plain, rtol=0, atol=0)
    module.temperature = 0.3
    sharp = module.infer(image)
    assert torch.equal(sharp.argmax(1), plain.argmax(1)) and sharp.max(1).values.mean() > plain.max(1).values.mean()
    with pytest.raises(ValueError, match="model.temperature must be a finite number > 0, got -1.0"):
        SegmentationModule(network=net, roi_size=[16, 16], temperature=-1.0)


def test_auto_fits_on_the_runs_validation_fold_never_on_the_command_data(tmp_path):
    train = make_phantom_dataset(tmp_path / "train", cases=6, raters=3, shape=(16, 16, 16), dims=3, seed=0, folds=3)
    other = make_phantom_dataset(tmp_path / "other", cases=3, raters=3, shape=(16, 16, 16), dims=3, seed=9, folds=1)
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data.patch_size", "16", "16", "16",
              "--data.num_workers", "0", "--model.network.init_args.channels", "[4, 8]",
              "--model.network.init_args.strides", "[2]", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--data.fusion", "majority"]
    run = tmp_path / "run"
    assert main(["fit", *common, "--data.manifest", str(train), "--trainer.max_epochs", "2", "--run_dir",
                 str(run)]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    # predicting another dataset with auto: the temperature still comes from the run's own validation fold
    assert main(["predict", *common, "--data.manifest", str(other), "--data.predict_on", "all", "--ckpt_path",
                 str(ckpt), "--model.temperature", "auto"]) == 0
    stored = json.loads((run / "checkpoints" / "last.temperature.json").read_text())
    val_cases = sorted(r.case_id for r in read_manifest(train).cases([0]))
    assert stored["fitted_on"] == {"manifest": str(train), "fold": 0, "fusion": "majority", "cases": val_cases}
    assert stored["n_cases"] == len(val_cases) and stored["nll_after"] <= stored["nll_before"]
    scaled = run / "predict" / "last" / "predictions"
    assert main(["predict", *common, "--data.manifest", str(other), "--data.predict_on", "all", "--ckpt_path",
                 str(ckpt)]) == 0
    unscaled = run / "predict" / "last-2" / "predictions"  # other inputs (no temperature): its own folder
    for case in ("case_000", "case_001", "case_002"):
        a = nib.load(scaled / f"{case}_probs.nii.gz").get_fdata()
        b = nib.load(unscaled / f"{case}_probs.nii.gz").get_fdata()
        assert np.array_equal(a.argmax(-1), b.argmax(-1)) and not np.allclose(a, b)
    # stored beside the checkpoint: not fitted again while the checkpoint is unchanged
    mtime = (run / "checkpoints" / "last.temperature.json").stat().st_mtime_ns
    assert main(["validate", *common, "--data.manifest", str(train), "--ckpt_path", str(ckpt),
                 "--model.temperature", "auto"]) == 0
    assert (run / "checkpoints" / "last.temperature.json").stat().st_mtime_ns == mtime
    assert main(["fit", *common, "--data.manifest", str(train), "--model.temperature", "auto"]) == 2

"""What ``medjdt predict`` writes for a viewer: probabilities, label map, uncertainty map (normalised predictive
entropy) on each case's original grid, ITK-SNAP and 3D Slicer colour tables with the manifest's class names; and
test-time augmentation by flips (``--model.tta flips``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from scipy.stats import entropy

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest
from medjdt.models import SegmentationModule
from medjdt.models.prediction_writer import normalised_entropy
from medjdt.models.tta import flip_averaged, flip_combinations
from medjdt.models.viewer_files import colour_tables

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "left kidney", "tumour"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Three 16^3 phantoms (one per fold) whose manifest names the classes ``CLASS_NAMES``."""
    manifest = make_phantom_dataset(
        tmp_path_factory.mktemp("phantoms"), cases=3, raters=2, shape=(16, 16, 16), dims=3, seed=0, folds=3
    )
    meta_path = manifest.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["class_names"] = CLASS_NAMES
    meta_path.write_text(json.dumps(meta))
    return manifest


def predict_args(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    """An untrained tiny UNet predicting every case, resampled to 1.5 mm (so the written maps must be resampled
    back onto each case's own grid)."""
    return [
        "predict", "--config", str(ROOT / "configs" / "demo.yaml"), "--data.manifest", str(manifest),
        "--data.patch_size", "16", "16", "16", "--data.spacing", "1.5", "1.5", "1.5", "--data.num_workers", "0",
        "--data.predict_on", "all", "--model.network.init_args.channels", "[4, 8]",
        "--model.network.init_args.strides", "[2]", "--model.network.init_args.num_res_units", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--allow_untrained", "true", "--run_dir", str(run_dir), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def predictions(phantoms, tmp_path_factory) -> dict[str, Path]:
    """Run folders of ``predict`` without and with ``--model.tta flips`` (the same untrained network: seed 0)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {"plain": root / "plain", "flips": root / "flips"}
    assert main(predict_args(phantoms, runs["plain"])) == 0
    assert main(predict_args(phantoms, runs["flips"], "--model.tta", "flips")) == 0
    return runs


# ----------------------------------------------------------------------------------------------- uncertainty map
def test_normalised_entropy_is_0_when_certain_and_1_when_every_class_is_equally_likely():
    probs = np.array(
        [  # columns: certain (class 0), certain (class 2), uniform, two classes tied, something in between
            [1.0, 0.0, 1 / 3, 0.5, 0.7],
            [0.0, 0.0, 1 / 3, 0.5, 0.2],
            [0.0, 1.0, 1 / 3, 0.0, 0.1],
        ]
    )
    got = normalised_entropy(probs)
    assert got.dtype == np.float32 and got.shape == (5,)
    np.testing.assert_allclose(got[:3], [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(got, entropy(probs, base=3, axis=0), atol=1e-6)  # H / log C
    np.testing.assert_allclose(normalised_entropy(np.full((2, 4, 4), 0.5)), 1.0, atol=1e-6)
    for bad in (np.ones((1, 4)), np.full((2, 3), np.nan), np.array([[1.5, 0.2], [-0.5, 0.8]])):
        with pytest.raises(ValueError, match="normalised_entropy"):
            normalised_entropy(bad)


def test_predict_writes_uncertainty_on_the_original_grid(phantoms, predictions):
    folder = predictions["plain"] / "predictions"
    manifest = read_manifest(phantoms)
    for case_id, rows in manifest.frame.groupby("case_id"):
        image = nib.load(rows["image"].iloc[0])
        probs = nib.load(folder / f"{case_id}_probs.nii.gz")
        uncertainty = nib.load(folder / f"{case_id}_uncertainty.nii.gz")
        assert uncertainty.shape == image.shape[:3]
        assert uncertainty.get_data_dtype() == np.float32
        np.testing.assert_allclose(uncertainty.affine, image.affine, atol=1e-5)
        p = np.asarray(probs.dataobj)
        u = np.asarray(uncertainty.dataobj)
        np.testing.assert_allclose(u, entropy(p, base=p.shape[-1], axis=-1), atol=1e-5)
        assert 0 <= u.min() and u.max() <= 1 and u.std() > 0


# ----------------------------------------------------------------------------------------------- colour tables
def _itksnap_rows(path: Path) -> list[tuple[int, tuple[int, int, int], float, int, int, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+\"(.*)\"\s*", line)
        assert match, f"not an ITK-SNAP label row: {line!r}"
        index, r, g, b, alpha, vis, msh, label = match.groups()
        rows.append((int(index), (int(r), int(g), int(b)), float(alpha), int(vis), int(msh), label))
    return rows


def _slicer_rows(path: Path) -> list[tuple[int, str, tuple[int, int, int], int]]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# Color table file")
    rows = []
    for line in lines:
        if line.startswith("#"):
            continue
        index, name, r, g, b, a = line.split()  # exactly six fields: names carry no spaces
        rows.append((int(index), name, (int(r), int(g), int(b)), int(a)))
    return rows


def test_colour_tables_list_the_manifests_class_names(predictions):
    folder = predictions["plain"] / "predictions"
    itksnap = _itksnap_rows(folder / "labels.itksnap.txt")
    assert (folder / "labels.itksnap.txt").read_text().splitlines()[1] == "# ITK-SnAP Label Description File"
    assert [row[0] for row in itksnap] == [0, 1, 2]
    assert [row[5] for row in itksnap] == CLASS_NAMES
    assert itksnap[0][2] == 0 and all(row[2] == 1 and row[3] == 1 for row in itksnap[1:])  # background clear
    slicer = _slicer_rows(folder / "labels.ctbl")
    assert [row[0] for row in slicer] == [0, 1, 2]
    assert [row[1] for row in slicer] == ["background", "left_kidney", "tumour"]
    assert slicer[0][3] == 0 and all(row[3] == 255 for row in slicer[1:])
    # one colour per label, the same in both files
    assert [row[1] for row in itksnap] == [row[2] for row in slicer]
    assert len({row[1] for row in itksnap}) == 3
    # the label map's values are the tables' indices
    labels = np.concatenate([np.asarray(nib.load(p).dataobj).ravel() for p in folder.glob("*_label.nii.gz")])
    assert set(np.unique(labels)) <= {row[0] for row in slicer}


def test_colour_tables_for_many_classes_have_distinct_colours_and_refuse_bad_names(tmp_path):
    names = ["background", *(f"structure {c}" for c in range(1, 40))]
    for name, text in colour_tables(names).items():
        (tmp_path / name).write_text(text)
    itksnap = _itksnap_rows(tmp_path / "labels.itksnap.txt")
    slicer = _slicer_rows(tmp_path / "labels.ctbl")
    assert [row[5] for row in itksnap] == names
    assert [row[1] for row in slicer] == [name.replace(" ", "_") for name in names]
    assert [row[1] for row in itksnap] == [row[2] for row in slicer]
    assert len({row[1] for row in itksnap}) == 40
    for bad in (["background"], ["background", "  "]):
        with pytest.raises(ValueError, match="colour tables"):
            colour_tables(bad)


# ---------------------------------------------------------------------------------------- test-time augmentation
class SymmetricConv(torch.nn.Module):
    """A network whose output does not depend on position and commutes with flips: a convolution with a kernel
    that is symmetric under every flip, zero padding."""

    in_channels, out_channels = 1, 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_(sum(w.flip(axes) for axes in flip_combinations(3)) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _module(network: torch.nn.Module, shape: tuple[int, ...], **kwargs) -> SegmentationModule:
    return SegmentationModule(network, roi_size=list(shape), **kwargs).eval()


def test_flip_tta_of_a_flip_symmetric_network_equals_the_plain_prediction():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 12, 10, 8)
    network = SymmetricConv()
    with torch.no_grad():
        plain = _module(network, image.shape[2:]).infer(image)
        tta = _module(network, image.shape[2:], tta="flips").infer(image)
        torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)
        constant = flip_averaged(lambda x: torch.full((1, 3, *x.shape[2:]), 1 / 3), image)
    torch.testing.assert_close(constant, torch.full((1, 3, 12, 10, 8), 1 / 3))


def test_flip_tta_of_a_unet_averages_the_tempered_probabilities_over_the_eight_flips():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 16, 16, 16)
    unet = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=0)
    with torch.no_grad():
        plain = _module(unet, (16, 16, 16), temperature=2.0).infer(image)
        tta = _module(unet, (16, 16, 16), temperature=2.0, tta="flips").infer(image)
        assert (tta - plain).abs().max() > 1e-3  # the network is not flip-symmetric
        torch.testing.assert_close(tta.sum(1), torch.ones(1, 16, 16, 16), rtol=0, atol=1e-5)
        # the reference: the eight flips written out, softmax(logits / T) of each, flipped back, averaged
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        reference = torch.zeros_like(plain)
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            p = torch.softmax(unet(x) / 2.0, dim=1)
            reference += (torch.flip(p, axes) if axes else p) / 8
    torch.testing.assert_close(tta, reference, rtol=0, atol=1e-5)
    assert sorted(flip_combinations(3)) == sorted(flips) and len(flip_combinations(2)) == 4


def test_tta_is_checked():
    with pytest.raises(ValueError, match=r"model.tta must be one of .*'flips'.*did you mean flips"):
        SegmentationModule(SymmetricConv(), roi_size=[8, 8, 8], tta="flip")
    assert SegmentationModule(SymmetricConv(), roi_size=[8, 8, 8], tta="none").tta == "none"


def test_predict_with_flip_tta_writes_outputs_and_records_tta(predictions):
    records = {name: json.loads((folder / "run.json").read_text()) for name, folder in predictions.items()}
    assert records["flips"]["inputs"]["inference"]["tta"] == "flips"
    assert records["plain"]["inputs"]["inference"]["tta"] is None
    plain, flips = (folder / "predictions" for folder in (predictions["plain"], predictions["flips"]))
    written = sorted(p.name for p in flips.iterdir())
    assert written == sorted(p.name for p in plain.iterdir())
    assert "labels.ctbl" in written and len([n for n in written if n.endswith("_uncertainty.nii.gz")]) == 3
    for path in plain.glob("*_probs.nii.gz"):
        p_plain = np.asarray(nib.load(path).dataobj)
        p_flips = np.asarray(nib.load(flips / path.name).dataobj)
        np.testing.assert_allclose(p_flips.sum(-1), 1.0, atol=1e-4)
        assert np.abs(p_flips - p_plain).max() > 1e-4  # the same untrained network, averaged over flips


def test_caching_shows_progress_when_asked(phantoms, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDJDT_PROGRESS", "1")
    args = predict_args(phantoms, tmp_path / "run", "--data.cache_dir", str(tmp_path / "cache"))
    assert main(args) == 0
    assert "caching" in capsys.readouterr().err

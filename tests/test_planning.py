"""``medjdt plan``: a fingerprint that agrees with numpy on the NIfTI files, a target spacing that leaves thick slices
alone, a memory estimate that matches what autograd keeps and a patch/batch monotone in the budget, a cache that
spares a second reading, and a plan.yaml that ``medjdt fit`` trains as it is."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import DynUNet

import medjdt.planning.fingerprint as fingerprint_module
from medjdt.cli import main
from medjdt.data import make_phantom_dataset, write_manifest
from medjdt.planning import target_spacing
from medjdt.planning.topology import activation_bytes, estimate_gib, fit_patch_and_batch, parameter_count, topology

CLASSES = ["background", "organ", "lesion"]


def write_cases(folder: Path, spacings, shape, *, modality="CT", raters=2, seed=0, slices_first=()) -> Path:
    """NIfTI cases with a bright ellipsoid organ and a small lesion, each rater's mask shifted by a voxel, and their
    manifest (two folds). ``spacings[i]`` is case i's (x, y, z) in mm; cases in ``slices_first`` are stored with
    the slice axis first (same anatomy, permuted axes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, spacing in enumerate(spacings):
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        radius = np.sqrt(sum(g**2 for g in grid))
        image = rng.normal(0, 20, shape) + np.where(radius < 0.6, 100.0, -500.0)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        masks = []
        for r in range(raters):
            label = np.zeros(shape, np.uint8)
            label[np.roll(radius, r, axis=0) < 0.6] = 1
            label[np.roll(radius, r, axis=1) < 0.2] = 2
            masks.append(label)
        if i in slices_first:  # stored as (z, y, x): the same world, another axis order
            image, masks = image.transpose(2, 1, 0), [m.transpose(2, 1, 0) for m in masks]
            affine = affine[:, [2, 1, 0, 3]]
        case = folder / f"case{i}"
        case.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), case / "image.nii.gz")
        for r, mask in enumerate(masks):
            nib.save(nib.Nifti1Image(mask, affine), case / f"r{r}.nii.gz")
            rows.append(
                {
                    "case_id": f"case{i}",
                    "image": case / "image.nii.gz",
                    "label": case / f"r{r}.nii.gz",
                    "rater": f"r{r}",
                    "fold": i % 2,
                }
            )
    return write_manifest(
        rows,
        folder / "manifest.csv",
        num_classes=3,
        class_names=CLASSES,
        modality=modality,
        spatial_dims=3,
        num_folds=2,
    )


def plan(manifest: Path, out: Path, *extra: str) -> dict:
    assert main(["plan", "--manifest", str(manifest), "--out", str(out), "--workers", "1", *extra]) == 0
    return yaml.safe_load((out / "plan.yaml").read_text())


def spacing_reason(out: Path) -> str:
    return next(line for line in (out / "plan.md").read_text().splitlines() if line.startswith("| `data.spacing`"))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantoms"), cases=6, raters=3, shape=(16, 16, 16), dims=3, seed=0, folds=3
    )


# ------------------------------------------------------------------------------------------------------- the CLI
def test_plan_then_fit_trains_the_plan_as_it_is(phantoms, tmp_path, capsys):
    config = plan(phantoms, tmp_path / "plan", "--cpu", "--max-epochs", "1")
    out = capsys.readouterr().out
    assert f"plan: {tmp_path / 'plan' / 'plan.yaml'}" in out and "read 6 case(s)" in out
    assert config["data"]["manifest"] == str(phantoms) and Path(config["data"]["manifest"]).is_absolute()
    assert config["model"]["network"]["init_args"]["out_channels"] == 3
    assert config["trainer"]["callbacks"] == [{"class_path": "medjdt.models.EvaluationTables"}]
    assert config["model"]["jdt"]["init_args"]["aggregation"] == "dataset"
    run = tmp_path / "run"
    args = [
        "fit",
        "--config",
        str(tmp_path / "plan" / "plan.yaml"),
        "--trainer.max_epochs",
        "1",
        "--data.num_workers",
        "0",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--run_dir",
        str(run),
        "--trainer.limit_train_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "val_per_case.csv").is_file()


def test_the_gpu_plan_is_a_valid_config_with_deep_supervision(phantoms, tmp_path):
    config = plan(phantoms, tmp_path / "plan")
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["precision"] == "bf16-mixed"
    assert config["model"]["network"]["init_args"]["deep_supervision"] is True
    run = tmp_path / "run"
    args = [
        "fit",
        "--config",
        str(tmp_path / "plan" / "plan.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--data.num_workers",
        "0",
        "--data.cache_dir",
        str(tmp_path / "c"),
        "--run_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0 and (run / "checkpoints" / "last.ckpt").is_file()


def test_help_and_argument_errors_answer_before_torch_loads(tmp_path):
    probe = (
        "import sys\nfrom medjdt.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'monai', 'pytorch_lightning', 'pandas', 'nibabel') if m in sys.modules]\n"
        "print('HEAVY', heavy, code)\n"
    )
    (tmp_path / "file").write_text("x")
    for args, error in [
        (["plan", "--help"], None),
        (["plan", "--manifest", "none.csv", "--out", "o"], "manifest (--manifest) none.csv does not"),
        (["plan", "--manifest", "file", "--out", "file"], "output folder (--out) file is a file"),
        (["plan", "--manifest", "file", "--out", "o", "--memory-gb", "0"], "--memory-gb"),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert "HEAVY [] " in out.stdout, out.stdout + out.stderr
        if error:
            assert out.stderr.count("\n") == 1 and out.stderr.startswith("medjdt plan: error: "), out.stderr
            assert error in out.stderr, out.stderr


def test_a_bad_case_is_one_line_naming_it(tmp_path, capsys):
    manifest = write_cases(tmp_path / "data", [(1, 1, 1)] * 2, (12, 12, 12))
    (tmp_path / "data" / "case1" / "r0.nii.gz").write_bytes(b"not a nifti")
    assert main(["plan", "--manifest", str(manifest), "--out", str(tmp_path / "p"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case 'case1'" in err and "r0.nii.gz" in err, err


# -------------------------------------------------------------------------------------------------- the spacing
def test_thick_slices_keep_their_spacing_and_plan_md_says_why(tmp_path):
    in_plane = [0.8, 0.78, 0.82, 0.8, 0.76]
    manifest = write_cases(tmp_path / "data", [(s, s, 5.0) for s in in_plane], (32, 32, 6), slices_first=(1, 3))
    config = plan(manifest, tmp_path / "plan")
    assert config["data"]["spacing"] == pytest.approx([np.median(in_plane), np.median(in_plane), 5.0])
    assert config["data"]["patch_size"][2] <= 6
    strides = config["model"]["network"]["init_args"]["strides"]
    assert strides[1] == [2, 2, 1]  # the coarse axis is not halved at the first level
    reason = spacing_reason(tmp_path / "plan")
    assert "anisotropic" in reason and "10th percentile" in reason and "not resampled" in reason, reason
    rows = list(csv.DictReader((tmp_path / "plan" / "fingerprint.csv").open()))
    assert [r["orientation"] for r in rows] == ["LPS", "SPL", "LPS", "SPL", "LPS"]


def test_an_isotropic_dataset_gets_the_median_spacing(tmp_path):
    spacings = [(1.0, 1.1, 0.9), (1.2, 1.0, 1.0), (0.9, 0.9, 1.1), (1.1, 1.2, 1.2)]
    manifest = write_cases(tmp_path / "data", spacings, (16, 16, 16))
    config = plan(manifest, tmp_path / "plan", "--cpu")
    headers = [nib.load(tmp_path / "data" / f"case{i}" / "image.nii.gz").header.get_zooms() for i in range(4)]
    assert config["data"]["spacing"] == pytest.approx(np.median(np.array(headers), axis=0).tolist(), abs=1e-4)
    assert "anisotropic" not in spacing_reason(tmp_path / "plan")


def test_the_thick_axis_goes_to_its_10th_percentile_not_below_the_other_axes():
    thickness = np.array([3.0, 5.0, 5.0, 5.0, 6.0, 7.0])
    spacings = np.stack([np.full(6, 0.7), np.full(6, 0.7), thickness], axis=1)
    shapes = np.tile([512, 512, 60], (6, 1))
    target, reason = target_spacing(spacings, shapes)
    assert target == pytest.approx([0.7, 0.7, np.percentile(thickness, 10)], abs=1e-4)
    assert "at most a tenth of the cases lose slices" in reason
    # As many slices as pixels: the median stays (the rule needs few voxels on the coarse axis as well).
    assert target_spacing(spacings, np.tile([64, 64, 64], (6, 1)))[0][2] == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------- the fingerprint
def test_the_fingerprint_agrees_with_numpy_on_the_nifti_files(phantoms, tmp_path):
    plan(phantoms, tmp_path / "plan", "--cpu")
    rows = {r["case_id"]: r for r in csv.DictReader((tmp_path / "plan" / "fingerprint.csv").open())}
    for case in sorted(phantoms.parent.glob("case_*")):
        image = nib.load(case / "image.nii.gz")
        raters = np.stack([np.asarray(nib.load(p).dataobj) for p in sorted(case.glob("rater-*.nii.gz"))])
        row = rows[case.name]
        assert int(row["raters"]) == 3 and row["orientation"] == "".join(nib.aff2axcodes(image.affine))
        assert [float(row[f"spacing_{i}"]) for i in range(3)] == pytest.approx(image.header.get_zooms(), abs=1e-5)
        voxel_ml = np.prod(image.header.get_zooms()) / 1000
        for c, name in enumerate(CLASSES[1:], start=1):
            expected = np.mean([(r == c).sum() for r in raters]) * voxel_ml
            assert float(row[f"volume_ml_{name}"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        values = image.get_fdata()[(raters > 0).any(0)]
        expected = [*np.percentile(values, [0.5, 50, 99.5]), values.mean(), values.std()]
        found = [float(row[k]) for k in ("fg_p0.5", "fg_p50", "fg_p99.5", "fg_mean", "fg_std")]
        assert found == pytest.approx(expected, abs=1e-3)
    summary = json.loads((tmp_path / "plan" / "fingerprint.json").read_text())
    assert summary["cases"] == 6 and summary["raters"]["median"] == 3 and summary["modality"] == "CT"


def test_a_second_plan_reuses_the_fingerprint_and_a_changed_manifest_invalidates_it(tmp_path, monkeypatch, capsys):
    manifest = write_cases(tmp_path / "data", [(1, 1, 1)] * 4, (12, 12, 12))
    reads = []
    original = fingerprint_module.fingerprint_case
    monkeypatch.setattr(fingerprint_module, "fingerprint_case", lambda r, **kw: reads.append(r) or original(r, **kw))
    out = tmp_path / "plan"
    plan(manifest, out, "--cpu")
    assert len(reads) == 4
    first = (out / "plan.yaml").read_text()
    plan(manifest, out, "--cpu")
    assert len(reads) == 4 and (out / "plan.yaml").read_text() == first
    assert "fingerprint: reused (manifest unchanged)" in capsys.readouterr().out
    plan(manifest, out, "--cpu", "--refresh")
    assert len(reads) == 8
    text = manifest.read_text().replace("case3,", "case3b,")  # a renamed case: another manifest
    manifest.write_text(text)
    plan(manifest, out, "--cpu")
    assert len(reads) == 12
    assert "case3b" in (out / "fingerprint.csv").read_text()


# ----------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("patch,spacing,base", [((32, 32, 32), (1, 1, 1), 8), ((64, 64, 16), (0.8, 0.8, 5), 16)])
def test_the_memory_estimate_matches_monai_and_what_autograd_keeps(patch, spacing, base):
    topo = topology(patch, spacing, base_filters=base, max_filters=128, max_levels=5)
    net = DynUNet(
        3,
        1,
        3,
        [list(k) for k in topo.kernels],
        [list(s) for s in topo.strides],
        [list(s) for s in topo.strides[1:]],
        filters=list(topo.filters),
        norm_name="instance",
    )
    assert sum(p.numel() for p in net.parameters()) == parameter_count(topo, 1, 3)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(2, 1, *patch))
    ratio = sum(kept.values()) / activation_bytes(patch, 2, topo, 1, 3, 4)
    assert 0.75 < ratio < 1.25, ratio


def test_a_smaller_budget_never_gives_a_larger_patch_or_batch():
    spacing, median = (0.8, 0.8, 2.5), (400.0, 400.0, 120.0)
    common = dict(
        dataset_voxels=100 * 400 * 400 * 120,
        in_channels=1,
        out_channels=4,
        value_bytes=2,
        overhead_gib=0.5,
        base_filters=32,
        max_filters=320,
        max_levels=6,
        deep_supervision=True,
    )
    previous = None
    for budget in [80, 48, 24, 16, 12, 8, 6, 4, 3, 2]:
        fit = fit_patch_and_batch((256, 256, 120), median, spacing, budget_gib=budget, **common)
        assert fit.fits and fit.memory_gib <= budget and fit.patches >= 2
        if previous is not None:
            assert all(a <= b for a, b in zip(fit.patch, previous.patch)) and fit.patches <= previous.patches
            assert np.prod(fit.patch) * fit.patches <= np.prod(previous.patch) * previous.patches
        previous = fit
    topo = topology((128, 128, 64), spacing, base_filters=32, max_filters=320, max_levels=6)
    sizes = [(64, 64, 32), (96, 64, 32), (96, 96, 32), (128, 128, 64)]
    kw = dict(in_channels=1, out_channels=4, value_bytes=2, overhead_gib=0.5)
    estimates = [estimate_gib(p, b, topo, **kw) for p in sizes for b in (2, 3)]
    assert estimates == sorted(estimates)


def test_memory_gb_on_the_command_line_shrinks_the_plan(phantoms, tmp_path):
    large = plan(phantoms, tmp_path / "plan", "--memory-gb", "24")["data"]
    small = plan(phantoms, tmp_path / "plan", "--memory-gb", "0.502")["data"]  # 0.5 GiB overhead + 2 MiB
    assert np.prod(small["patch_size"]) * small["batch_size"] < np.prod(large["patch_size"]) * large["batch_size"]

"""``medjdt raters``: pairwise Dice against NumPy and ``medjdt evaluate``, HD95 against SciPy distance transforms,
STAPLE on a hand-made case, the outlier flag on a deliberately bad rater, figures against the tables, the CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from medjdt.cli import main
from medjdt.data import make_phantom_dataset, read_manifest, write_nifti
from medjdt.reporting.evaluate import evaluate_predictions
from medjdt.reporting.rater_figures import AGREEMENT_BINS, RATER_BARS
from medjdt.reporting.rater_report import write_rater_report
from medjdt.reporting.raters import case_agreement

FILES = ("pairwise_dice.csv", "pairwise_hd95.csv", "raters.csv", "cases.csv", "raters.md", "pairwise_dice.png",
         "raters.png", "case_agreement.png")
CLASSES = ("organ", "lesion")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=4, raters=3, shape=(24, 24, 24), seed=0,
                                folds=2)


@pytest.fixture(scope="module")
def written(phantoms, tmp_path_factory):
    return write_rater_report(phantoms, tmp_path_factory.mktemp("report"))


def _csv(report, name: str) -> pd.DataFrame:
    return pd.read_csv(report.files[name], dtype={"rater": str, "rater_a": str, "rater_b": str})


def _raters(manifest: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Case id -> (rater names, label maps (R, *spatial), image affine), read with nibabel."""
    frame = read_manifest(manifest).frame
    out = {}
    for case_id, rows in frame.groupby("case_id"):
        maps = np.stack([np.asarray(nib.load(p).dataobj).astype(np.int64) for p in rows["label"]])
        out[case_id] = ([str(r) for r in rows["rater"]], maps, nib.load(rows["image"].iloc[0]).affine)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; NaN when both are empty."""
    total = a.sum() + b.sum()
    return 2.0 * (a & b).sum() / total if total else float("nan")


def _hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance from SciPy: border voxels by erosion, Euclidean distance
    transforms with the voxel size."""
    edge_a, edge_b = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    a_to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)[edge_a]
    b_to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)[edge_b]
    return max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


def test_pairwise_dice_matches_numpy_and_evaluate(phantoms, written, tmp_path):
    cases = _raters(phantoms)
    pairs = _csv(written, "pairwise_dice.csv").set_index(["class", "rater_a", "rater_b"])["value"]
    names = cases["case_000"][0]
    assert len(pairs) == len(CLASSES) * 3 * 2  # every ordered pair of different raters, per class
    for c, name in enumerate(CLASSES, start=1):
        for a, b in itertools.combinations(range(3), 2):
            expected = np.nanmean([_dice(maps[a] == c, maps[b] == c) for _, maps, _ in cases.values()])
            assert pairs[(name, names[a], names[b])] == pytest.approx(expected, abs=1e-6)
            assert pairs[(name, names[b], names[a])] == pytest.approx(expected, abs=1e-6)
    # medjdt evaluate's inter-rater row (the mean over the pairs of one rater against the other) on the same cases
    # (in case_003 rater 1 marks no lesion: both score its pairs 0, as the later rater of each pair marks it)
    predictions = tmp_path / "predictions"
    for case_id, (_, maps, affine) in cases.items():
        probs = np.eye(3, dtype=np.float32)[maps[0]]  # rater 1 as the model: (*spatial, C)
        write_nifti(probs, affine, predictions / f"{case_id}_probs.nii.gz")
    evaluation = evaluate_predictions(phantoms, predictions)
    inter_rater = evaluation[evaluation["reference"] == "pairwise"].set_index("case_id")
    per_case = _csv(written, "cases.csv").set_index("case_id")
    assert sorted(per_case.index) == sorted(inter_rater.index)
    for name in CLASSES:
        np.testing.assert_allclose(per_case[f"dice/{name}"], inter_rater.loc[per_case.index, f"dice/{name}"],
                                   atol=1e-6)


def test_cases_table_ranks_disagreement_from_numpy(phantoms, written):
    table = _csv(written, "cases.csv").set_index("case_id")
    for case_id, (_, maps, _) in _raters(phantoms).items():
        per_class = [np.nanmean([_dice(maps[a] == c, maps[b] == c) for a, b in itertools.combinations(range(3), 2)])
                     for c in (1, 2)]
        foreground = (maps > 0).any(0)
        split = foreground & ~(maps == maps[0]).all(0)
        assert table.loc[case_id, "agreement"] == pytest.approx(np.mean(per_class), abs=1e-6)
        assert table.loc[case_id, "disagreement"] == pytest.approx(1 - np.mean(per_class), abs=1e-6)
        assert table.loc[case_id, "disagreeing_fraction"] == pytest.approx(split.sum() / foreground.sum())
        assert table.loc[case_id, "foreground_voxels"] == foreground.sum()
    ranked = table.sort_values("rank")
    assert list(ranked["rank"]) == [1, 2, 3, 4]
    assert ranked["disagreement"].is_monotonic_decreasing


def test_hd95_dice_and_absent_classes_on_a_hand_made_pair():
    shape, spacing = (20, 18, 16), (0.8, 1.1, 2.5)
    a, b = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    a[3:10, 4:12, 3:9] = 1
    b[5:11, 4:13, 4:9] = 1
    a[13:17, 3:7, 10:13] = 2
    b[12:17, 4:9, 11:14] = 2
    b[2, 15, 13] = 2  # a stray voxel of rater b stretches the surface distances
    a[14:16, 12:15, 4:6] = 3  # only rater a marks class 3
    pairs, staple, row = case_agreement(torch.from_numpy(np.stack([a, b])), ["a", "b"], case_id="x",
                                        class_names=["bg", "one", "two", "three", "four"], spacing=spacing)
    by_class = {p["class"]: p for p in pairs}
    for c, name in ((1, "one"), (2, "two")):
        assert by_class[name]["dice"] == pytest.approx(_dice(a == c, b == c), abs=1e-6)
        assert by_class[name]["hd95"] == pytest.approx(_hd95(a == c, b == c, spacing), rel=1e-4)
    assert by_class["three"]["dice"] == 0.0 and np.isnan(by_class["three"]["hd95"])  # marked by one rater only
    assert np.isnan(by_class["four"]["dice"]) and np.isnan(by_class["four"]["hd95"])  # marked by neither
    assert row["agreement"] == pytest.approx(np.mean([_dice(a == 1, b == 1), _dice(a == 2, b == 2), 0.0]), abs=1e-6)
    assert all(np.isnan(s["sensitivity"]) for s in staple if s["class"] == "four")


def test_staple_sensitivity_of_an_under_segmenting_rater():
    truth = np.zeros((16, 16, 16), dtype=np.int64)
    truth[3:13, 3:13, 3:13] = 1
    eroded = ndimage.binary_erosion(truth, iterations=2).astype(np.int64)
    raters = torch.from_numpy(np.stack([truth, truth, eroded]))
    _, staple, _ = case_agreement(raters, ["a", "b", "c"], case_id="x", class_names=["bg", "fg"], spacing=(1, 1, 1))
    by_rater = {s["rater"]: s for s in staple}
    assert by_rater["c"]["sensitivity"] == pytest.approx(eroded.sum() / truth.sum(), abs=0.02)
    for rater in "abc":
        assert by_rater[rater]["specificity"] == pytest.approx(1.0, abs=0.02)
    assert by_rater["a"]["sensitivity"] == pytest.approx(1.0, abs=0.02)


def _rater_rule_holds(report) -> None:
    """raters.csv's mean Dice and leave-one-out Dice are the means of the pairwise table's rows and pairs."""
    pairs, table = _csv(report, "pairwise_dice.csv"), _csv(report, "raters.csv")
    for _, row in table.iterrows():
        of_class = pairs[pairs["class"] == row["class"]]
        mine = of_class[of_class["rater_a"] == row["rater"]]["value"].mean()
        others = of_class[(of_class["rater_a"] != row["rater"]) & (of_class["rater_b"] != row["rater"])]
        assert row["mean_dice"] == pytest.approx(mine)
        assert row["others_dice"] == pytest.approx(others["value"].mean())
        flagged = (1 - mine) >= 2 * (1 - others["value"].mean()) and others["value"].mean() - mine >= 0.05
        assert bool(row["outlier"]) == flagged


def test_untouched_phantoms_have_no_outlier(written):
    _rater_rule_holds(written)
    assert not _csv(written, "raters.csv")["outlier"].any()
    lines = written.files["raters.md"].read_text(encoding="utf-8").splitlines()
    assert lines[2].startswith("No rater is an outlier") and written.sentence == lines[2]
    assert "**Outlier rule**" in "\n".join(lines)


def test_a_shifted_rater_is_flagged_by_name(tmp_path):
    manifest = make_phantom_dataset(tmp_path / "data", cases=4, raters=3, shape=(24, 24, 24), seed=0, folds=2)
    frame = read_manifest(manifest).frame
    for path in frame[frame["rater"].astype(str) == "2"]["label"]:  # the middle rater, not an extreme one
        image = nib.load(path)
        shifted = np.roll(np.asarray(image.dataobj), 3, axis=0)
        nib.save(nib.Nifti1Image(shifted.astype(np.uint8), image.affine), path)
    assert main(["raters", "--manifest", str(manifest), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "raters.csv", dtype={"rater": str})
    assert set(table.loc[table["outlier"], "rater"]) == {"2"}
    lead = (tmp_path / "out" / "raters.md").read_text(encoding="utf-8").splitlines()[2]
    assert lead.startswith("Rater 2 is an outlier: on organ its mean Dice with the other raters is ")


def test_two_raters_cannot_single_one_out(tmp_path):
    manifest = make_phantom_dataset(tmp_path / "data", cases=2, raters=2, shape=(12, 12, 12), seed=1, folds=2)
    report = write_rater_report(manifest, tmp_path / "out")
    assert report.sentence.startswith("No rater can be singled out: an outlier needs at least 3 raters")
    assert not _csv(report, "raters.csv")["outlier"].any()


def test_figures_plot_the_numbers_of_the_tables(written):
    pairs, table, cases = (_csv(written, n) for n in ("pairwise_dice.csv", "raters.csv", "cases.csv"))
    raters = list(dict.fromkeys(table["rater"]))
    heat_maps = [ax for ax in written.figures["pairwise_dice.png"].axes if ax.images]
    assert [ax.get_title() for ax in heat_maps] == [f"{name}: pairwise Dice" for name in CLASSES]
    for ax, name in zip(heat_maps, CLASSES):
        expected = pairs[pairs["class"] == name].pivot(index="rater_a", columns="rater_b", values="value")
        expected = expected.reindex(index=raters, columns=raters).to_numpy()
        np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan), expected, atol=1e-12)
    bar_axes = written.figures["raters.png"].axes
    for ax, name in zip(bar_axes, CLASSES):
        assert ax.get_title() == name
        rows = table[table["class"] == name].set_index("rater").loc[raters]
        for container, (column, label, _) in zip(ax.containers, RATER_BARS):
            assert container.get_label() == label
            np.testing.assert_allclose([bar.get_height() for bar in container], rows[column], atol=1e-12)
    (histogram,) = written.figures["case_agreement.png"].axes
    counts, _ = np.histogram(cases["agreement"].dropna(), bins=AGREEMENT_BINS)
    np.testing.assert_array_equal([bar.get_height() for bar in histogram.patches], counts)
    for name in ("pairwise_dice.png", "raters.png", "case_agreement.png"):
        assert matplotlib.image.imread(written.files[name]).ndim == 3


def test_cli_writes_every_file_and_workers_change_nothing(phantoms, written, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "medjdt.cli", "raters", "--manifest", str(phantoms), "--out",
                           str(out), "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert done.stdout.splitlines()[0] == written.sentence
    for name in ("pairwise_dice.csv", "pairwise_hd95.csv", "raters.csv", "cases.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(written.files[name]))


PROBE = (
    "import sys\nfrom medjdt.cli import main\n"
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "heavy = [m for m in ('torch', 'monai', 'pandas', 'nibabel', 'matplotlib') if m in sys.modules]\n"
    "print('HEAVY', heavy, code)\n"
)


@pytest.mark.parametrize(
    "args, code",
    [(["raters", "--help"], 0), (["raters", "--manifest", "none.csv", "--out", "out"], 2),
     (["raters", "--manifest", "m.csv", "--out", "taken"], 2),
     (["raters", "--manifest", "m.csv", "--out", "out", "--workers", "0"], 2)],
)
def test_help_and_errors_answer_in_one_line_before_torch_writing_nothing(tmp_path, args, code):
    (tmp_path / "m.csv").write_text("case_id,image,label,rater,fold\n")
    (tmp_path / "taken").write_text("a file")
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)
    assert f"HEAVY [] {code}" in done.stdout, done.stdout + done.stderr
    if code:
        assert done.stderr.count("\n") == 1 and "medjdt raters: error: " in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "taken"]
    assert (tmp_path / "taken").read_text() == "a file"

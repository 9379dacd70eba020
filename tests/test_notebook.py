"""``notebooks/calibration_analysis.ipynb`` runs headless against a tiny sweep and is committed without outputs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from medjdt.cli import main
from medjdt.data import make_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "calibration_analysis.ipynb"
TINY_NET = (
    '{"class_path": "UNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, '
    '"channels": [4, 8], "strides": [2], "num_res_units": 0}}'
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """Two fusion methods, one seed, one epoch of a tiny network on tiny phantoms; returns the sweep folder."""
    root = tmp_path_factory.mktemp("sweep")
    manifest = make_phantom_dataset(root / "phantoms", cases=6, raters=3, shape=(16, 16, 16), dims=3, seed=0, folds=3)
    overrides = [
        "--data.manifest", str(manifest), "--data.demo", "null", "--data.num_folds", "3",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.samples_per_volume", "1", "--model.network", TINY_NET, "--model.sw_batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    out = root / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["sweep", "--config", str(ROOT / "configs" / "demo.yaml"), "--fusion", "mean", "staple",
                     "--seeds", "0", "--out", str(out), "--", *overrides])
    assert code == 0, printed.getvalue()
    return out


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    first = notebook.cells[0]
    assert first.cell_type == "code" and first.source.lstrip("# \n").count("RUNS_DIR =") == 1
    assert "parameters" in first.metadata.get("tags", [])


def test_notebook_runs_headless_against_a_sweep(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells[0].source = f"RUNS_DIR = {str(tiny_sweep)!r}"
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any cell error
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for o in notebook.cells[2].outputs if o.output_type == "stream")
    assert printed.startswith("2 runs") and "mean-seed0" in printed and "staple-seed0" in printed
    # The last cell's table: model error and rater disagreement per fusion method.
    table = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "fraction_within" in table and "staple" in table

"""A short real training run of the demo config, end to end: phantoms, caching, training, validation.

Runs ``medjdt fit --config configs/demo.yaml`` (with ``--epochs`` epochs, validating at the last one) in a
scratch folder and prints one JSON line: wall time of the whole command, time per training epoch (from the
Lightning callbacks, the first epoch left out: it also fills the cache), peak GPU memory (CUDA), and the final
validation Dice, soft Dice, ECE and Brier score. Extra arguments after ``--`` go to ``medjdt fit`` unchanged.

    python benchmarks/bench_fit.py --epochs 10                  # GPU: the demo config as it is
    python benchmarks/bench_fit.py --epochs 2 --tiny            # CPU dry run: 8 small phantoms
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch

from medjdt.cli import main as medjdt_main

ROOT = Path(__file__).resolve().parents[1]


class _EpochTimer(pl.Callback):
    """Wall time and number of training batches of every training epoch (collected in a class attribute,
    because the LightningCLI instantiates the callback itself)."""

    epochs: list[tuple[float, int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _EpochTimer.epochs.append((time.perf_counter() - self._start, self._batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="8 phantoms of 24^3, 16^3 patches (CPU dry run)")
    parser.add_argument("--workers", type=int, default=4)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        demo = {"cases": 8, "raters": 3, "shape": [24, 24, 24], "dims": 3, "seed": 0} if args.tiny else None
        argv = [
            "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--data.manifest", str(scratch / "demo_data" / "manifest.csv"),
            "--data.num_workers", str(args.workers),
            "--trainer.max_epochs", str(args.epochs), "--trainer.check_val_every_n_epoch", str(args.epochs),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", '{"class_path": "pytorch_lightning.loggers.CSVLogger", '
            f'"init_args": {{"save_dir": "{scratch / "runs"}", "name": "fit"}}}}',
            "--trainer.callbacks+", "bench_fit._EpochTimer",
        ]
        if args.tiny:
            argv += ["--data.demo", json.dumps(demo), "--data.num_folds", "4", "--data.patch_size", "[16, 16, 16]"]
        argv += extra
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        code = medjdt_main(argv)
        wall = time.perf_counter() - start
        result: dict[str, object] = {"bench": "fit", "exit": code, "epochs": args.epochs, "seconds": round(wall, 2)}
        if code == 0:
            metrics = pd.read_csv(next((scratch / "runs" / "fit").glob("version_*/metrics.csv")))
            for name in ("val/dice", "val/soft_dice", "val/ece", "val/brier"):
                result[name] = round(float(metrics[name].dropna().iloc[-1]), 4)
            # the CLI imported this file as the module bench_fit, whose class collected the times
            epochs = importlib.import_module("bench_fit")._EpochTimer.epochs
            steady = epochs[1:] or epochs
            seconds = sum(t for t, _ in steady) / len(steady)
            batches = sum(n for _, n in steady) / len(steady)
            result["seconds_per_epoch"] = round(seconds, 3)
            result["batches_per_epoch"] = batches
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(json.dumps(result), flush=True)
        sys.exit(code)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the CLI imports the callback by name
    main()

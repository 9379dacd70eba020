"""Throughput of medjdt.metrics next to MONAI and torchmetrics, in one process.

Input: one (2, 3, 96, 96, 96) batch of softmax probabilities with hard labels (B, 96, 96, 96), as a validation
step has them. Rows:

1. The issue's target. medjdt ``expected_calibration_error(kind="classwise")`` + ``brier_score`` + ``dice``
   (each validating its inputs) against MONAI's pipeline from the same inputs: ``one_hot`` of the labels,
   ``argmax`` + ``one_hot`` of the prediction (what ``AsDiscrete(argmax=True, to_onehot=C)`` does), then
   ``CalibrationErrorMetric`` + ``DiceMetric``. MONAI has no Brier score, so medjdt does more work.
2. The same medjdt call against MONAI's two metrics alone, with the one-hot tensors prepared outside the timing
   (the part of the gap that is not the input conversion).
3. Top-label ECE against torchmetrics ``MulticlassCalibrationError`` (per image, on the (N, C) layout it needs).
4. The full streaming ``update`` of ``CalibrationMetrics`` + ``OverlapMetrics`` (every metric, all bins).

Times are the best of ``--repeats`` runs, the two sides of a row alternating, so that other jobs on a shared
machine bias neither side.

Usage: ``python benchmarks/bench_metrics.py [--device cuda] [--repeats 10]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from monai.metrics import CalibrationErrorMetric, DiceMetric
from monai.networks.utils import one_hot
from torchmetrics.classification import MulticlassCalibrationError

from medjdt.metrics import (
    CalibrationMetrics,
    OverlapMetrics,
    brier_score,
    dice,
    expected_calibration_error,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(
    first: Callable[[], object], second: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Best-of-``repeats`` wall time in seconds of two functions, run alternately after one warm-up call each."""
    best = [float("inf"), float("inf")]
    first()
    second()
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 3, 96, 96, 96], help="B C *spatial")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    num_classes = shape[1]
    probs = (torch.randn(shape, generator=generator) * 3).softmax(1).to(device)
    labels = torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=generator).to(device)
    n_voxels = probs[:, 0].numel()

    def ours() -> None:
        expected_calibration_error(probs, labels, n_bins=10, kind="classwise")
        brier_score(probs, labels)
        dice(probs, labels, include_background=True)

    monai_calibration = CalibrationErrorMetric(num_bins=10, include_background=True, metric_reduction="none")
    monai_dice = DiceMetric(include_background=True, reduction="none")

    def monai_metrics(labels_one_hot: torch.Tensor, predicted_one_hot: torch.Tensor) -> None:
        monai_calibration(probs, labels_one_hot)
        monai_dice(predicted_one_hot, labels_one_hot)
        monai_calibration.reset()
        monai_dice.reset()

    def monai_pipeline() -> None:
        labels_one_hot = one_hot(labels[:, None], num_classes, dim=1)
        predicted_one_hot = one_hot(probs.argmax(1, keepdim=True), num_classes, dim=1)
        monai_metrics(labels_one_hot, predicted_one_hot)

    prepared = (
        one_hot(labels[:, None], num_classes, dim=1),
        one_hot(probs.argmax(1, keepdim=True), num_classes, dim=1),
    )

    def ours_top_label() -> None:
        expected_calibration_error(probs, labels, n_bins=10, kind="top_label")

    torchmetrics_ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=10, norm="l1").to(device)

    def torchmetrics_top_label() -> None:
        for b in range(shape[0]):  # per image, like the medjdt value it is compared with
            torchmetrics_ece.update(probs[b].flatten(1).T, labels[b].flatten())
            torchmetrics_ece.compute()
            torchmetrics_ece.reset()

    calibration = CalibrationMetrics(num_classes).to(device)
    overlap = OverlapMetrics(num_classes).to(device)
    case_ids = [f"case{b}" for b in range(shape[0])]

    def streaming() -> None:
        calibration.update(probs, labels, case_ids)
        overlap.update(probs, labels, case_ids)

    print(f"device {device}, shape {shape}, {n_voxels / 1e6:.2f} M voxels, torch threads {torch.get_num_threads()}")
    rows = [
        ("ECE(classwise) + Brier + Dice", ours, "MONAI one-hot + CalibrationError + Dice", monai_pipeline),
        (
            "ECE(classwise) + Brier + Dice",
            ours,
            "MONAI CalibrationError + Dice alone",
            lambda: monai_metrics(*prepared),
        ),
        ("ECE(top-label)", ours_top_label, "torchmetrics MulticlassCalibrationError", torchmetrics_top_label),
    ]
    for our_name, our_fn, ref_name, ref_fn in rows:
        t_ours, t_ref = _time_pair(our_fn, ref_fn, device, args.repeats)
        print(
            f"medjdt {our_name}: {t_ours * 1e3:7.2f} ms = {n_voxels / t_ours / 1e6:7.1f} M voxels/s | "
            f"{ref_name}: {t_ref * 1e3:7.2f} ms = {n_voxels / t_ref / 1e6:7.1f} M voxels/s | "
            f"ratio {t_ref / t_ours:5.2f}x"
        )
    t_stream, _ = _time_pair(streaming, lambda: None, device, args.repeats)
    print(
        f"medjdt CalibrationMetrics.update + OverlapMetrics.update (every metric): {t_stream * 1e3:7.2f} ms = "
        f"{n_voxels / t_stream / 1e6:7.1f} M voxels/s"
    )


if __name__ == "__main__":
    main()

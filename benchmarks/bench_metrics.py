"""Throughput of medjdt.metrics next to MONAI and torchmetrics, in one process.

Input: one (2, 3, 96, 96, 96) batch of softmax probabilities with hard labels (B, 96, 96, 96), as a validation
step has them. Cases (medjdt side | reference side):

1. ``fused_ece_brier_dice``: :func:`medjdt.metrics.fused.voxel_sums` on validated inputs: in one pass over the
   voxels the top-label and classwise ECE bins, Brier and NLL sums and the Dice/IoU/soft Dice sums | MONAI's
   pipeline from the same inputs: ``one_hot`` of the labels, ``argmax`` + ``one_hot`` of the prediction (what
   ``AsDiscrete(argmax=True, to_onehot=C)`` does), then ``CalibrationErrorMetric`` + ``DiceMetric``. MONAI
   computes less (no top-label ECE, Brier, NLL, IoU...). ``fused_all``: the same plus the QUBIQ thresholded
   Dice counts (nine levels).
   ``fused_vs_reference``: ``fused_all`` | the reference functions of :mod:`medjdt.metrics.calibration` and
   :mod:`medjdt.metrics.overlap` computing the same sums one metric at a time (same work, same inputs).
2. ``combined_update``: ``SegmentationMetrics.update`` (input validation, one fused pass for calibration and
   overlap with the QUBIQ levels, per-case rows), what a validation step runs | the same MONAI pipeline.
   ``combined_vs_monai_metrics``: the same | MONAI's two metrics alone, one-hot tensors prepared outside the
   timing. ``streaming_update``: ``CalibrationMetrics.update`` + ``OverlapMetrics.update`` (validation and the
   fused pass twice) | the MONAI pipeline.
3. ``functional_reference``: the reference functions ``expected_calibration_error(kind="classwise")`` +
   ``brier_score`` + ``dice`` (each validating its inputs) | the MONAI pipeline.
4. ``top_label_ece``: medjdt ``expected_calibration_error(kind="top_label")`` | torchmetrics
   ``MulticlassCalibrationError`` (per image, on the (N, C) layout it needs).
5. CUDA only: ``fused_vs_torch_chunks``: ``fused_all`` (the Triton kernel when Triton is installed) | the same
   sums by the chunked torch code of :func:`~medjdt.metrics.fused.voxel_sums`.

Every side bins confidences into the default 15 bins (``DEFAULT_N_BINS``), the streaming objects' default.

Times are the best of ``--repeats`` runs, the two sides of a case alternating, so that other jobs on a shared
machine bias neither side; the process CPU time (best of the runs) is given too, the steadier figure on a
shared CPU with one thread.

Usage: ``python benchmarks/bench_metrics.py [--device cuda] [--repeats 10] [--threads N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from monai.metrics import CalibrationErrorMetric, DiceMetric
from monai.networks.utils import one_hot
from torchmetrics.classification import MulticlassCalibrationError

import medjdt.metrics.fused as fused_metrics
from medjdt.metrics import (
    QUBIQ_LEVELS,
    CalibrationMetrics,
    OverlapMetrics,
    SegmentationMetrics,
    brier_score,
    dice,
    expected_calibration_error,
)
from medjdt.metrics._checks import prepare_inputs
from medjdt.metrics.calibration import (
    DEFAULT_N_BINS,
    classwise_bin_sums,
    nll_sums,
    squared_error_sums,
    top_label_bin_sums,
)
from medjdt.metrics.fused import voxel_sums
from medjdt.metrics.overlap import overlap_sums


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(
    first: Callable[[], object], second: Callable[[], object], device: torch.device, repeats: int
) -> list[tuple[float, float]]:
    """Best-of-``repeats`` (wall, CPU) seconds of two functions, run alternately after one warm-up call each."""
    best = [(float("inf"), float("inf")), (float("inf"), float("inf"))]
    first()
    second()
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 3, 96, 96, 96], help="B C *spatial")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per case instead of text")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    num_classes = shape[1]
    probs = (torch.randn(shape, generator=generator) * 3).softmax(1).to(device)
    labels = torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=generator).to(device)
    n_voxels = probs[:, 0].numel()

    inputs = prepare_inputs(probs, labels, simplex=True)

    def fused_ece_brier_dice() -> None:
        voxel_sums(inputs, n_bins=DEFAULT_N_BINS, overlap=True)

    def fused_all() -> None:
        voxel_sums(inputs, n_bins=DEFAULT_N_BINS, overlap=True, levels=QUBIQ_LEVELS)

    def reference_all() -> None:
        top_label_bin_sums(inputs, DEFAULT_N_BINS)
        classwise_bin_sums(inputs, DEFAULT_N_BINS)
        squared_error_sums(inputs)
        nll_sums(inputs, 1e-7)
        overlap_sums(inputs, QUBIQ_LEVELS)

    calibration = CalibrationMetrics(num_classes).to(device)
    overlap = OverlapMetrics(num_classes).to(device)
    case_ids = [f"case{b}" for b in range(shape[0])]

    def streaming() -> None:
        calibration.update(probs, labels, case_ids)
        overlap.update(probs, labels, case_ids)

    combined = SegmentationMetrics(num_classes).to(device)

    def combined_update() -> None:
        combined.update(probs, labels, case_ids)

    def functional_reference() -> None:
        expected_calibration_error(probs, labels, n_bins=DEFAULT_N_BINS, kind="classwise")
        brier_score(probs, labels)
        dice(probs, labels, include_background=True)

    monai_calibration = CalibrationErrorMetric(
        num_bins=DEFAULT_N_BINS, include_background=True, metric_reduction="none"
    )
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
        expected_calibration_error(probs, labels, n_bins=DEFAULT_N_BINS, kind="top_label")

    torchmetrics_ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=DEFAULT_N_BINS, norm="l1").to(device)

    def torchmetrics_top_label() -> None:
        for b in range(shape[0]):  # per image, like the medjdt value it is compared with
            torchmetrics_ece.update(probs[b].flatten(1).T, labels[b].flatten())
            torchmetrics_ece.compute()
            torchmetrics_ece.reset()

    cases = [
        ("fused_ece_brier_dice", fused_ece_brier_dice, "monai_pipeline", monai_pipeline),
        ("fused_all", fused_all, "monai_pipeline", monai_pipeline),
        ("fused_vs_reference", fused_all, "reference_functions_all", reference_all),
        ("combined_update", combined_update, "monai_pipeline", monai_pipeline),
        ("combined_vs_monai_metrics", combined_update, "monai_metrics_prepared", lambda: monai_metrics(*prepared)),
        ("streaming_update", streaming, "monai_pipeline", monai_pipeline),
        ("functional_reference", functional_reference, "monai_pipeline", monai_pipeline),
        ("top_label_ece", ours_top_label, "torchmetrics", torchmetrics_top_label),
    ]
    if device.type == "cuda":
        # on CUDA the fused cases above run the Triton kernel when Triton is installed; this one shows what it
        # gains over the chunked torch code that runs without Triton
        def torch_chunks_all() -> None:
            devices, fused_metrics._TRITON_DEVICES = fused_metrics._TRITON_DEVICES, set()
            try:
                fused_all()
            finally:
                fused_metrics._TRITON_DEVICES = devices

        cases.append(("fused_vs_torch_chunks", fused_all, "voxel_sums_torch_chunks", torch_chunks_all))
    if not args.json:
        print(
            f"device {device}, shape {shape}, {n_voxels / 1e6:.2f} M voxels, torch threads {torch.get_num_threads()}"
        )
    for name, our_fn, reference_name, reference_fn in cases:
        (ours_wall, ours_cpu), (ref_wall, ref_cpu) = _time_pair(our_fn, reference_fn, device, args.repeats)
        record = {
            "bench": "metrics", "case": name, "reference": reference_name, "device": device.type,
            "shape": list(shape), "threads": torch.get_num_threads(),
            "ms": round(1e3 * ours_wall, 3), "reference_ms": round(1e3 * ref_wall, 3),
            "mvoxels_per_s": round(n_voxels / ours_wall / 1e6, 2),
            "reference_mvoxels_per_s": round(n_voxels / ref_wall / 1e6, 2),
            "speedup": round(ref_wall / ours_wall, 3),
            "cpu_ms": round(1e3 * ours_cpu, 3), "reference_cpu_ms": round(1e3 * ref_cpu, 3),
            "cpu_speedup": round(ref_cpu / ours_cpu, 3),
        }
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{name:<27} {record['ms']:8.2f} ms = {record['mvoxels_per_s']:7.1f} M voxels/s | {reference_name:<23}"
                f" {record['reference_ms']:8.2f} ms = {record['reference_mvoxels_per_s']:7.1f} M voxels/s | speedup "
                f"{record['speedup']:5.2f}x (CPU time {record['cpu_speedup']:5.2f}x)"
            )


if __name__ == "__main__":
    main()

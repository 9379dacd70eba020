"""Forward + backward of DiceSemimetricLoss (fused and reference paths) vs MONAI DiceLoss(soft_label=True).

Prints, for soft and hard targets, the median and minimum wall time and the median process CPU time (ms) of one
forward + backward, each with its ratio to MONAI, and the peak extra memory (the gradient of the logits
included), in MiB and as a multiple of the logits' size. With ``--json`` one JSON line per case instead.
The implementations run interleaved in one process, so that other load on the machine biases none of them.

Memory: ``torch.cuda.max_memory_allocated`` on CUDA. On CPU the increase of the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs``, Linux only), measured in a fresh subprocess per case with
glibc's mmap threshold fixed at 64 KiB so that freed tensors are returned to the system at once. The timing
process keeps glibc's default allocator behaviour: with the fixed threshold every allocation of a chunk-sized
buffer would page-fault, which a training process does not see.

    python benchmarks/bench_loss.py [--shape 2 3 64 64 64] [--repeats 20] [--device cpu|cuda] [--threads N]
                                    [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from monai.losses import DiceLoss

from medjdt.losses import DiceSemimetricLoss
from medjdt.losses.fused import _TRITON_DEVICES
from medjdt.losses.fused_triton import triton_available

_M_MMAP_THRESHOLD = -3
IMPLEMENTATIONS = ("fused", "reference", "monai")


def _fix_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 64 KiB by mmap, so that RSS follows live tensors."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 16))
    except OSError:
        return False


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(shape: tuple[int, ...], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_()
    soft = torch.softmax(3 * torch.randn(shape, generator=generator), dim=1).to(device)
    labels = torch.randint(0, channels, (batch, *spatial), generator=generator).to(device)
    return {"logits": logits, "soft": soft, "hard": labels}


def _cases(data: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[Callable, torch.Tensor]]]:
    """{target kind: {implementation: (loss function, target)}}, all computing the same value."""
    fused = DiceSemimetricLoss(aggregation="dataset")
    reference = DiceSemimetricLoss(aggregation="dataset", fused=False)
    # same quantity as ours: dataset (batch=True) aggregation, smoothing 2s on MONAI's doubled numerator
    monai_soft = DiceLoss(softmax=True, soft_label=True, batch=True, smooth_nr=2.0, smooth_dr=2.0)
    monai_hard = DiceLoss(softmax=True, to_onehot_y=True, soft_label=True, batch=True, smooth_nr=2.0, smooth_dr=2.0)
    soft, labels = data["soft"], data["hard"]
    return {
        "soft": {"fused": (fused, soft), "reference": (reference, soft), "monai": (monai_soft, soft)},
        "hard": {"fused": (fused, labels), "reference": (reference, labels), "monai": (monai_hard, labels[:, None])},
    }


def _step(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> None:
    logits.grad = None
    loss_fn(logits, target).backward()


def _peak_extra_mib(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> float:
    """Peak memory above the level before the step, in MiB (the gradient of the logits included)."""
    device = logits.device
    logits.grad = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(loss_fn, logits, target)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _reset_peak_rss()
    before = _peak_rss_kib()
    _step(loss_fn, logits, target)
    return (_peak_rss_kib() - before) / 1024


def _cpu_peak_in_subprocess(args: argparse.Namespace, target_kind: str, impl: str) -> float:
    """Run :func:`_peak_extra_mib` for one case in a fresh interpreter with the mmap threshold fixed."""
    command = [sys.executable, __file__, "--memory-case", target_kind, impl, "--shape", *map(str, args.shape)]
    command += ["--seed", str(args.seed), "--device", "cpu", "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def _time_all(cases: dict[str, tuple[Callable, torch.Tensor]], logits: torch.Tensor, repeats: int) -> dict:
    """Per case: median and minimum wall time and median process CPU time of forward+backward, in ms.

    The cases run interleaved so that all see the same machine load. On a shared CPU the CPU time (with one
    thread) is the steadiest estimate: it leaves out the time the process waited for a core.
    """
    for loss_fn, target in cases.values():  # warm-up
        for _ in range(3):
            _step(loss_fn, logits, target)
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (loss_fn, target) in cases.items():
            _sync(logits.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(loss_fn, logits, target)
            _sync(logits.device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_ms": 1000 * statistics.median(wall[name]),
            "min_ms": 1000 * min(wall[name]),
            "cpu_median_ms": 1000 * statistics.median(cpu[name]),
        }
        for name in cases
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 3, 64, 64, 64], help="B C *spatial")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per case instead of a table")
    parser.add_argument("--memory-case", nargs=2, metavar=("TARGET", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(args.shape)

    if args.memory_case:  # child process of _cpu_peak_in_subprocess
        if not _fix_mmap_threshold():
            raise RuntimeError("cannot set glibc's mmap threshold")
        data = _inputs(shape, device, args.seed)
        loss_fn, target = _cases(data)[args.memory_case[0]][args.memory_case[1]]
        _step(loss_fn, data["logits"], target)  # warm-up: lazy initialisation is not the loss's memory
        print(_peak_extra_mib(loss_fn, data["logits"], target))
        return 0

    data = _inputs(shape, device, args.seed)
    logits = data["logits"]
    logits_mib = logits.numel() * logits.element_size() / 2**20
    measure_rss = device.type == "cuda" or sys.platform.startswith("linux")
    if not args.json:
        print(
            f"forward+backward, shape {shape}, device {device}, {torch.get_num_threads()} threads, "
            f"median of {args.repeats}; logits {logits_mib:.1f} MiB"
        )
        memory_note = "CUDA max allocated" if device.type == "cuda" else "peak RSS increase, subprocess"
        print(
            f"{'target':<6} {'impl':<10} {'median ms':>10} {'vs monai':>9} {'min ms':>8} {'vs monai':>9} "
            f"{'cpu ms':>8} {'vs monai':>9} {'peak MiB':>9} {'x logits':>9}   ({memory_note})"
        )
    for target_kind, cases in _cases(data).items():
        with torch.no_grad():
            values = {impl: float(fn(logits, target)) for impl, (fn, target) in cases.items()}
        if max(values.values()) - min(values.values()) > 1e-4:
            raise RuntimeError(f"{target_kind}: the implementations disagree: {values}")
        times = _time_all(cases, logits, args.repeats)
        for impl, (loss_fn, target) in cases.items():
            if not measure_rss:
                memory = float("nan")
            elif device.type == "cuda":
                memory = _peak_extra_mib(loss_fn, logits, target)
            else:
                memory = _cpu_peak_in_subprocess(args, target_kind, impl)
            record = {
                "bench": "loss", "target": target_kind, "impl": impl, "device": device.type, "shape": list(shape),
                "threads": torch.get_num_threads(), **{key: round(value, 4) for key, value in times[impl].items()},
            }
            if impl == "fused":
                record["kernels"] = "triton" if device.type in _TRITON_DEVICES and triton_available() else "torch"
            for key in ("median_ms", "min_ms", "cpu_median_ms"):
                record[key.replace("_ms", "_vs_monai")] = round(times[impl][key] / times["monai"][key], 4)
            record["peak_mib"] = round(memory, 2)
            record["peak_x_logits"] = round(memory / logits_mib, 3)
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(
                    f"{target_kind:<6} {impl:<10} {record['median_ms']:>10.3f} {record['median_vs_monai']:>9.2f} "
                    f"{record['min_ms']:>8.3f} {record['min_vs_monai']:>9.2f} {record['cpu_median_ms']:>8.3f} "
                    f"{record['cpu_median_vs_monai']:>9.2f} {memory:>9.1f} {memory / logits_mib:>9.2f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

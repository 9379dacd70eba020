"""Forward + backward of DiceSemimetricLoss vs MONAI DiceLoss(soft_label=True), side by side in one process.

Prints, for soft and hard targets, the median time (ms), the time ratio medjdt / MONAI and the peak extra
memory during one forward + backward. Memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
increase of the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc's
mmap threshold fixed at 64 KiB so that freed tensors are returned to the system at once (Linux only).

    python benchmarks/bench_loss.py [--shape 2 3 64 64 64] [--repeats 20] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable

import torch
from monai.losses import DiceLoss

from medjdt.losses import DiceSemimetricLoss

_M_MMAP_THRESHOLD = -3


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


def _step(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> None:
    logits.grad = None
    loss_fn(logits, target).backward()


def _peak_extra_mib(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> float:
    """Peak memory above the level before the step, in MiB."""
    device = logits.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(loss_fn, logits, target)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    logits.grad = None
    _reset_peak_rss()
    before = _peak_rss_kib()
    _step(loss_fn, logits, target)
    return (_peak_rss_kib() - before) / 1024


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def _time_pair(cases: dict[str, tuple[Callable, torch.Tensor]], logits: torch.Tensor, repeats: int) -> dict:
    """Median forward+backward time per case, the cases interleaved so both see the same machine load."""
    for loss_fn, target in cases.values():  # warm-up
        for _ in range(3):
            _step(loss_fn, logits, target)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (loss_fn, target) in cases.items():
            _sync(logits.device)
            start = time.perf_counter()
            _step(loss_fn, logits, target)
            _sync(logits.device)
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 3, 64, 64, 64], help="B C *spatial")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    rss_ok = device.type == "cuda" or (_fix_mmap_threshold() and sys.platform.startswith("linux"))
    generator = torch.Generator().manual_seed(args.seed)
    shape = tuple(args.shape)
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_()
    soft = torch.softmax(3 * torch.randn(shape, generator=generator), dim=1).to(device)
    labels = torch.randint(0, channels, (batch, *spatial), generator=generator).to(device)

    ours = DiceSemimetricLoss(reduction="dataset")
    # same quantity as ours: dataset (batch=True) reduction, smoothing 2s on MONAI's doubled numerator
    monai_soft = DiceLoss(softmax=True, soft_label=True, batch=True, smooth_nr=2.0, smooth_dr=2.0)
    monai_hard = DiceLoss(softmax=True, to_onehot_y=True, soft_label=True, batch=True, smooth_nr=2.0, smooth_dr=2.0)
    experiments = {
        "soft": {"medjdt": (ours, soft), "monai": (monai_soft, soft)},
        "hard": {"medjdt": (ours, labels), "monai": (monai_hard, labels.unsqueeze(1))},
    }

    print(
        f"forward+backward, shape {shape}, device {device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    memory_note = "CUDA max allocated" if device.type == "cuda" else "peak RSS increase"
    print(f"{'target':<6} {'impl':<7} {'time ms':>9} {'ratio':>7} {'peak MiB':>9}   ({memory_note})")
    for target_kind, cases in experiments.items():
        with torch.no_grad():
            values = [float(fn(logits, target)) for fn, target in cases.values()]
        if abs(values[0] - values[1]) > 1e-4:
            raise RuntimeError(f"{target_kind}: medjdt {values[0]} and MONAI {values[1]} disagree")
        times = _time_pair(cases, logits, args.repeats)
        for impl, (loss_fn, target) in cases.items():
            memory = _peak_extra_mib(loss_fn, logits, target) if rss_ok else float("nan")
            ratio = times[impl] / times["monai"]
            print(f"{target_kind:<6} {impl:<7} {times[impl]:>9.2f} {ratio:>7.2f} {memory:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

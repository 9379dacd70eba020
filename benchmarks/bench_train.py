"""One training step of ``SegmentationModule`` (inside a Lightning Trainer) vs a bare PyTorch + MONAI loop.

Same network (MONAI UNet), loss (CE + DML), optimiser (AdamW + per-step LambdaLR), batch and device; the
per-step wall time is the median over the timed steps (after warm-up). Prints one JSON line per case with the
overhead of medjdt/Lightning over the bare loop (target <= 5 %).

    python benchmarks/bench_train.py                 # CPU: 64^3, batch 2
    python benchmarks/bench_train.py --size 128      # GPU: 128^3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from medjdt.losses import DiceSemimetricLoss, SegmentationLoss
from medjdt.models import SegmentationModule, build_network
from medjdt.models.schedules import lr_factor


class _FixedBatches(Dataset):
    def __init__(self, image: torch.Tensor, label: torch.Tensor, n: int) -> None:
        self.image, self.label, self.n = image, label, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image, "label": self.label}


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self._sync(pl_module)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t)


def _network_spec(size_channels: list[int]) -> dict:
    return {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": size_channels,
            "strides": [2] * (len(size_channels) - 1), "num_res_units": 1,
        },
    }


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, size, size, size, generator=g)
    label = torch.softmax(torch.randn(3, size, size, size, generator=g) * 3, dim=0)
    return image, label


def bench_lightning(spec: dict, image, label, batch: int, steps: int, warmup: int, accelerator: str, precision: str):
    module = SegmentationModule(network=spec, roi_size=list(image.shape[1:]))
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_steps=steps + warmup, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
        precision=precision,
    )
    loader = DataLoader(_FixedBatches(image, label, (steps + warmup) * batch), batch_size=batch)
    trainer.fit(module, loader)
    return timer.times[warmup:]


def bench_bare(spec: dict, image, label, batch: int, steps: int, warmup: int, device: torch.device, precision: str):
    net = build_network(spec).to(device).train()
    loss_fn = SegmentationLoss(0.25, 0.75, DiceSemimetricLoss())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    total = steps + warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, int(0.05 * total), "poly"))
    loader = DataLoader(_FixedBatches(image, label, total * batch), batch_size=batch)
    autocast = precision.startswith("bf16") or precision.startswith("16")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    times = []
    for b in loader:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x, y = b["image"].to(device), b["label"].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = net(x)
        loss, _ = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="cubic patch size (default 64 CPU, 128 GPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--precision", default=None, help="Lightning precision (default 32 CPU, bf16-mixed GPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (128 if cuda else 64)
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    spec = _network_spec(args.channels)
    image, label = _batch(args.batch, size, device)
    torch.manual_seed(0)
    bare = bench_bare(spec, image, label, args.batch, args.steps, args.warmup, device, precision)
    torch.manual_seed(0)
    light = bench_lightning(spec, image, label, args.batch, args.steps, args.warmup, "gpu" if cuda else "cpu",
                            precision)
    t_bare, t_light = statistics.median(bare), statistics.median(light)
    print(json.dumps({
        "bench": "train_step", "device": device.type, "shape": [args.batch, 1, size, size, size],
        "precision": precision, "bare_ms": round(1e3 * t_bare, 2), "medjdt_ms": round(1e3 * t_light, 2),
        "overhead_pct": round(100 * (t_light / t_bare - 1), 2), "steps": len(light),
    }))


if __name__ == "__main__":
    main()

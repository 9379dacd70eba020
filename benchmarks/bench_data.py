"""Data loading: cold (NIfTI decode + MONAI preprocessing) vs cached load per case, and training-loader throughput.

Cold load is MONAI's reader and transforms (what every epoch would cost without the cache); cached load is
medjdt's on-disk cache, side by side with MONAI's ``PersistentDataset`` caching the same deterministic
chain (load, channel first, orientation, CT window) for the phantoms. Throughput is
``SegmentationDataModule.train_dataloader()`` with 96^3 patches, ``samples_per_volume`` 2, augmentation
and fusion on, from a warm cache, after one warm-up batch; it is measured with ``--workers`` worker
processes and, to show what one worker delivers on one core, in the main process with one thread
(``patches_per_cpu_s`` does not depend on what else runs), for ``mean`` fusion (per patch) and ``staple``
(once per whole case, cached). For ``staple`` it also reports the one-off cost per case (STAPLE on the whole
preprocessed case, paid on its first load) and, for comparison, STAPLE on one 96^3 rater patch: the cost that
fusing per patch would add to every patch of every epoch. Prints one JSON line per measurement, with the
machine's load average (other processes compete for the same cores). The real KiTS23 cases (labels from
``../shared/realdata``, CT synthesised on their grid) are included when that folder exists.

    python benchmarks/bench_data.py                          # phantoms 128x128x112, 2 workers
    python benchmarks/bench_data.py --workers 8 --batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

from medjdt.data import (
    CaseFusedTargets,
    PreprocessedCases,
    PreprocessSettings,
    SegmentationDataModule,
    build_manifest,
    make_phantom_dataset,
    read_manifest,
    write_nifti,
)
from medjdt.labels import fuse

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "kits23" / "dataset"


def _load_times(manifest: Path, settings: PreprocessSettings, cache_dir: Path, cases: int) -> dict:
    m = read_manifest(manifest)
    records = m.cases()[:cases]
    cold, cached = [], []
    for record in records:
        loader = PreprocessedCases(m.num_classes, m.spatial_dims, settings, cache_dir)
        t = time.perf_counter()
        case = loader(record)
        cold.append(time.perf_counter() - t)
        loader = PreprocessedCases(m.num_classes, m.spatial_dims, settings, cache_dir)
        t = time.perf_counter()
        loader(record)
        cached.append(time.perf_counter() - t)
        assert loader.hits == 1
    cold_s, cached_s = statistics.median(cold), statistics.median(cached)
    return {
        "cases": len(records),
        "preprocessed_shape": list(case["image"].shape),
        "raters": int(case["raters"].shape[0]),
        "cold_load_s_per_case": round(cold_s, 4),
        "cached_load_s_per_case": round(cached_s, 4),
        "cold_over_cached": round(cold_s / cached_s, 1),
    }


def _monai_persistent_times(manifest: Path, cache_dir: Path, cases: int) -> dict:
    records = read_manifest(manifest).cases()[:cases]
    items = [{"image": str(r.image), "raters": [str(p) for p in r.labels]} for r in records]
    chain = Compose([
        LoadImaged(keys=["image", "raters"], image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys=["image", "raters"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ScaleIntensityRanged(keys="image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True),
    ])
    dataset = PersistentDataset(items, transform=chain, cache_dir=cache_dir)
    cold, cached = [], []
    for i in range(len(items)):
        t = time.perf_counter()
        dataset[i]
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        dataset[i]
        cached.append(time.perf_counter() - t)
    return {"monai_persistent_cold_s_per_case": round(statistics.median(cold), 4),
            "monai_persistent_cached_s_per_case": round(statistics.median(cached), 4)}


def _throughput(manifest: Path, cache_dir: Path, workers: int, batches: int, spacing, window, fusion: str) -> dict:
    dm = SegmentationDataModule(
        manifest=str(manifest), fold=0, num_folds=read_manifest(manifest).num_folds, fusion=fusion,
        patch_size=[96, 96, 96], samples_per_volume=2, batch_size=2, num_workers=workers, cache_dir=str(cache_dir),
        spacing=spacing, window=window, augment=True, seed=0,
    )
    dm.setup("fit")
    for record in dm.datasets["train"].data:  # warm the cache so that only the cached path is timed
        dm.datasets["train"].load(record)
    loader = dm.train_dataloader()
    patches, timed = 0, 0
    it = iter(loader)
    next(it)  # warm-up: worker start
    t, cpu = time.perf_counter(), time.process_time()
    while timed < batches:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        patches += batch["image"].shape[0]
        timed += 1
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    out = {"fusion": fusion, "workers": workers, "patch": [96, 96, 96], "patches": patches,
           "seconds": round(elapsed, 2), "patches_per_s": round(patches / elapsed, 1),
           "ms_per_batch_of_4": round(1000 * elapsed / timed, 1)}
    if workers == 0:  # all work is in this process: CPU time is what the loader costs, whatever else runs
        out["patches_per_cpu_s"] = round(patches / cpu, 1)
    return out


def _staple_costs(manifest: Path, settings: PreprocessSettings, cache_dir: Path, patches: int) -> dict:
    """Whole-case STAPLE per case (first load, preprocessed case already cached) vs STAPLE on one 96^3 patch."""
    m = read_manifest(manifest)
    cases = PreprocessedCases(m.num_classes, m.spatial_dims, settings, cache_dir)
    whole, per_patch = [], []
    rng = np.random.default_rng(0)
    for record in m.cases():
        raters = cases(record)["raters"]
        t = time.perf_counter()
        CaseFusedTargets(cases, "staple", cache_dir=None)(record)
        whole.append(time.perf_counter() - t)
        for _ in range(max(1, patches // len(m.cases()))):
            start = [int(rng.integers(0, s - 96 + 1)) for s in raters.shape[1:]]
            crop = raters[(slice(None), *(slice(o, o + 96) for o in start))]
            t = time.perf_counter()
            fuse(crop, "staple", m.num_classes)
            per_patch.append(time.perf_counter() - t)
    return {"whole_case_staple_s_per_case": round(statistics.median(whole), 3),
            "staple_ms_per_96_patch": round(1000 * statistics.median(per_patch), 1)}


def _real_kits_manifest(work: Path) -> Path | None:
    if not REALDATA.is_dir():
        return None
    for real_case in sorted(REALDATA.iterdir()):
        case_dir = work / "kits23" / real_case.name
        case_dir.mkdir(parents=True)
        (case_dir / "instances").symlink_to(real_case / "instances", target_is_directory=True)
        seg = nib.load(real_case / "segmentation.nii.gz")
        ct = np.random.default_rng(0).normal(40, 40, size=seg.shape).astype(np.int16)
        write_nifti(ct, seg.affine, case_dir / "imaging.nii.gz")
    return build_manifest("kits23", work / "kits23", work / "kits23.csv", folds=2)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 112])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = make_phantom_dataset(work / "phantoms", cases=args.cases, raters=3, shape=args.shape, folds=2)
        load = _load_times(manifest, PreprocessSettings(), work / "cache", args.cases)
        load.update(_monai_persistent_times(manifest, work / "monai_cache", args.cases))
        load["monai_over_medjdt_cached"] = round(
            load["monai_persistent_cached_s_per_case"] / load["cached_load_s_per_case"], 2)
        print(json.dumps({"bench": "load", "data": f"phantom {args.shape}", **load}), flush=True)
        data = {"data": f"phantom {args.shape}"}
        for fusion in ("mean", "staple"):
            data["load_avg_1min"] = round(os.getloadavg()[0], 2)
            rate = _throughput(manifest, work / "cache", args.workers, args.batches, None, (-200, 300), fusion)
            print(json.dumps({"bench": "train_loader", **data, **rate}), flush=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for fusion in ("mean", "staple"):
            data["load_avg_1min"] = round(os.getloadavg()[0], 2)
            rate = _throughput(manifest, work / "cache", 0, args.batches // 2, None, (-200, 300), fusion)
            print(json.dumps({"bench": "train_loader_one_core", **data, **rate}), flush=True)
        costs = _staple_costs(manifest, PreprocessSettings(), work / "cache", 8)
        print(json.dumps({"bench": "staple_cost_one_core", **data, **costs}), flush=True)
        torch.set_num_threads(threads)

        kits = _real_kits_manifest(work)
        if kits is not None:
            settings = PreprocessSettings(spacing=(0.78, 0.78, 3.0))
            load = _load_times(kits, settings, work / "cache", 2)
            print(json.dumps({"bench": "load", "data": "KiTS23 real labels, spacing 0.78x0.78x3", **load}), flush=True)


if __name__ == "__main__":
    main()

"""The ``medjdt plan`` subcommand (argparse), registered in :mod:`medjdt.cli`.

:data:`COMMANDS` maps the name to ``(help, add_arguments, run)``. Paths are checked before anything heavy is
imported; the cases are read (nibabel, torch, MONAI) inside ``run``, and only when the fingerprint in the output
folder does not already belong to the manifest.
"""

from __future__ import annotations

import argparse
import os

from medjdt._paths import existing_file, writable_folder
from medjdt.validation import check_number

PLAN_HELP = "fingerprint a dataset and write a training config that fits a memory budget (plan.yaml, plan.md)"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt plan``."""
    parser.add_argument("--manifest", required=True, help="manifest CSV (its metadata JSON beside it)")
    parser.add_argument("--out", required=True, help="folder for fingerprint.csv/.json, plan.yaml and plan.md")
    parser.add_argument("--memory-gb", type=float, default=24.0, help="GPU memory to plan for, in GiB (default 24)")
    parser.add_argument("--cpu", action="store_true", help="plan a short fp32 run on a small CPU instead of a GPU")
    parser.add_argument(
        "--workers", type=int, default=None, help="cases read at once (default: the CPU cores, at most 4)"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="training epochs (default 500 GPU, 40 CPU)")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="read every case again even when the fingerprint in --out matches the manifest",
    )


def run_plan(args: argparse.Namespace) -> int:
    """Fingerprint (or reuse the fingerprint), plan, write, and print where and a short summary."""
    manifest = existing_file(args.manifest, "manifest (--manifest)")
    out = writable_folder(args.out, "output folder (--out)", create=False)
    check_number("--memory-gb", args.memory_gb, low=0, low_inclusive=False)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    check_number("--workers", workers, low=1, integer=True)
    if args.max_epochs is not None:
        check_number("--max-epochs", args.max_epochs, low=1, integer=True)
    from medjdt.planning.fingerprint import make_fingerprint
    from medjdt.planning.plan import make_plan
    from medjdt.planning.writer import write_plan

    writable_folder(out, "output folder (--out)")
    fp = make_fingerprint(manifest, out, workers=workers, refresh=args.refresh)
    how = "reused (manifest unchanged)" if fp.reused else f"read {fp.summary['cases']} case(s)"
    print(f"fingerprint: {how}: {out / 'fingerprint.csv'}, {out / 'fingerprint.json'}")
    plan = make_plan(fp, memory_gb=args.memory_gb, cpu=args.cpu, max_epochs=args.max_epochs)
    yaml_path, md_path = write_plan(plan, fp, out)
    data, net = plan.config["data"], plan.config["model"]["network"]["init_args"]
    fit = plan.fit
    print(f"plan: {yaml_path} (reasons in {md_path})")
    print(
        f"  spacing {data['spacing']} mm, patch {data['patch_size']} x {fit.patches} per step "
        f"(estimate {fit.memory_gib:.2f} GiB of {args.memory_gb:g}{'' if fit.fits else ', does NOT fit'}), "
        f"{len(net['strides'])} levels, filters {net['filters']}, intensity {data['intensity']}"
        + (f" {data['window']}" if "window" in data else "")
    )
    print(f"  train: medjdt fit --config {yaml_path}")
    return 0


COMMANDS = {"plan": (PLAN_HELP, add_plan_arguments, run_plan)}

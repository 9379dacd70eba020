"""The ``medjdt manifest`` and ``medjdt demo-data`` subcommands (argparse), registered in :mod:`medjdt.cli`.

:data:`COMMANDS` maps each name to ``(help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import json

from medjdt.data.layouts import LAYOUTS, build_manifest
from medjdt.data.manifest import metadata_path, read_manifest

MANIFEST_HELP = "scan a dataset in its published layout and write a manifest CSV (+ metadata JSON)"
DEMO_DATA_HELP = "write a synthetic multi-rater CT phantom dataset and its manifest"


def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt manifest``."""
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="published layout of the dataset")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="manifest CSV to write (QUBIQ: one per dataset and task)")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument(
        "--allow-unlabelled",
        dest="unlabelled",
        action="store_const",
        const="skip",
        default="error",
        help="leave out cases without annotation (listed in the metadata) instead of failing",
    )
    policy.add_argument(
        "--include-unlabelled",
        dest="unlabelled",
        action="store_const",
        const="include",
        help="write cases without annotation as unlabelled rows (for semi-supervised training)",
    )


def _summary(path) -> str:
    m = read_manifest(path)
    n_cases = m.frame["case_id"].nunique()
    return f"{path}: {n_cases} cases, {len(m.frame)} annotations, {m.num_classes} classes {m.class_names}"


def run_manifest(args: argparse.Namespace) -> int:
    """Build the manifest(s) and print one summary line per file; unlabelled cases are listed."""
    paths = build_manifest(args.layout, args.root, args.out, args.folds, args.seed, args.unlabelled)
    action = "included" if args.unlabelled == "include" else "left out"
    for path in paths:
        print(_summary(path))
        unlabelled = json.loads(metadata_path(path).read_text(encoding="utf-8")).get("unlabelled_cases", [])
        if unlabelled:
            print(f"  {action} {len(unlabelled)} unlabelled case(s): {', '.join(unlabelled)}")
    return 0


def add_demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt demo-data``."""
    parser.add_argument("--out", required=True, help="output folder (empty or previously written by demo-data)")
    parser.add_argument("--cases", type=int, default=24, help="number of cases (default 24)")
    parser.add_argument("--raters", type=int, default=3, help="raters per case (default 3)")
    parser.add_argument("--shape", type=int, nargs="+", default=[48, 48, 48], help="grid size (default 48 48 48)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2D slices or 3D volumes (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")


def run_demo_data(args: argparse.Namespace) -> int:
    """Write the phantoms and print the manifest summary."""
    from medjdt.data.phantoms import make_phantom_dataset  # imports torch and MONAI: only when needed

    path = make_phantom_dataset(args.out, args.cases, args.raters, args.shape, args.dims, args.seed, args.folds)
    print(_summary(path))
    return 0


COMMANDS = {
    "manifest": (MANIFEST_HELP, add_manifest_arguments, run_manifest),
    "demo-data": (DEMO_DATA_HELP, add_demo_data_arguments, run_demo_data),
}

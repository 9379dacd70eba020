"""The ``medjdt manifest`` and ``medjdt demo-data`` subcommands (argparse), registered in :mod:`medjdt.cli`.

:data:`COMMANDS` maps each name to ``(help, add_arguments, run)``. Paths are checked before the heavy modules
(pandas, nibabel, torch) are imported, inside the ``run`` functions.
"""

from __future__ import annotations

import argparse
import json

from medjdt._paths import existing_folder, writable_file, writable_folder
from medjdt.data.names import LAYOUTS
from medjdt.validation import check_number

MANIFEST_HELP = "scan a dataset in its published layout and write a manifest CSV (+ metadata JSON)"
DEMO_DATA_HELP = "write a synthetic multi-rater CT phantom dataset and its manifest"


def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt manifest``."""
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="published layout of the dataset")
    parser.add_argument(
        "--root", required=True, help="dataset folder (for KiTS also the repository root holding dataset/ or data/)"
    )
    parser.add_argument("--out", required=True, help="manifest CSV to write (QUBIQ: one per dataset and task)")
    parser.add_argument(
        "--folds", type=int, default=None, help="number of cross-validation folds (default 5, at most the cases)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    parser.add_argument(
        "--classes", nargs="+", default=None, help="layout folders: the class names, background first (label 0, 1, ...)"
    )
    parser.add_argument("--modality", default="CT", help="layout folders: the image modality (default CT)")
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
    from medjdt.data.manifest import read_manifest

    m = read_manifest(path)
    n_cases = m.frame["case_id"].nunique()
    return f"{path}: {n_cases} cases, {len(m.frame)} annotations, {m.num_classes} classes {m.class_names}"


def run_manifest(args: argparse.Namespace) -> int:
    """Build the manifest(s) and print one summary line per file; unlabelled cases are listed."""
    existing_folder(args.root, "dataset root (--root)")
    writable_file(args.out, "manifest (--out)")
    from medjdt.data.layouts import build_manifest
    from medjdt.data.manifest import metadata_path

    paths = build_manifest(
        args.layout, args.root, args.out, args.folds, args.seed, args.unlabelled, args.classes, args.modality
    )
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
    parser.add_argument(
        "--folds", type=int, default=None, help="number of cross-validation folds (default 5, at most --cases)"
    )
    parser.add_argument(
        "--labelled-fraction",
        type=float,
        default=None,
        help="also write manifest_labelledNN.csv, where only this fraction of the training cases (folds other "
        "than 0, the demo configs' validation fold) keep their annotations (for configs/demo_semi.yaml)",
    )


def run_demo_data(args: argparse.Namespace) -> int:
    """Write the phantoms and print the manifest summary."""
    writable_folder(args.out, "output folder (--out)", create=False)
    from medjdt.data.phantoms import make_phantom_dataset  # imports torch and MONAI: only when needed

    if args.labelled_fraction is not None:
        check_number("--labelled-fraction", args.labelled_fraction, low=0, high=1, low_inclusive=False)
    path = make_phantom_dataset(args.out, args.cases, args.raters, args.shape, args.dims, args.seed, args.folds)
    print(_summary(path))
    if args.labelled_fraction is not None:
        from medjdt.data.manifest import write_partly_labelled

        partial = path.with_name(f"manifest_labelled{round(100 * args.labelled_fraction)}.csv")
        write_partly_labelled(path, partial, args.labelled_fraction, keep_folds=[0], seed=args.seed)
        print(_summary(partial))
    return 0


COMMANDS = {
    "manifest": (MANIFEST_HELP, add_manifest_arguments, run_manifest),
    "demo-data": (DEMO_DATA_HELP, add_demo_data_arguments, run_demo_data),
}

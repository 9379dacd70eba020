"""The ``medjdt fuse``, ``evaluate``, ``sweep`` and ``report`` subcommands (argparse), registered in :mod:`medjdt.cli`.

:data:`COMMANDS` maps each name to ``(help, add_arguments, run)``. The heavy modules (torch, MONAI, matplotlib)
are imported inside the ``run`` functions, so that ``medjdt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from medjdt._paths import existing_file, existing_folder, writable_file, writable_folder
from medjdt.validation import check_number

FUSE_HELP = "fuse every case's raters into one target per case (NIfTI) and write an index CSV"
EVALUATE_HELP = "metrics of saved probability maps against the raters, with the inter-rater baseline"
SWEEP_HELP = "train one run per (fusion method, seed), sequentially; re-running skips finished runs and resumes"
REPORT_HELP = "reliability diagrams per run and a comparison table of fusion methods across runs"
STUDY_HELP = "a fusion study: train every arm x seed, test on held-out cases, report with confidence intervals"
FUSION_CHOICES = ("mean", "weighted", "majority", "random", "staple")
METHODS = "mean, weighted, majority, random or staple"


def add_fuse_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt fuse``."""
    parser.add_argument("--manifest", required=True, help="dataset manifest CSV")
    parser.add_argument("--method", required=True, choices=FUSION_CHOICES, help=f"fusion method: {METHODS}")
    parser.add_argument("--out", required=True, help="output folder (the same settings as before, or new)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-rater draw (default 0)")


def run_fuse(args: argparse.Namespace) -> int:
    """Write the fused targets; print one line per case written and a summary."""
    existing_file(args.manifest, "manifest (--manifest)")
    writable_folder(args.out, "output folder (--out)", create=False)
    from medjdt.reporting.fused_targets import write_fused_targets

    result = write_fused_targets(args.manifest, args.method, args.out, seed=args.seed, progress=print)
    print(
        f"{args.method} fusion: {result.written} case(s) written, {result.kept} already complete; index {result.index}"
    )
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt evaluate``."""
    parser.add_argument("--manifest", required=True, help="dataset manifest CSV")
    parser.add_argument("--predictions", required=True, help="folder of <case_id>_probs.nii.gz (medjdt predict)")
    parser.add_argument("--out", required=True, help="results CSV to write")
    parser.add_argument("--folds", type=int, nargs="+", help="evaluate only these folds (default: every case)")
    parser.add_argument("--ece-bins", type=int, default=15, help="confidence bins of the ECE (default 15)")
    parser.add_argument("--case-views", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the best, median and worst case by Dice into case_views/ beside --out (default on)")


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, write the CSV atomically and print the mean of the main metrics per comparison."""
    existing_file(args.manifest, "manifest (--manifest)")
    existing_folder(args.predictions, "predictions folder (--predictions)")
    writable_file(args.out, "results CSV (--out)")
    from pathlib import Path

    from medjdt.data.atomic import atomic_write
    from medjdt.reporting.evaluate import evaluate_predictions

    views = Path(args.out).parent / "case_views" if args.case_views else None
    results = evaluate_predictions(args.manifest, args.predictions, folds=args.folds, n_bins=args.ece_bins,
                                   case_views=views)
    atomic_write(args.out, lambda tmp: results.to_csv(tmp, index=False), suffix=".csv")
    means = results.groupby(["predictor", "reference"])[["dice", "soft_dice", "ece", "brier"]].mean()
    print(f"{results['case_id'].nunique()} case(s) -> {args.out}; means over cases (and raters):")
    print(means.round(4).to_string())
    if views is not None:
        pngs = sorted(views.glob("*.png"))
        print(f"case views (best, median, worst by Dice): {', '.join(map(str, pngs)) or 'none (no case has a Dice)'}")
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt sweep``; ``medjdt fit`` overrides follow ``--``."""
    parser.epilog = "Pass further medjdt fit options after --, e.g.: -- --trainer.max_epochs 20 --data.fold 1"
    parser.add_argument("--config", required=True, help="LightningCLI config of the experiment")
    parser.add_argument(
        "--fusion", required=True, nargs="+", choices=FUSION_CHOICES, help=f"fusion methods: {METHODS}"
    )
    parser.add_argument("--seeds", required=True, type=int, nargs="+", help="seeds")
    parser.add_argument("--out", required=True, help="sweep folder; one run directory <fusion>-seed<seed> per run")
    parser.add_argument(
        "--dry-run", action="store_true", help="print one command per run (for a job scheduler) instead of running"
    )
    parser.add_argument("overrides", nargs="*", help="medjdt fit options, after --")


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run the sweep (or print its per-run commands); a failed run ends it with exit code 1."""
    existing_file(args.config, "config file (--config)")
    writable_folder(args.out, "sweep folder (--out)", create=False)
    from medjdt.reporting.sweep import run_sweep, sweep_commands

    if args.dry_run:
        for command in sweep_commands(args.config, args.fusion, args.seeds, args.out, args.overrides):
            print(command)
        return 0
    try:
        run_sweep(args.config, args.fusion, args.seeds, args.out, args.overrides, progress=print)
    except RuntimeError as err:
        print(f"medjdt sweep: error: {err}", file=sys.stderr)
        return 1
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt report``."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (medjdt fit or sweep)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--case-views", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the best, median and worst case by Dice when the runs' predictions are found "
                        "(<run>/predict/last*/predictions; default on)")


def run_report(args: argparse.Namespace) -> int:
    """Write the report and print its Markdown table."""
    for run in args.runs:
        existing_folder(run, "run directory")
    writable_folder(args.out, "output folder (--out)", create=False)
    from medjdt.reporting.report import write_report

    files = write_report(args.runs, args.out, case_views=args.case_views)
    print(files.markdown, end="")
    print(
        f"report in {args.out}: {files.summary_csv.name}, {files.summary_markdown.name}, "
        f"{files.comparison_png.name}, {len(files.reliability_pngs)} reliability diagram(s), "
        f"{len(files.case_view_pngs)} case view(s)"
    )
    return 0


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``medjdt study run|report``."""
    sub = parser.add_subparsers(dest="study_command", metavar="{run,report}", required=True)
    run = sub.add_parser("run", help="train, test, evaluate and report (resumable)", description=STUDY_HELP)
    run.epilog = "Pass medjdt fit options for every run after --, e.g.: -- --trainer.max_epochs 2"
    run.add_argument("study", help="study file (YAML)")
    run.add_argument("--out", required=True, help="output folder: runs, shared cache, built manifests, report")
    run.add_argument("--test-manifest", help="a held-out manifest that replaces the study file's")
    run.add_argument("--arms", nargs="+", metavar="NAME", help="run only these arms")
    run.add_argument("--seeds", nargs="+", type=int, metavar="N", help="run only these seeds")
    run.add_argument("--dry-run", action="store_true",
                     help="print one resumable command per training run (a job array) and the report command")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("overrides", nargs="*", help="medjdt fit options, after --")
    report = sub.add_parser("report", help="write the report of the runs found under --out")
    report.add_argument("study", help="study file (YAML)")
    report.add_argument("--out", required=True, help="the study's output folder")
    report.add_argument("--report-dir", help="where to write the report (default: the study file's report_dir)")


def run_study_command(args: argparse.Namespace) -> int:
    """Run the study (or print its commands), or write its report."""
    existing_file(args.study, "study file")
    writable_folder(args.out, "study folder (--out)", create=False)
    from medjdt.reporting.study_spec import read_study

    spec = read_study(args.study)
    if args.study_command == "report":
        from medjdt.reporting.study_report import write_study_report

        files = write_study_report(spec, args.out, args.report_dir)
        print(files.markdown.read_text(encoding="utf-8"), end="")
        print(f"report in {files.markdown.parent}")
        return 0
    from medjdt.reporting.study import run_study, study_commands

    if args.test_manifest is not None:
        existing_file(args.test_manifest, "test manifest (--test-manifest)")
    if args.dry_run:
        for command in study_commands(spec, args.out, arms=args.arms, seeds=args.seeds,
                                      test_manifest=args.test_manifest, overrides=args.overrides):
            print(command)
        return 0
    try:
        run_study(spec, args.out, arms=args.arms, seeds=args.seeds, test_manifest=args.test_manifest,
                  overrides=args.overrides, report=not args.no_report, progress=print)
    except RuntimeError as err:
        print(f"medjdt study: error: {err}", file=sys.stderr)
        return 1
    return 0


RATERS_HELP = "how much the raters disagree (pairwise Dice and HD95, STAPLE sensitivity/specificity) and any outlier"


def add_raters_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt raters``."""
    parser.add_argument("--manifest", required=True, help="dataset manifest CSV")
    parser.add_argument("--out", required=True, help="output folder: CSV tables, raters.md and figures")
    parser.add_argument("--workers", type=int, default=1, help="cases read and scored in parallel (default 1)")


def run_raters(args: argparse.Namespace) -> int:
    """Write the rater report; print its lead sentence and where it is."""
    existing_file(args.manifest, "manifest (--manifest)")
    writable_folder(args.out, "output folder (--out)", create=False)
    check_number("--workers", args.workers, low=1, integer=True)
    from medjdt.reporting.rater_report import write_rater_report

    report = write_rater_report(args.manifest, args.out, workers=args.workers)
    print(report.sentence)
    print(f"rater report in {args.out}: {', '.join(sorted(report.files))}")
    return 0


COMMANDS = {
    "fuse": (FUSE_HELP, add_fuse_arguments, run_fuse),
    "evaluate": (EVALUATE_HELP, add_evaluate_arguments, run_evaluate),
    "sweep": (SWEEP_HELP, add_sweep_arguments, run_sweep_command),
    "report": (REPORT_HELP, add_report_arguments, run_report),
    "study": (STUDY_HELP, add_study_arguments, run_study_command),
    "raters": (RATERS_HELP, add_raters_arguments, run_raters),
}

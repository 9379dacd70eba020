"""``medjdt check``: the checks of ``medjdt fit`` (or another stage) alone, without training or writing a run.

It parses the config and overrides as the stage would, checks every setting, the manifest, the checkpoint (when
given) and every case the stage uses (read, checked and cached, exactly as before the first training step), prints
what it found and exits: 0 when the run would start, 2 with one line naming the problem otherwise.
"""

from __future__ import annotations

import argparse

CHECK_HELP = "run the checks of a training command (config, manifest, every case, checkpoint) without training"

__all__ = ["COMMANDS"]


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medjdt check``; any ``medjdt fit`` option may follow."""
    parser.epilog = "Example: medjdt check --config configs/kits.yaml --data.manifest data_manifests/kits23.csv"
    parser.add_argument("--config", required=True, action="append", help="LightningCLI config (as for medjdt fit)")
    parser.add_argument(
        "--stage",
        choices=("fit", "validate", "test", "predict"),
        default="fit",
        help="the command whose checks run (default fit)",
    )
    # every other option goes to the training command as it is (see medjdt fit --help)
    parser.set_defaults(passthrough=True)
    parser.usage = "medjdt check [-h] --config CONFIG [--stage STAGE] [medjdt fit options ...]"


def run_check(args: argparse.Namespace) -> int:
    """Run the checks and print a summary of the data."""
    from medjdt.cli.training import check_training_cli

    argv = [args.stage]
    for config in args.config:
        argv += ["--config", config]
    return check_training_cli([*argv, *args.overrides])


COMMANDS = {"check": (CHECK_HELP, add_check_arguments, run_check)}

"""Run folders, the unit of trust: where a run goes, how it is claimed and locked, and the record of what made it.

A run folder (``runs/<config>/version_N`` by default) is claimed atomically (:func:`claim_version`), locked while a
process works in it (:class:`RunLock`), and holds ``run.json`` (:mod:`medjdt.runs.record`): the command line, the
resolved settings that identify the run (manifest path and content hash, data and model settings), library
versions and the git commit of the working tree. ``--ckpt_path last`` resumes only a run whose identity matches
(:func:`find_resumable`). This package uses the standard library only, so the command line can plan a run before
torch, MONAI and Lightning are imported.
"""

from medjdt.runs.claim import claim_version, evaluation_folder, is_run_folder, run_folder_of_checkpoint
from medjdt.runs.lock import RunLock
from medjdt.runs.record import (
    RUN_RECORD,
    describe_mismatch,
    environment,
    find_resumable,
    manifest_digest,
    read_record,
    write_record,
)

__all__ = [
    "RUN_RECORD",
    "RunLock",
    "claim_version",
    "describe_mismatch",
    "environment",
    "evaluation_folder",
    "find_resumable",
    "is_run_folder",
    "manifest_digest",
    "read_record",
    "run_folder_of_checkpoint",
    "write_record",
]

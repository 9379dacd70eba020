"""Planning: a dataset's fingerprint and the training config derived from it (``medjdt plan``).

Flow: manifest -> :func:`make_fingerprint` (every case read once: grid, orientation, raters, class sizes,
foreground intensities; cached beside the plan) -> :func:`make_plan` (spacing, patch and batch under a memory
budget, intensity, network, the rest from the shipped configs; each value with its reason) -> :func:`write_plan`
(``plan.yaml``, ``plan.md``). Importing this package is light (standard library and numpy): the cases are read with
nibabel, torch and MONAI only when a fingerprint is made.
"""

from __future__ import annotations

from medjdt.planning.fingerprint import Fingerprint, make_fingerprint, manifest_key
from medjdt.planning.plan import Decision, Plan, make_plan, target_spacing
from medjdt.planning.topology import estimate_gib, fit_patch_and_batch, topology
from medjdt.planning.writer import write_plan

__all__ = [
    "Decision",
    "Fingerprint",
    "Plan",
    "estimate_gib",
    "fit_patch_and_batch",
    "make_fingerprint",
    "make_plan",
    "manifest_key",
    "target_spacing",
    "topology",
    "write_plan",
]

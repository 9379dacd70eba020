"""The demo dataset a config names: synthetic phantoms written on first use, before the data module reads them.

A config's ``data.demo`` (see ``configs/demo.yaml``) holds the arguments of
:func:`~medjdt.data.phantoms.make_phantom_dataset`. The command line calls :func:`ensure_demo_data` for the
config's own ``data.manifest`` path (never for another one, so a mistyped path is an error, not a new dataset), then
builds :class:`~medjdt.data.SegmentationDataModule`, which only reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medjdt.data.manifest import write_partly_labelled
from medjdt.data.phantoms import make_phantom_dataset

__all__ = ["ensure_demo_data"]


def ensure_demo_data(manifest: str | Path, demo: dict[str, Any], *, num_folds: int | None, fold: int) -> None:
    """Write the phantoms behind ``manifest`` unless it exists.

    ``make_phantom_dataset(dirname(manifest), **demo)`` writes them; ``manifest`` must then be named
    ``manifest.csv``. ``folds`` defaults to ``num_folds`` when given, else 5, and never exceeds the number of cases.
    With an extra key ``labelled_fraction`` the phantoms' ``manifest.csv`` (written if missing) is copied to
    ``manifest`` (then not named ``manifest.csv``) by :func:`~medjdt.data.manifest.write_partly_labelled`: only
    that fraction of the training cases (the folds other than ``fold``) keep their annotations, chosen with the
    phantoms' ``demo["seed"]``.

    Raises:
        ValueError: a manifest name that does not fit ``demo`` (see above), or bad phantom arguments.
    """
    manifest = Path(manifest)
    if manifest.exists():
        return
    demo = dict(demo)
    fraction = demo.pop("labelled_fraction", None)
    cases = int(demo.get("cases", 24))
    demo.setdefault("folds", min(num_folds or 5, max(cases, 1)))
    if fraction is None:
        if manifest.name != "manifest.csv":
            raise ValueError(f"with demo, the manifest must be named manifest.csv, got {manifest}")
        make_phantom_dataset(manifest.parent, **demo)
        return
    full = manifest.parent / "manifest.csv"
    if manifest.name == "manifest.csv":
        raise ValueError(
            f"with demo.labelled_fraction, the manifest {manifest} must not be named manifest.csv: it is derived "
            f"from the fully labelled {full}"
        )
    if not full.exists():
        make_phantom_dataset(manifest.parent, **demo)
    # The phantoms' seed also picks the labelled cases: the demo dataset is a function of ``demo`` alone.
    write_partly_labelled(full, manifest, float(fraction), keep_folds=[fold], seed=int(demo.get("seed", 0)))

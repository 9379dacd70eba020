"""Checks of a data module's cases before the first training step, and reading every case once into the cache.

:func:`check_case_geometry` reads only the image headers: a file that is not NIfTI, a channel count other than
the manifest's, a patch larger than a preprocessed case, or a target spacing that would resample a case beyond
the memory budget are refused before anything is allocated. :func:`prepare_cases` then loads every case through
the loader (reading, checking and preprocessing it, and writing the on-disk cache), in DataLoader workers, and
collects every problem instead of stopping at the first. Both raise one ``ValueError`` whose one-line message
names the cases and files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medjdt._progress import progress
from medjdt.data.manifest import CaseRecord
from medjdt.data.preprocess import PreprocessSettings

__all__ = ["PreparedCases", "case_problems", "check_case_geometry", "planned_shape", "prepare_cases"]

_SHOWN = 3


def case_problems(problems: Sequence[str], total: int, what: str = "case(s)") -> ValueError:
    """One ``ValueError`` for the problems of several cases: the count and the first few, on one line."""
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return ValueError(f"{len(problems)} of {total} {what} cannot be used: {shown}{more}")


def _header(record: CaseRecord) -> Any:
    try:
        return nib.load(str(record.image))
    except Exception as err:  # nibabel raises ImageFileError, gzip/zlib errors... for files that are not NIfTI
        raise ValueError(
            f"case {record.case_id!r}: image {record.image} is not a readable NIfTI file ({type(err).__name__}: "
            f"{err})"
        ) from None


def planned_shape(
    record: CaseRecord, settings: PreprocessSettings, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The spatial shape of ``record`` as stored and after preprocessing, from its image header, and its channels.

    Axes are reordered as the orientation step does, then rescaled to ``settings.spacing``. Returns
    ``(stored shape, preprocessed shape, channels)``, the shapes as float arrays of ``spatial_dims`` entries.
    """
    img = _header(record)
    stored = tuple(img.header.get_data_shape())
    if len(stored) < spatial_dims:
        raise ValueError(
            f"case {record.case_id!r}: image {record.image} has shape {stored}, expected {spatial_dims} spatial axes"
        )
    shape = original = np.asarray(stored[:spatial_dims], dtype=float)
    zooms = np.asarray(img.header.get_zooms()[:spatial_dims], dtype=float)
    channels = int(np.prod(stored[spatial_dims:])) if len(stored) > spatial_dims else 1
    if settings.orientation is not None and spatial_dims == 3:
        order = nib.io_orientation(img.affine)[:, 0].astype(int)
        shape_out, zooms_out = np.empty(3), np.empty(3)
        shape_out[order], zooms_out[order] = shape, zooms
        shape, zooms = shape_out, zooms_out
    if settings.spacing is not None:
        shape = np.maximum(np.round(shape * zooms / np.asarray(settings.spacing, dtype=float)), 1)
    return original, shape, channels


def check_case_geometry(
    records: Sequence[CaseRecord],
    settings: PreprocessSettings,
    spatial_dims: int,
    *,
    in_channels: int,
    max_case_gb: float,
    patch_size: Sequence[int] | None = None,
) -> None:
    """Refuse, from the image headers alone, cases that cannot be used with these settings.

    Checks each image is a NIfTI file with ``in_channels`` channels; that preprocessing (``settings.spacing``)
    would not need more than ``max_case_gb`` GiB for one case (input and output grids of the image and every
    rater, as float32); and, when ``patch_size`` is given, that the patch fits in the preprocessed case.

    Raises:
        ValueError: one line naming the failing cases, files and values (see :func:`case_problems`).
    """
    problems, too_small = [], []
    budget = max_case_gb * 2**30
    for record in records:
        try:
            stored, shape, channels = planned_shape(record, settings, spatial_dims)
        except ValueError as err:
            problems.append(str(err))
            continue
        if channels != in_channels:
            problems.append(
                f"case {record.case_id!r}: image {record.image} has {channels} channel(s), the manifest declares "
                f"in_channels={in_channels}"
            )
            continue
        arrays = channels + max(1, len(record.raters))
        needed = (np.prod(shape) + np.prod(stored)) * arrays * 4
        if needed > budget:
            problems.append(
                f"case {record.case_id!r}: spacing {list(settings.spacing or [])} would resample it to "
                f"{[int(s) for s in shape]} voxels, about {needed / 2**30:.1f} GiB, more than data.max_case_gb="
                f"{max_case_gb:g}; choose a coarser data.spacing (or raise data.max_case_gb)"
            )
            continue
        if patch_size is not None and np.any(np.asarray(patch_size) > shape):
            too_small.append(f"{record.case_id!r} {[int(s) for s in shape]}")
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise case_problems(problems, len(records))
    if too_small:
        shown = ", ".join(too_small[:_SHOWN]) + (f" (and {len(too_small) - _SHOWN} more)" if len(too_small) > _SHOWN
                                                 else "")
        raise ValueError(
            f"patch_size {list(patch_size)} is larger than {len(too_small)} of {len(records)} case(s) after "
            f"preprocessing at spacing {settings.spacing}: {shown}; use a smaller data.patch_size or a finer "
            "data.spacing"
        )


@dataclass(frozen=True)
class PreparedCases:
    """What :func:`prepare_cases` did: cases read from the cache, cases preprocessed, and the seconds it took."""

    cached: int
    built: int
    seconds: float


class _Prepare(torch.utils.data.Dataset):
    """Loads one case per item; returns ``(was cached, error message or None)`` instead of the case."""

    def __init__(self, records: Sequence[CaseRecord], load: Callable[[CaseRecord], Any],
                 is_cached: Callable[[CaseRecord], bool]):
        self.records = list(records)
        self.load = load
        self.is_cached = is_cached

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[bool, str | None]:
        record = self.records[index]
        cached = self.is_cached(record)
        try:
            self.load(record)
        except ValueError as err:
            return cached, str(err)
        except Exception as err:  # readers raise many types for damaged files: report them with the case
            return cached, f"case {record.case_id!r}: {type(err).__name__}: {err}"
        return cached, None


def prepare_cases(
    records: Sequence[CaseRecord],
    load: Callable[[CaseRecord], Any],
    is_cached: Callable[[CaseRecord], bool],
    num_workers: int,
    worker_init_fn: Callable[[int], None] | None = None,
) -> PreparedCases:
    """Load every case once (reading, checking, preprocessing and caching it), in ``num_workers`` processes.

    Raises:
        ValueError: one line naming every case that failed (see :func:`case_problems`).
    """
    start = time.monotonic()
    loader = torch.utils.data.DataLoader(
        _Prepare(records, load, is_cached),
        batch_size=None,
        num_workers=min(num_workers, len(records)),
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
    )
    problems, cached = [], 0
    for was_cached, problem in progress(loader, total=len(records), desc="caching"):
        cached += int(was_cached)
        if problem is not None:
            problems.append(problem)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise case_problems(problems, len(records))
    return PreparedCases(cached=cached, built=len(records) - cached, seconds=time.monotonic() - start)

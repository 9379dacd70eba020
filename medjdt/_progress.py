"""Progress bars for the steps that take time (reading and caching cases, fusing, evaluating, planning).

A bar shows the count of cases done, the rate and an estimate of the time left, on stderr, and only when stderr is
a terminal (logs and CI output stay clean); ``MEDJDT_PROGRESS=1`` forces it on, ``MEDJDT_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether bars are drawn: ``MEDJDT_PROGRESS`` when set (``1``/``0``), else whether stderr is a terminal."""
    setting = os.environ.get("MEDJDT_PROGRESS")
    if setting is not None:
        return setting.strip() not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "case") -> Iterator[T]:
    """``items``, with a bar ``desc: 12/40 case [00:05<00:11, 2.4 case/s]`` while they are consumed.

    Args:
        items: what to iterate over (a list, a generator, ``executor.map(...)``...).
        total: the number of items, when ``items`` has no ``len``.
        desc: what is being done (``"caching"``, ``"evaluate"``...).
        unit: what one item is.
    """
    if not progress_enabled():
        yield from items
        return
    from tqdm.auto import tqdm

    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar

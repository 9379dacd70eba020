"""Renamed arguments: the old name keeps working for one release, with a ``FutureWarning`` that names the new one."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["renamed_argument"]


def renamed_argument(
    where: str, old: str, new: str, old_value: Any, new_value: Any, *, new_given: bool, stacklevel: int = 3
) -> Any:
    """The value of an argument renamed from ``old`` to ``new``.

    Returns ``new_value`` where the old name was not used (``old_value`` is None); otherwise warns
    ``FutureWarning("<where>: argument '<old>' is deprecated; use '<new>'")`` and returns ``old_value``.
    ``new_given`` says whether the caller also gave the new name (for a parameter with a default: whether its
    value differs from the default). ``stacklevel`` counts from this function (3: the caller of the function that
    calls this one).

    Raises:
        ValueError: both names were given.
    """
    if old_value is None:
        return new_value
    if new_given:
        raise ValueError(f"{where}: argument '{old}' is the deprecated name of '{new}'; give only '{new}'")
    warnings.warn(f"{where}: argument '{old}' is deprecated; use '{new}'", FutureWarning, stacklevel=stacklevel)
    return old_value

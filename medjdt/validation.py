"""Argument checks shared by every public function and the command line.

Every bad argument reads the same way, from Python or from the CLI::

    JDTLoss: alpha must be a finite number >= 0, got -1
    ^where   ^name     ^what is allowed            ^what was given

``where`` is optional (a class, a function, a config key or a file). Each check returns the value in its
normal form (a ``float``, a ``Path``...) so that call sites read ``self.alpha = check_number("alpha", alpha,
low=0)``. Checks raise ``ValueError`` (the project's one exception type for bad input), never ``TypeError``, so
that one ``except`` in the CLI turns them all into a one-line message.

This module imports the standard library only; :func:`check_tensor` imports torch when it is called, so the
CLI can check its arguments before the heavy libraries load.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SPATIAL_LAYOUT",
    "check_choice",
    "check_number",
    "check_path",
    "check_probability",
    "check_tensor",
    "did_you_mean",
]


# The layout of a channel-first batch, as check_tensor's messages name it.
SPATIAL_LAYOUT = "(B, C, *spatial) with 2 or 3 spatial dims"


def _fail(where: str | None, name: str, allowed: str, value: Any) -> ValueError:
    prefix = f"{where}: " if where else ""
    return ValueError(f"{prefix}{name} must be {allowed}, got {value!r}")


def _is_number(value: Any) -> bool:
    # numbers.Real covers int, float and numpy scalars; bool is an int to Python but never a number here.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f" in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f" {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f" {'<=' if high_inclusive else '<'} {high:g}"
    return ""


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    where: str | None = None,
) -> float | int:
    """``value`` as a ``float`` (an ``int`` with ``integer=True``) after checking that it is a finite number.

    Args:
        name: the argument's name, as the caller knows it.
        value: what was given.
        low, high: optional bounds; ``low_inclusive``/``high_inclusive`` say whether they are allowed.
        integer: require a whole number (``3`` and ``3.0`` pass, ``3.5`` fails) and return an ``int``.
        where: who asks (a class, function, config key or file), put in front of the message.

    Raises:
        ValueError: not a number (``bool`` and strings included), NaN or infinite, not whole, or out of range.
    """
    kind = "a finite integer" if integer else "a finite number"
    allowed = kind + _interval(low, high, low_inclusive, high_inclusive)
    if not _is_number(value) or not math.isfinite(float(value)):
        raise _fail(where, name, allowed, value)
    number = float(value)
    if integer and number != round(number):
        raise _fail(where, name, allowed, value)
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high:
        raise _fail(where, name, allowed, value)
    return int(number) if integer else number


def check_probability(name: str, value: Any, *, where: str | None = None) -> float:
    """``value`` as a ``float`` after checking that it is a number in [0, 1].

    Raises:
        ValueError: not a number, NaN, or outside [0, 1].
    """
    return check_number(name, value, low=0.0, high=1.0, where=where)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to ``word``, or an empty string."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def check_choice(name: str, value: Any, choices: Sequence[Any], *, where: str | None = None) -> Any:
    """``value`` after checking that it is one of ``choices``; the error suggests the closest choice.

    Raises:
        ValueError: ``value`` is not among ``choices``, e.g.
            ``aggregation must be one of 'dataset', 'image', 'class', got 'datset' (did you mean dataset?)``.
    """
    # True == 1 in Python; a bool is a choice only where the choices are bools.
    same_kind = not isinstance(value, bool) or any(isinstance(c, bool) for c in choices)
    if same_kind and value in choices:
        return value
    listed = ", ".join(repr(c) for c in choices)
    hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
    raise ValueError(f"{_fail(where, name, f'one of {listed}', value)}{hint}")


_PATH_KINDS = ("file", "dir", "any")


def check_path(
    name: str,
    value: str | os.PathLike,
    *,
    exists: bool | None = True,
    kind: str = "any",
    writable: bool = False,
    where: str | None = None,
) -> Path:
    """``value`` as a ``Path`` after checking what the caller needs of it.

    Args:
        name: the argument's name (``--out``, ``manifest``...).
        value: a path.
        exists: True: must exist; False: must not exist; None: either.
        kind: ``"file"`` or ``"dir"``: where the path exists, it must be of that kind; ``"any"``: no demand.
        writable: the path (if it exists) or its nearest existing parent folder must be writable, and no
            parent may be a file.
        where: who asks, put in front of the message.

    Raises:
        ValueError: naming the path and what is wrong with it (missing, present, a file where a folder is
            needed or the reverse, not writable).
    """
    check_choice("kind", kind, _PATH_KINDS, where="check_path")
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise _fail(where, name, "a path", value)
    path = Path(value).expanduser()
    if exists is True and not path.exists():
        raise ValueError(f"{prefix}{name} {path} does not exist")
    if exists is False and path.exists():
        raise ValueError(f"{prefix}{name} {path} exists already")
    if path.exists() and kind == "file" and not path.is_file():
        raise ValueError(f"{prefix}{name} {path} must be a file, but it is a folder")
    if path.exists() and kind == "dir" and not path.is_dir():
        raise ValueError(f"{prefix}{name} {path} must be a folder, but it is a file")
    if writable:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing != path and not existing.is_dir():
            raise ValueError(f"{prefix}{name} {path} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK):
            raise ValueError(f"{prefix}{name} {path} is not writable ({existing} refuses writes)")
    return path


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    floating: bool | None = None,
    finite: bool = False,
    layout: str | None = None,
    where: str | None = None,
):
    """``value`` after checking that it is a ``torch.Tensor`` of the expected form.

    Args:
        name: the tensor's name (``logits``, ``target``...).
        value: what was given.
        ndim: the number of dimensions, or the allowed numbers (``(4, 5)`` for ``(B, C, *spatial)`` with 2 or 3
            spatial dims).
        shape: the expected shape; ``None`` entries match any size.
        floating: True: floating dtype required; False: integer or bool dtype required; None: any.
        finite: every entry must be finite (no NaN or infinity). This reads the tensor (a device sync on GPU).
        layout: how the dims read, for the message of a wrong ``ndim`` (``"(B, C, *spatial) with 2 or 3 spatial
            dims"``).
        where: who asks, put in front of the message.

    Raises:
        ValueError: not a tensor, wrong number of dims, shape, dtype, or non-finite entries; the message gives
            the shape or dtype that was found.
    """
    import torch

    prefix = f"{where}: " if where else ""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{prefix}{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            wanted = f"shape {layout}" if layout else " or ".join(str(d) for d in allowed) + " dims"
            raise ValueError(f"{prefix}{name} must have {wanted}, got shape {tuple(value.shape)}")
    if shape is not None:
        matches = len(shape) == value.ndim and all(s is None or s == v for s, v in zip(shape, value.shape))
        if not matches:
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{prefix}{name} must have shape {expected}, got shape {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise ValueError(f"{prefix}{name} must be a floating point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{prefix}{name} must be an integer tensor, got dtype {value.dtype}")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{prefix}{name} has {bad} NaN or infinite entries (shape {tuple(value.shape)})")
    return value

"""Checks of the paths a command reads and writes, with one wording for every error.

Used wherever medjdt takes a folder to write into or builds an output file name from data (a case id, a rater
name): a folder that is a file or not writable, and a name that would leave its folder, are refused with a
``ValueError`` that names the path and where it came from.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

__all__ = ["check_name", "child_path", "existing_file", "existing_folder", "writable_file", "writable_folder"]


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is an existing file; else ``ValueError`` naming ``what`` and the path."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    return path


def existing_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is an existing folder; else ``ValueError`` naming ``what`` and the path."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a folder")
    return path


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when a file can be written there (it is not a folder, its folder is or can be made writable)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    writable_folder(path.parent if str(path.parent) else Path("."), f"folder of the {what}", create=False)
    return path


def writable_folder(path: str | os.PathLike, what: str, *, create: bool = True) -> Path:
    """Return ``path`` as a folder medjdt can write into, creating it (and its parents) when ``create``.

    With ``create=False`` nothing is created: a missing folder passes when its nearest existing parent is a
    writable folder (it could be created later).

    Raises:
        ValueError: ``path`` (or one of its parents) is a file, or the folder cannot be created or written
            (the message names ``what``, e.g. ``"cache folder (data.cache_dir)"``, and the path).
    """
    folder = Path(path)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        if existing == folder:
            raise ValueError(f"{what} {folder} is a file, not a folder")
        raise ValueError(f"{what} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == folder:
            raise ValueError(f"{what} {folder} is not writable")
        raise ValueError(f"{what} {folder} cannot be created: {existing} is not writable")
    if create and existing != folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{what} {folder} cannot be created: {err.strerror or err}") from err
    return folder


def check_name(value: str, what: str) -> str:
    """Return ``value`` when it can name a file: not empty, no path separator, not ``.``/``..``, no control
    character, no leading or trailing white space. Raises ``ValueError`` naming ``what`` otherwise."""
    problem = None
    if not isinstance(value, str) or value.strip() == "":
        problem = "is empty"
    elif value != value.strip():
        problem = "has leading or trailing white space"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator"
    elif value in (".", ".."):
        problem = "names a folder, not a file"
    elif any(unicodedata.category(ch) == "Cc" for ch in value):
        problem = "contains a control character"
    if problem is not None:
        raise ValueError(f"{what} {value!r} {problem}; it must be usable as a file name")
    return value


def child_path(folder: str | os.PathLike, name: str, what: str) -> Path:
    """``folder / name``, checked to stay inside ``folder`` (after resolving ``..`` and symbolic links).

    Raises:
        ValueError: the path would lie outside ``folder`` (the message names ``what`` and both paths).
    """
    folder = Path(folder)
    path = folder / name
    root = os.path.realpath(folder)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise ValueError(f"{what} {str(name)!r} would be written outside its folder {folder} (to {resolved})")
    return path

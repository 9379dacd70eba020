"""Lazy package exports: public names resolved from their defining modules on first access.

The command line imports the tool subcommands at start-up; resolving a package's exports lazily keeps
``medjdt --version`` and ``medjdt --help`` from importing torch, MONAI, Lightning and matplotlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict[str, Any]) -> tuple[
    Callable[[str], Any], Callable[[], list[str]]
]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package`` whose ``exports`` map name -> module."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

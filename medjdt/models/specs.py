"""``class_path``/``init_args`` specs (the LightningCLI convention) resolved to objects.

Specs stay plain dicts in the module's hyper-parameters so checkpoints rebuild without the original config.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["check_spec", "resolve_class", "instantiate"]


def check_spec(spec: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """Return ``(class_path, init_args)`` of a spec, or raise ``ValueError`` naming ``what``."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"{what} must be a mapping with 'class_path' (and 'init_args'), got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}; expected 'class_path' and 'init_args'")
    return str(spec["class_path"]), dict(spec.get("init_args") or {})


def resolve_class(class_path: str, base: type, what: str, short_prefix: str | None = None) -> type:
    """Import ``class_path`` (a short name is looked up under ``short_prefix``) and check it subclasses ``base``."""
    path = class_path if "." in class_path or short_prefix is None else f"{short_prefix}.{class_path}"
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"unknown {what} {class_path!r}: no such class") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} {class_path!r} is not a {base.__module__}.{base.__qualname__} subclass")
    return cls


def instantiate(spec: Mapping[str, Any], base: type, what: str, short_prefix: str | None = None) -> Any:
    """Build the object a spec describes; bad class or arguments raise ``ValueError`` naming ``what``."""
    class_path, init_args = check_spec(spec, what)
    cls = resolve_class(class_path, base, what, short_prefix)
    try:
        return cls(**init_args)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"cannot build {what} {class_path} with init_args {init_args}: {err}") from err

"""Reading the small JSON and YAML documents medjdt keeps beside its outputs (run records, sweep states,
settings, study files), with one error wording that names the file.

Standard library only; PyYAML is imported when a YAML document is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json_object", "read_yaml_mapping"]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        what: what the file is, for the message (``"run record"``, ``"manifest metadata"``...).

    Raises:
        ValueError: ``"<what> <path> is not valid JSON: ..."`` (unreadable, not UTF-8, not JSON) or
            ``"<what> <path> must hold a JSON object"``.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {_one_line(err)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not {type(value).__name__}")
    return value


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path``.

    Raises:
        ValueError: ``"<what> <path> is not readable YAML: ..."`` or ``"<what> <path> must hold a mapping"``.
    """
    import yaml

    path = Path(path)
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{what} {path} is not readable YAML: {_one_line(err)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a mapping, not {type(value).__name__}")
    return value

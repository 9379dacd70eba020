"""On-disk cache of preprocessed cases, keyed by the preprocessing settings and the source files.

Layout: ``<cache_dir>/<settings digest>/settings.json`` (what the digest stands for) and one
``<case digest>.pt`` per case. The case digest covers the case id, rater names and the size and
modification time of every source file, so replacing a file or changing a setting selects a new entry
(older entries are simply no longer used). An entry is a ``torch.save`` of tensors, strings and lists
(loaded with ``weights_only=True``) that includes a CRC32 of every tensor's bytes. A truncated or partial
entry fails to load and a corrupted one fails its checksums: either is deleted with a warning and rebuilt.
Checksums are verified the first time a process reads an entry (per size and modification time), not on
every epoch. Entries are written atomically, and only after the case loaded and validated successfully.

Other per-case results derived from a preprocessed case (the whole-case fused targets of
:mod:`medjdt.data.case_fusion`) are stored the same way under their own settings digest, so they neither
invalidate the preprocessed entries nor are computed for settings that do not use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medjdt.data import io as data_io
from medjdt.data.atomic import atomic_write, atomic_write_text
from medjdt.data.manifest import CaseRecord
from medjdt.data.preprocess import PreprocessSettings, preprocess_case

# The schema of a preprocessed-case entry: payload key -> type.
CASE_SCHEMA: dict[str, type] = {
    "image": torch.Tensor,
    "raters": torch.Tensor,
    "affine": torch.Tensor,
    "original_affine": torch.Tensor,
    "original_shape": list,
    "case_id": str,
    "rater_names": list,
    "image_file": str,
    "checksums": dict,
}
# Entries whose checksums this process has verified: (path, size, mtime_ns).
_verified: set[tuple[str, int, int]] = set()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_state(path: Path) -> Any:
    """Size and mtime of a file, of every file in a folder, or ``None`` when missing."""
    try:
        if path.is_dir():
            return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


def _tensor_keys(schema: dict[str, type]) -> list[str]:
    return [key for key, kind in schema.items() if kind is torch.Tensor]


def _check_payload(payload: Any, schema: dict[str, type]) -> dict[str, Any]:
    """Raise ``ValueError`` unless ``payload`` has every key of ``schema`` with the right type."""
    if not isinstance(payload, dict):
        raise ValueError("payload is not a dict")
    for key, kind in schema.items():
        if not isinstance(payload.get(key), kind):
            raise ValueError(f"payload key {key!r} missing or not a {kind.__name__}")
    return payload


def _verify_checksums(payload: dict[str, Any], schema: dict[str, type]) -> None:
    for key in _tensor_keys(schema):
        if payload["checksums"].get(key) != _crc(payload[key]):
            raise ValueError(f"CRC32 mismatch for {key!r}")


class CaseCache:
    """Directory of cached per-case entries for one set of settings.

    Args:
        root: the cache directory (created if needed).
        settings: JSON-able description of everything that changes the cached content.
        schema: payload key -> type of every entry (default: a preprocessed case, see :func:`to_payload`);
            it must hold ``"case_id": str`` and ``"checksums": dict``. Tensors get a CRC32 each.

    Raises:
        ValueError: ``schema`` lacks ``case_id`` or ``checksums``.
    """

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any], schema: dict[str, type] = CASE_SCHEMA):
        if schema.get("case_id") is not str or schema.get("checksums") is not dict:
            raise ValueError(f"cache schema needs 'case_id': str and 'checksums': dict, got {schema}")
        self.schema = dict(schema)
        self.settings = dict(settings)
        self.dir = Path(root) / _digest(self.settings)[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.dir / "settings.json"
        if not settings_file.is_file():
            atomic_write_text(settings_file, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def entry_path(self, record: CaseRecord) -> Path:
        """The entry file for ``record`` (its name changes when any source file changes)."""
        sources = {
            "case_id": record.case_id,
            "image": [str(record.image), _file_state(record.image)],
            "labels": [[r, str(p), _file_state(p)] for r, p in zip(record.raters, record.labels)],
        }
        return self.dir / f"{_digest(sources)[:32]}.pt"

    def read(self, record: CaseRecord) -> dict[str, Any] | None:
        """The cached payload, or ``None`` when absent or corrupt (a corrupt entry is deleted with a warning)."""
        path = self.entry_path(record)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        state = (str(path), st.st_size, st.st_mtime_ns)
        try:
            try:
                payload = _check_payload(torch.load(path, weights_only=True), self.schema)
            except Exception as err:  # torch/zip/pickle raise many types for truncated, partial or garbage files
                raise ValueError(f"cannot load: {err}") from err
            if payload["case_id"] != record.case_id:
                raise ValueError(f"entry holds case {payload['case_id']!r}")
            if state not in _verified:
                _verify_checksums(payload, self.schema)
                _verified.add(state)
        except ValueError as err:
            self.discard(record, str(err))
            return None
        return payload

    def discard(self, record: CaseRecord, reason: str) -> None:
        """Delete the entry of ``record`` with a warning that gives ``reason``; the next write rebuilds it."""
        path = self.entry_path(record)
        warnings.warn(f"cache entry {path} for case {record.case_id!r} is corrupt ({reason}); rebuilding", stacklevel=3)
        path.unlink(missing_ok=True)

    def write(self, record: CaseRecord, payload: dict[str, Any]) -> Path:
        """Store ``payload`` (keys of ``schema``, ``checksums`` is filled in) for ``record`` atomically; returns
        the entry path."""
        payload = {**payload, "checksums": {key: _crc(payload[key]) for key in _tensor_keys(self.schema)}}
        return atomic_write(self.entry_path(record), lambda tmp: torch.save(payload, tmp))


def to_payload(case: dict[str, Any]) -> dict[str, Any]:
    """Flatten a preprocessed case (see :func:`medjdt.data.preprocess.preprocess_case`) into plain tensors."""
    image = case["image"]
    return {
        "image": image.as_tensor().contiguous() if isinstance(image, MetaTensor) else image.contiguous(),
        "raters": torch.as_tensor(case["raters"]).as_subclass(torch.Tensor).contiguous(),
        "affine": torch.as_tensor(np.asarray(image.affine), dtype=torch.float64),
        "original_affine": case["original_affine"],
        "original_shape": list(case["original_shape"]),
        "case_id": case["case_id"],
        "rater_names": list(case["rater_names"]),
        "image_file": str(image.meta.get("filename_or_obj", "")),
        "checksums": {},
    }


def from_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A case dict from a payload.

    Returns ``{"image": MetaTensor (K, *spatial) float32, "raters": Tensor (R, *spatial) uint8, "case_id": str,
    "rater_names": list[str]}``; the image meta holds ``affine`` (preprocessed grid), ``original_affine`` and
    ``spatial_shape`` (stored grid) and ``filename_or_obj``.
    """
    meta = {
        "original_affine": payload["original_affine"].numpy(),
        "spatial_shape": np.asarray(payload["original_shape"], dtype=np.int64),
        "filename_or_obj": payload["image_file"],
    }
    image = MetaTensor(payload["image"], affine=payload["affine"], meta=meta)
    return {
        "image": image,
        "raters": payload["raters"],
        "case_id": payload["case_id"],
        "rater_names": list(payload["rater_names"]),
    }


class PreprocessedCases:
    """Callable that turns a :class:`CaseRecord` into a preprocessed case, through the on-disk cache.

    Args:
        num_classes: declared number of classes (label values must lie in ``0..num_classes-1``).
        spatial_dims: 2 or 3.
        settings: the preprocessing settings.
        cache_dir: cache root, or ``None`` to preprocess on every call.
        in_channels: the image channels the manifest declares (checked on load when given).

    ``hits`` and ``misses`` count cache use in this process; ``key`` is the JSON-able description of the
    cached content (preprocessing settings, classes, dims).
    """

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int,
        settings: PreprocessSettings,
        cache_dir: str | os.PathLike | None,
        in_channels: int | None = None,
    ):
        settings.check_dims(spatial_dims)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.settings = settings
        self.key = {**settings.key(), "num_classes": num_classes, "spatial_dims": spatial_dims, "cache_format": 1}
        self.cache = CaseCache(cache_dir, self.key) if cache_dir is not None else None
        self.hits = 0
        self.misses = 0

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        """Load, check and preprocess ``record`` (or read it from the cache); see :func:`from_payload`."""
        payload = self.cache.read(record) if self.cache is not None else None
        if payload is not None:
            self.hits += 1
            return from_payload(payload)
        self.misses += 1
        case = data_io.load_case(
            record, num_classes=self.num_classes, spatial_dims=self.spatial_dims, in_channels=self.in_channels
        )
        payload = to_payload(preprocess_case(case, self.settings, self.spatial_dims))
        if self.cache is not None:
            self.cache.write(record, payload)
        return from_payload(payload)

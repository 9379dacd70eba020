"""Reading cases (image + every rater's label map) through MONAI readers, with geometry and value checks.

Geometry tolerance: a rater mask matches its image when the spatial shapes are equal and every element of
the two 4x4 affines differs by at most :data:`AFFINE_ATOL_MM` (1e-3 mm), which absorbs float32 header
round-off but no real misregistration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from monai.transforms import LoadImage

from medjdt.data.atomic import atomic_write
from medjdt.data.kits import REGION_LABELS, annotation_files
from medjdt.data.manifest import CaseRecord

AFFINE_ATOL_MM = 1e-3
# Label files are read in slabs of about this many voxels, so that float64 masks (KiTS) never exist
# in memory at full size.
_SLAB_VOXELS = 1 << 22


class LabelMapReader(NibabelReader):
    """A MONAI NIfTI reader for label maps: returns ``uint8`` data, read slab by slab along the last axis.

    Masks stored as floating point (e.g. KiTS23 float64 instance masks with an undefined scaling slope) are
    accepted when every value is a finite integer in 0..255; anything else raises ``ValueError`` naming the
    file. Peak memory is one slab of the stored type plus the ``uint8`` result.
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("keep_file_open", True)  # forward slab reads of .nii.gz decompress each byte once
        super().__init__(**kwargs)

    def _get_array_data(self, img, filename):
        proxy = img.dataobj
        shape = tuple(proxy.shape)
        out = np.empty(shape, dtype=np.uint8, order="F")
        if len(shape) == 0 or out.size == 0:
            return out
        step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[:-1]))))
        for start in range(0, shape[-1], step):
            slab = np.asanyarray(proxy[..., start : start + step])
            _check_label_values(slab, filename)
            out[..., start : start + step] = slab
        return out


def _check_label_values(values: np.ndarray, filename: str | os.PathLike) -> None:
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise ValueError(f"label file {filename}: non-integer values such as {values[bad][:5].tolist()}")
    elif not np.issubdtype(values.dtype, np.integer) and values.dtype != np.bool_:
        raise ValueError(f"label file {filename}: unsupported data type {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"label file {filename}: values outside 0..255 ({values.min()}..{values.max()})")


# The reader is passed at call time so that LoadImage lets the reader's own error through.
_IMAGE = (LoadImage(image_only=True, dtype=np.float32), NibabelReader())
_LABEL = (LoadImage(image_only=True, dtype=None), LabelMapReader())


def _load(how: tuple[LoadImage, NibabelReader], path: Path, what: str, case_id: str) -> MetaTensor:
    if not path.exists():
        raise ValueError(f"case {case_id!r}: {what} file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"case {case_id!r}: {what} path {path} is not a file")
    loader, reader = how
    try:
        return loader(str(path), reader=reader)
    except ValueError as err:
        raise ValueError(f"case {case_id!r}: {err}") from err
    except Exception as err:  # nibabel/gzip/zlib raise many types for unreadable or truncated files
        raise ValueError(f"case {case_id!r}: cannot read {what} file {path}: {type(err).__name__}: {err}") from err


def read_image(
    path: str | os.PathLike, *, case_id: str, spatial_dims: int, in_channels: int | None = None
) -> MetaTensor:
    """Read an image as a float32 ``MetaTensor`` of shape ``(K, *spatial)``.

    ``K`` is 1 for a plain volume; a stored array with one more axis than ``spatial_dims`` is taken to be
    channels-last (NIfTI convention, e.g. QUBIQ brain-tumour's four MR sequences). Raises ``ValueError``
    naming the case and file when it is missing, unreadable, has an unexpected number of axes, has ``K`` other
    than ``in_channels`` (when given: the channels the manifest declares), or holds NaN/inf values.
    """
    path = Path(path)
    img = _load(_IMAGE, path, "image", case_id)
    if img.ndim == spatial_dims:
        img = img.unsqueeze(0)
    elif img.ndim == spatial_dims + 1:
        img = img.movedim(-1, 0)
    else:
        raise ValueError(
            f"case {case_id!r}: image {path} has shape {tuple(img.shape)}, expected {spatial_dims} spatial axes "
            "(optionally plus a trailing channel axis)"
        )
    if in_channels is not None and img.shape[0] != in_channels:
        raise ValueError(
            f"case {case_id!r}: image {path} has {img.shape[0]} channel(s) (shape {tuple(img.shape[1:])}), but the "
            f"manifest declares in_channels={in_channels}"
        )
    if not torch.isfinite(img).all():
        bad = int((~torch.isfinite(img)).sum())
        raise ValueError(f"case {case_id!r}: image {path} contains {bad} NaN/inf value(s)")
    return img.contiguous()


def _label_spatial(label: MetaTensor, spatial_dims: int, path: Path, case_id: str) -> MetaTensor:
    if label.ndim == spatial_dims + 1 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != spatial_dims:
        raise ValueError(
            f"case {case_id!r}: label file {path} has shape {tuple(label.shape)}, expected {spatial_dims} spatial axes"
        )
    return label


def _affine_text(affine: np.ndarray) -> str:
    """A 4x4 affine on one line: its three top rows."""
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(affine)[:3]) + "]"


def _check_geometry(label: MetaTensor, image: MetaTensor, label_path: Path, image_path: Path, case_id: str) -> None:
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"case {case_id!r}: shape mismatch between image {image_path} {tuple(image.shape[1:])} "
            f"and label {label_path} {tuple(label.shape)}"
        )
    a = np.asarray(label.affine, dtype=np.float64)
    b = np.asarray(image.affine, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
        raise ValueError(
            f"case {case_id!r}: label {label_path} is not on the grid of image {image_path}: their affines differ "
            f"by up to {worst:.4g} mm (tolerance {AFFINE_ATOL_MM} mm); image affine {_affine_text(b)}, label affine "
            f"{_affine_text(a)}"
        )


def read_label_map(
    path: str | os.PathLike, *, rater: str, case_id: str, image: MetaTensor, image_path: str | os.PathLike
) -> MetaTensor:
    """Read one rater's label map as a ``uint8`` ``MetaTensor`` of shape ``spatial`` (the image's grid).

    ``path`` is a NIfTI label map, or a KiTS21/23 instance folder from which annotation number ``rater`` is
    assembled (see :mod:`medjdt.data.kits`). Every file read is checked against ``image`` (``(K, *spatial)``):
    same spatial shape and affine within :data:`AFFINE_ATOL_MM`, else ``ValueError`` naming both files.
    """
    path, image_path = Path(path), Path(image_path)
    spatial_dims = image.ndim - 1
    if not path.is_dir():
        label = _label_spatial(_load(_LABEL, path, f"rater {rater!r} label", case_id), spatial_dims, path, case_id)
        _check_geometry(label, image, path, image_path, case_id)
        return label
    try:
        annotation = int(rater)
    except ValueError:
        raise ValueError(
            f"case {case_id!r}: rater {rater!r} must be an annotation number to assemble KiTS instances from {path}"
        ) from None
    out = None
    for f in annotation_files(path, annotation, case_id):
        mask = _label_spatial(_load(_LABEL, f.path, "instance", case_id), spatial_dims, f.path, case_id)
        _check_geometry(mask, image, f.path, image_path, case_id)
        if mask.max() > 1:
            raise ValueError(f"case {case_id!r}: instance mask {f.path} is not binary (max {int(mask.max())})")
        if out is None:
            out = torch.zeros_like(mask)
        out[mask.bool()] = REGION_LABELS[f.region]
    return out


def load_case(
    record: CaseRecord, *, num_classes: int, spatial_dims: int, in_channels: int | None = None
) -> dict[str, Any]:
    """Read a case: image and every rater's label map on one checked grid.

    Returns ``{"image": MetaTensor (K, *spatial) float32, "raters": MetaTensor (R, *spatial) uint8,
    "case_id": str, "rater_names": list[str]}`` with ``R = len(record.raters)``. Raises ``ValueError``
    naming the case and file for a missing or unreadable file, NaN/inf intensities, a shape or affine
    mismatch between image and a rater, label values outside ``0..num_classes-1``, or an image whose channel
    count is not ``in_channels`` (when given).
    """
    if not record.labels:
        raise ValueError(f"case {record.case_id!r} has no annotation")
    image = read_image(record.image, case_id=record.case_id, spatial_dims=spatial_dims, in_channels=in_channels)
    maps = []
    for rater, label_path in zip(record.raters, record.labels):
        label = read_label_map(label_path, rater=rater, case_id=record.case_id, image=image, image_path=record.image)
        top = int(label.max())
        if top >= num_classes:
            values = sorted(int(v) for v in torch.unique(label) if v >= num_classes)
            raise ValueError(
                f"case {record.case_id!r}: rater {rater!r} label {label_path} has values {values} outside the "
                f"declared classes 0..{num_classes - 1}"
            )
        maps.append(label.as_tensor())
    raters = MetaTensor(torch.stack(maps), affine=image.affine, meta={"filename_or_obj": str(record.labels[0])})
    return {"image": image, "raters": raters, "case_id": record.case_id, "rater_names": list(record.raters)}


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``array`` (``spatial`` or ``(*spatial, C)`` channels-last, NIfTI order) with ``affine`` atomically.

    ``dtype`` (default: the array's) is the on-disk type. Returns the path.
    """
    array = np.asarray(array)
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=suffix)

"""Synthetic multi-rater CT phantoms: the embedded dataset for the demo and the tests (no download).

Each case is a CT-like volume (HU, int16) on an anisotropic grid with a realistic affine: air around an
elliptic body of soft tissue with a fat rim, smooth low-frequency background variation and Gaussian noise,
an organ (label 1) of random shape and a lesion (label 2) of random size inside it. Raters disagree the way
real raters do: rater ``j`` has a systematic boundary offset (under-segmenters shrink, over-segmenters grow
the structures, from -3.5% to +3.5% of the organ's radius across raters) plus smooth random boundary noise
(3% of that radius); on the small lesion the same offsets are a larger fraction of its size, so raters
disagree more there. ``dims=2`` writes single 2D slices
(QUBIQ-like). Everything is a function of ``seed`` and the case index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medjdt.data.io import write_nifti
from medjdt.data.layouts import build_manifest
from medjdt.validation import check_choice, check_number

# Rater disagreement, as fractions of the organ's radius (the same absolute size on organ and lesion).
_RATER_BIAS = 0.035
_BOUNDARY_NOISE = 0.03


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int = 5) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``shape / cells`` voxels."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, *[cells] * len(shape))).astype(np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    field = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0, 0].numpy()
    return (field - field.mean()) / (field.std() + 1e-8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def make_phantom_case(
    rng: np.random.Generator, shape: Sequence[int], raters: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """One phantom: ``(image HU int16 (*shape), [rater label map uint8 (*shape)] * raters, affine 4x4)``."""
    dims = len(shape)
    in_plane = rng.uniform(0.7, 1.0)
    thickness = float(rng.choice([2.0, 2.5, 3.0]))
    spacing = np.array([in_plane, in_plane, thickness][:dims])
    extent = spacing * np.array(shape)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # (dims, *shape) in mm, centred

    # Body: elliptic cylinder (in-plane), soft tissue with a fat rim.
    body_r = np.sqrt((coords[0] / (0.46 * extent[0])) ** 2 + (coords[1] / (0.42 * extent[1])) ** 2)
    # Organ: perturbed ellipsoid, implicit function scaled to approximate mm distance near its surface.
    semi = extent * np.concatenate([rng.uniform(0.2, 0.28, 2), rng.uniform(0.25, 0.35, dims - 2)])
    centre = extent * rng.uniform(-0.05, 0.05, dims)
    scale = semi[:2].mean()
    rel = (coords - centre.reshape(-1, *[1] * dims)) / semi.reshape(-1, *[1] * dims)
    organ_sdf = (np.sqrt((rel**2).sum(0)) - 1.0) * scale + 0.08 * scale * _smooth_field(rng, shape, 4)
    # Lesion: a sphere (in mm) of random size inside the organ.
    radius = scale * rng.uniform(0.2, 0.5)
    direction = rng.standard_normal(dims)
    direction /= np.linalg.norm(direction)
    lesion_centre = centre + direction * rng.uniform(0.0, 0.5) * np.maximum(semi - radius, 0.0)
    lesion_sdf = np.sqrt(((coords - lesion_centre.reshape(-1, *[1] * dims)) ** 2).sum(0)) - radius

    # CT-like intensities with partial-volume edges.
    edge = 0.5 * in_plane
    hu = np.full(shape, -1000.0)
    tissue = 40.0 + 15.0 * _smooth_field(rng, shape, 3)
    body = _sigmoid((1.0 - body_r) * 40.0)
    fat = _sigmoid((body_r - 0.9) * 60.0)
    hu = hu * (1 - body) + body * (tissue * (1 - fat) - 100.0 * fat)
    organ_w = _sigmoid(-organ_sdf / edge)
    hu = hu * (1 - organ_w) + organ_w * (100.0 + 8.0 * _smooth_field(rng, shape, 6))
    lesion_w = _sigmoid(-lesion_sdf / edge)
    hu = hu * (1 - lesion_w) + lesion_w * rng.uniform(30.0, 60.0)
    hu += rng.normal(0.0, 12.0, size=shape)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)

    biases = scale * _RATER_BIAS * (np.linspace(-1.0, 1.0, raters) if raters > 1 else np.zeros(1))
    noise = scale * _BOUNDARY_NOISE
    maps = []
    for bias in biases:
        organ = organ_sdf < bias + noise * _smooth_field(rng, shape, 6)
        lesion = lesion_sdf < bias + noise * _smooth_field(rng, shape, 8)
        label = np.zeros(shape, dtype=np.uint8)
        label[organ] = 1
        label[lesion] = 2
        maps.append(label)

    # Typical CT storage: x and y axes point to patient left/posterior (negative in RAS).
    affine = np.diag([-spacing[0], -spacing[1], spacing[2] if dims == 3 else thickness, 1.0])
    affine[:dims, 3] = extent / 2 * np.array([1, 1, -1][:dims]) + rng.uniform(-20, 20, dims)
    return image, maps, affine


def make_phantom_dataset(
    out_dir: str | os.PathLike,
    cases: int = 24,
    raters: int = 3,
    shape: Sequence[int] = (48, 48, 48),
    dims: int = 3,
    seed: int = 0,
    folds: int | None = None,
) -> Path:
    """Write a multi-rater phantom dataset and its manifest; returns the manifest path (``out_dir/manifest.csv``).

    Files: ``out_dir/case_NNN/image.nii.gz`` (int16 HU, ``shape``) and ``rater-J.nii.gz`` (uint8, 0 background,
    1 organ, 2 lesion), J = 1..``raters``. ``shape`` must have ``dims`` (2 or 3) entries, each >= 8. The folds
    (``folds``-fold by case; default 5, or one fold per case when there are fewer) are drawn with ``seed``.
    Raises ``ValueError`` for bad arguments.
    """
    shape = tuple(int(s) for s in shape)
    dims = check_choice("dims", dims, (2, 3), where="make_phantom_dataset")
    if len(shape) != dims or min(shape) < 8:
        raise ValueError(f"shape {list(shape)} must have {dims} entries, each >= 8")
    cases = check_number("cases", cases, low=1, integer=True, where="make_phantom_dataset")
    raters = check_number("raters", raters, low=1, integer=True, where="make_phantom_dataset")
    folds = min(5, cases) if folds is None else folds
    if cases < folds:
        raise ValueError(f"cannot split {cases} case(s) into {folds} folds")
    out_dir = Path(out_dir)
    width = max(3, len(str(cases - 1)))
    planned = {f"case_{i:0{width}d}" for i in range(cases)}
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name not in planned)
        if others:
            raise ValueError(f"{out_dir} already holds other folders {others[:5]}; use an empty or dedicated folder")
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(cases)):
        image, maps, affine = make_phantom_case(np.random.default_rng(child), shape, raters)
        case_dir = out_dir / f"case_{i:0{width}d}"
        for j, label in enumerate(maps, start=1):
            write_nifti(label, affine, case_dir / f"rater-{j}.nii.gz")
        write_nifti(image, affine, case_dir / "image.nii.gz")
    return build_manifest("demo", out_dir, out_dir / "manifest.csv", folds=folds, seed=seed)[0]

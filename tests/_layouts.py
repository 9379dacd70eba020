"""Miniature copies of public dataset layouts (real file names and nesting, tiny volumes) for the data tests.

The KiTS21/23 builder reproduces the real files' quirks (see ``shared/realdata/README.md``): instance masks
stored as float64 with an undefined scaling slope, slice axis first, strongly anisotropic spacing.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

# KiTS-like grid: slice axis first (5 mm), 0.8 mm in plane, axes pointing to -S, -A, -R like the real files.
KITS_AFFINE = np.array(
    [[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0], [-5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
)
CT_AFFINE = np.diag([-0.75, -0.75, 2.5, 1.0])


def save(array: np.ndarray, affine: np.ndarray, path: Path, kits_quirks: bool = False) -> Path:
    """Write a NIfTI file; ``kits_quirks`` stores float64 with an undefined slope and only an sform (code 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kits_quirks:
        img = nib.Nifti1Image(np.asarray(array, dtype=np.float64), affine)
        img.header.set_qform(None, code=0)
        img.header.set_sform(affine, code=2)
        img.header["scl_slope"] = np.nan
        img.header["scl_inter"] = np.nan
    else:
        img = nib.Nifti1Image(np.asarray(array), affine)
    nib.save(img, path)
    return path


def ct_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A small CT-like int16 volume (HU)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(40, 30, size=shape), -1000, 1000).astype(np.int16)


def box_mask(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    """Binary mask that is 1 on ``[lo, hi)`` per axis."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return mask


def make_kits21(root: Path, instance_dir: str = "instances", shape: tuple[int, int, int] = (6, 16, 16)) -> dict:
    """Two KiTS21/23-style cases; returns the expected rater label maps per case as ``{case: {rater: array}}``.

    case_00000: two kidneys and a tumour inside kidney 1, three annotations each.
    case_00001: one kidney with a cyst and a tumour that overlap (tumour must win), three annotations.
    """
    expected: dict[str, dict[str, np.ndarray]] = {}
    for c, case in enumerate(["case_00000", "case_00001"]):
        case_dir = root / case
        save(ct_volume(shape, c), KITS_AFFINE, case_dir / "imaging.nii.gz")
        expected[case] = {}
        for j in (1, 2, 3):
            grow = j - 2  # annotation 1 under-, 3 over-segments
            kidney1 = box_mask(shape, (1, 2, 2), (5, 8 + grow, 8))
            tumour = box_mask(shape, (2, 3, 3), (4, 5 + max(grow, 0), 5))
            files = {f"kidney_instance-1_annotation-{j}": kidney1, f"tumor_instance-1_annotation-{j}": tumour}
            label = np.zeros(shape, np.uint8)
            label[kidney1 > 0] = 1
            if c == 0:
                kidney2 = box_mask(shape, (1, 10, 9), (5, 14, 14 + grow))
                files[f"kidney_instance-2_annotation-{j}"] = kidney2
                label[kidney2 > 0] = 1
            else:
                cyst = box_mask(shape, (2, 4, 4), (5, 7, 7))
                files[f"cyst_instance-1_annotation-{j}"] = cyst
                label[cyst > 0] = 3
            label[tumour > 0] = 2
            for name, mask in files.items():
                save(mask, KITS_AFFINE, case_dir / instance_dir / f"{name}.nii.gz", kits_quirks=True)
            expected[case][str(j)] = label
        # The published aggregate is ignored by the kits21 layout (every annotation is a rater).
        save(expected[case]["2"], KITS_AFFINE, case_dir / "segmentation.nii.gz")
    return expected


def make_kits19(root: Path, shape: tuple[int, int, int] = (6, 12, 12), unlabelled: int = 0) -> dict:
    """Three labelled KiTS19 cases (+ ``unlabelled`` imaging-only test cases); returns ``{case: label}``."""
    labels = {}
    for i in range(3 + unlabelled):
        case_dir = root / f"case_{i:05d}"
        save(ct_volume(shape, i), KITS_AFFINE, case_dir / "imaging.nii.gz")
        if i < 3:
            label = box_mask(shape, (1, 2, 2), (5, 9, 9))
            label[2:4, 4:6, 4:6] = 2
            save(label, KITS_AFFINE, case_dir / "segmentation.nii.gz")
            labels[case_dir.name] = label
    return labels


def make_lits(root: Path, shape: tuple[int, int, int] = (12, 12, 5)) -> dict:
    """LiTS cases split over two batch folders (uncompressed ``.nii``); returns ``{case_id: (volume, seg)}``."""
    files = {}
    for n, batch in ((0, "Training Batch 1"), (1, "Training Batch 1"), (10, "Training Batch 2")):
        label = box_mask(shape, (2, 2, 1), (9, 9, 4))
        label[4:6, 4:6, 2] = 2
        vol = save(ct_volume(shape, n), CT_AFFINE, root / batch / f"volume-{n}.nii")
        seg = save(label, CT_AFFINE, root / batch / f"segmentation-{n}.nii")
        files[f"volume-{n}"] = (vol, seg)
    return files


def make_qubiq(root: Path) -> dict:
    """Two QUBIQ datasets: ``kidney`` (2D, one task, 3 raters) and ``pancreas`` (3D, one task, 2 raters), with
    Training and Validation cases; and ``brain-tumor`` (2D, 4-channel image, two tasks). Returns a summary
    ``{(dataset, task): {case_id: [rater, ...]}}``."""
    summary: dict[tuple[str, str], dict[str, list[str]]] = {}
    specs = {
        "kidney": ((20, 20), (), {"01": 3}),
        "pancreas": ((10, 10, 6), (), {"01": 2}),
        "brain-tumor": ((16, 16), (4,), {"01": 3, "02": 3}),
    }
    affine = np.diag([-0.9, -0.9, 1.0, 1.0])
    for dataset, (spatial, channels, tasks) in specs.items():
        for subset, cases in (("Training", ["case01", "case02", "case03"]), ("Validation", ["case01"])):
            for k, case in enumerate(cases):
                case_dir = root / dataset / subset / case
                image = np.random.default_rng(k).normal(size=spatial + channels).astype(np.float32)
                save(image, affine, case_dir / "image.nii.gz")
                for task, raters in tasks.items():
                    for r in range(1, raters + 1):
                        mask = box_mask(spatial, (2,) * len(spatial), tuple(s - 2 - r % 2 for s in spatial))
                        save(mask, affine, case_dir / f"task{task}_seg{r:02d}.nii.gz")
                        case_id = f"{subset.lower()}-{case}"
                        summary.setdefault((dataset, task), {}).setdefault(case_id, []).append(f"{r:02d}")
    return summary

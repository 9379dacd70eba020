"""Scan public datasets in their published layouts and write manifests.

Supported layouts (``layout`` argument of :func:`build_manifest`):

- ``qubiq``: ``<root>/<dataset>/{Training,Validation}/caseNN/image.nii.gz`` with rater masks
  ``taskTT_segRR.nii.gz``; ``root`` may also be one dataset folder. One manifest per dataset and task,
  binary classes; case ids ``training-case01`` / ``validation-case01``; rater ``RR``.
- ``lits``: ``volume-N.nii[.gz]`` / ``segmentation-N.nii[.gz]`` anywhere under ``root``; case id ``volume-N``;
  one rater ``1``; classes background, liver, tumor.
- ``kits19``: ``<root>/case_XXXXX/{imaging,segmentation}.nii.gz``; one rater ``1``; background, kidney, tumor.
  For KiTS, ``root`` may also be the published repository's root, the folder holding ``dataset/`` or ``data/``.
- ``kits21`` (alias ``kits23``): ``<root>/case_XXXXX/imaging.nii.gz`` with per-instance annotations in
  ``segmentations/`` or ``instances/``; one row per annotation number ``J`` whose ``label`` is the instance
  folder (rater ``J``'s map is assembled at load time, see :mod:`medjdt.data.kits`); background, kidney,
  tumor, cyst.
- ``demo``: the phantom layout written by :func:`medjdt.data.phantoms.make_phantom_dataset`:
  ``<root>/case_NNN/image.nii.gz`` and ``rater-J.nii.gz``; background, organ, lesion.
- ``folders``: your own data in the same shape: one folder per case holding ``image.nii.gz`` and one
  ``rater-<name>.nii.gz`` label map per rater (``<name>``: letters, digits, ``_`` or ``-``; raters may differ
  between cases); the class names and the modality are given when the manifest is built.

A case with an image but no annotation (KiTS19 and LiTS ship unlabelled test cases) is handled by the
``unlabelled`` policy: ``"error"`` (default) fails naming the case; ``"skip"`` leaves it out; ``"include"``
writes it as an unlabelled row (empty ``label`` and ``rater``) for semi-supervised training. Either way the
metadata lists it under ``unlabelled_cases``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from medjdt.data import kits
from medjdt.data.manifest import assign_folds, write_manifest
from medjdt.data.names import LAYOUTS, UNLABELLED_POLICIES
from medjdt.validation import check_choice

QUBIQ_MODALITY = {
    "brain-growth": "MRI",
    "brain-tumor": "MRI",
    "prostate": "MRI",
    "kidney": "CT",
    "pancreas": "CT",
    "pancreatic-lesion": "CT",
}
DEMO_CLASS_NAMES = ["background", "organ", "lesion"]

_CASE_DIR_RE = re.compile(r"^case_\d{5}$")
_QUBIQ_CASE_RE = re.compile(r"^case\d+$")
_QUBIQ_MASK_RE = re.compile(r"^task(\d+)_seg(\d+)\.nii(\.gz)?$")
_LITS_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_DEMO_RATER_RE = re.compile(r"^rater-(\d+)\.nii\.gz$")
_FOLDERS_RATER_RE = re.compile(r"^rater-([A-Za-z0-9_\-]+)\.nii\.gz$")


@dataclass
class ManifestSpec:
    """What one manifest will hold: its rows (without folds), metadata, and a name suffix."""

    rows: list[dict[str, Any]]
    num_classes: int
    class_names: list[str]
    modality: str
    spatial_dims: int
    in_channels: int = 1
    suffix: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    unlabelled_rows: list[dict[str, Any]] = field(default_factory=list)


def _unlabelled(spec: ManifestSpec, policy: str, case_id: str, image: Path, where: Path, **columns: Any) -> None:
    """Apply the ``unlabelled`` policy to a case that has ``image`` but no annotation (looked for at ``where``)."""
    if policy == "error":
        raise ValueError(
            f"case {case_id!r} has no annotation ({where}); pass unlabelled='skip' (--allow-unlabelled) to leave "
            "it out or unlabelled='include' (--include-unlabelled) to keep it as an unlabelled case"
        )
    spec.unlabelled.append(case_id)
    if policy == "include":
        spec.unlabelled_rows.append({"case_id": case_id, "image": image, "label": "", "rater": "", **columns})


def _kits_data_folder(root: Path) -> Path:
    """``root`` itself, or its ``dataset/`` (KiTS21/23) or ``data/`` (KiTS19) folder when ``root`` is the
    published repository's root."""
    if any(_CASE_DIR_RE.match(p.name) for p in root.iterdir() if p.is_dir()):
        return root
    for name in ("dataset", "data"):
        inner = root / name
        if inner.is_dir() and any(_CASE_DIR_RE.match(p.name) for p in inner.iterdir() if p.is_dir()):
            return inner
    return root


def _scan_kits_cases(root: Path) -> list[Path]:
    root = _kits_data_folder(root)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and _CASE_DIR_RE.match(p.name))
    if not cases:
        raise ValueError(f"no case_XXXXX folders under {root} (nor under its dataset/ or data/ folder)")
    for case in cases:
        if not (case / "imaging.nii.gz").is_file():
            raise ValueError(f"case {case.name!r}: image file {case / 'imaging.nii.gz'} does not exist")
    return cases


def _scan_kits19(root: Path, policy: str) -> list[ManifestSpec]:
    spec = ManifestSpec([], 3, ["background", "kidney", "tumor"], "CT", 3)
    for case in _scan_kits_cases(root):
        seg = case / "segmentation.nii.gz"
        if not seg.is_file():
            _unlabelled(spec, policy, case.name, case / "imaging.nii.gz", seg)
            continue
        spec.rows.append({"case_id": case.name, "image": case / "imaging.nii.gz", "label": seg, "rater": "1"})
    return [spec]


def _scan_kits21(root: Path, policy: str) -> list[ManifestSpec]:
    spec = ManifestSpec([], 4, list(kits.CLASS_NAMES), "CT", 3)
    for case in _scan_kits_cases(root):
        instance_dir = kits.find_instance_dir(case)
        numbers = kits.annotation_numbers(instance_dir) if instance_dir is not None else []
        if not numbers:
            _unlabelled(spec, policy, case.name, case / "imaging.nii.gz", case / "instances")
            continue
        for j in numbers:
            kits.annotation_files(instance_dir, j, case.name)  # every instance must have annotation j
            spec.rows.append(
                {"case_id": case.name, "image": case / "imaging.nii.gz", "label": instance_dir, "rater": str(j)}
            )
    return [spec]


def _scan_lits(root: Path, policy: str) -> list[ManifestSpec]:
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for p in sorted(root.rglob("*.nii*")):
        m = _LITS_RE.match(p.name)
        if not m or not p.is_file():
            continue
        kind, n = m.group(1), int(m.group(2))
        if n in found[kind]:
            raise ValueError(f"{kind}-{n} appears twice under {root}: {found[kind][n]} and {p}")
        found[kind][n] = p
    if not found["volume"]:
        raise ValueError(f"no volume-N.nii files under {root}")
    orphans = sorted(set(found["segmentation"]) - set(found["volume"]))
    if orphans:
        raise ValueError(f"case 'volume-{orphans[0]}': {found['segmentation'][orphans[0]]} has no volume-{orphans[0]}")
    spec = ManifestSpec([], 3, ["background", "liver", "tumor"], "CT", 3)
    for n in sorted(found["volume"]):
        case_id = f"volume-{n}"
        if n not in found["segmentation"]:
            _unlabelled(spec, policy, case_id, found["volume"][n], found["volume"][n])
            continue
        spec.rows.append(
            {"case_id": case_id, "image": found["volume"][n], "label": found["segmentation"][n], "rater": "1"}
        )
    return [spec]


def _qubiq_geometry(image: Path, mask: Path) -> tuple[int, int]:
    """(spatial_dims, in_channels) of a QUBIQ dataset from one image/mask pair's headers."""
    img_shape = tuple(nib.load(image).shape)
    mask_shape = tuple(nib.load(mask).shape)
    if img_shape == mask_shape:
        if len(img_shape) == 3 and img_shape[-1] == 1:
            return 2, 1
        if len(img_shape) in (2, 3):
            return len(img_shape), 1
    elif len(img_shape) == 3 and img_shape[:-1] == mask_shape[:2] and mask_shape[2:] in ((), (1,)):
        return 2, img_shape[-1]
    raise ValueError(f"image {image} {img_shape} and mask {mask} {mask_shape} do not share a spatial grid")


def _scan_qubiq(root: Path, policy: str) -> list[ManifestSpec]:
    def has_subsets(d: Path) -> bool:
        return (d / "Training").is_dir() or (d / "Validation").is_dir()

    datasets = [root] if has_subsets(root) else sorted(d for d in root.iterdir() if d.is_dir() and has_subsets(d))
    if not datasets:
        raise ValueError(f"no QUBIQ dataset folders (with Training/ or Validation/) under {root}")
    specs = []
    for dataset in datasets:
        # task -> rows; case ids per task; every case seen
        by_task: dict[str, list[dict[str, Any]]] = {}
        cases: list[tuple[str, Path, dict[str, list[tuple[str, Path]]]]] = []
        for subset in ("Training", "Validation"):
            folder = dataset / subset
            if not folder.is_dir():
                continue
            for case in sorted(p for p in folder.iterdir() if p.is_dir() and _QUBIQ_CASE_RE.match(p.name)):
                case_id = f"{subset.lower()}-{case.name}"
                image = case / "image.nii.gz"
                if not image.is_file():
                    raise ValueError(f"case {case_id!r} of {dataset.name}: image file {image} does not exist")
                masks: dict[str, list[tuple[str, Path]]] = {}
                for p in sorted(case.iterdir()):
                    m = _QUBIQ_MASK_RE.match(p.name)
                    if m:
                        masks.setdefault(m.group(1), []).append((m.group(2), p))
                cases.append((case_id, image, masks))
                for task, raters in masks.items():
                    for rater, path in raters:
                        by_task.setdefault(task, []).append(
                            {"case_id": case_id, "image": image, "label": path, "rater": rater, "subset": subset}
                        )
        if not cases:
            raise ValueError(f"no caseNN folders in QUBIQ dataset {dataset}")
        if not by_task:
            raise ValueError(f"QUBIQ dataset {dataset} has no taskTT_segRR masks")
        for task in sorted(by_task):
            first = by_task[task][0]
            spatial_dims, in_channels = _qubiq_geometry(first["image"], first["label"])
            spec = ManifestSpec(
                rows=by_task[task],
                num_classes=2,
                class_names=["background", f"{dataset.name}-task{task}"],
                modality=QUBIQ_MODALITY.get(dataset.name, "unknown"),
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                suffix=f"_{dataset.name}_task{task}",
                extra={"dataset": dataset.name, "task": task},
            )
            for case_id, image, masks in cases:
                if task not in masks:
                    where = image.parent / f"task{task}_seg*.nii.gz"
                    _unlabelled(spec, policy, case_id, image, where, subset=case_id.split("-", 1)[0].capitalize())
            specs.append(spec)
    return specs


def _scan_case_folders(
    root: Path, policy: str, class_names: list[str], modality: str, rater_re: re.Pattern
) -> list[ManifestSpec]:
    cases = sorted(p for p in root.iterdir() if p.is_dir() and (p / "image.nii.gz").is_file())
    if not cases:
        raise ValueError(f"no case folders with image.nii.gz under {root}")
    spatial_dims = len(nib.load(cases[0] / "image.nii.gz").shape)
    spec = ManifestSpec([], len(class_names), list(class_names), modality, spatial_dims)

    def natural(name: str) -> tuple:  # rater-2 before rater-10
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))

    for case in cases:
        raters = sorted(
            ((m.group(1), p) for p in case.iterdir() if (m := rater_re.match(p.name))), key=lambda t: natural(t[0])
        )
        if not raters:
            _unlabelled(spec, policy, case.name, case / "image.nii.gz", case)
            continue
        for name, p in raters:
            spec.rows.append({"case_id": case.name, "image": case / "image.nii.gz", "label": p, "rater": name})
    return [spec]


def _scan_demo(root: Path, policy: str) -> list[ManifestSpec]:
    return _scan_case_folders(root, policy, list(DEMO_CLASS_NAMES), "CT", _DEMO_RATER_RE)


_SCANNERS = {
    "qubiq": _scan_qubiq,
    "lits": _scan_lits,
    "kits19": _scan_kits19,
    "kits21": _scan_kits21,
    "kits23": _scan_kits21,
    "demo": _scan_demo,
}


def scan_layout(
    layout: str,
    root: str | os.PathLike,
    unlabelled: str = "error",
    classes: list[str] | None = None,
    modality: str = "CT",
) -> list[ManifestSpec]:
    """Scan ``root`` in the published ``layout``; one :class:`ManifestSpec` per manifest to write.

    ``unlabelled`` is the policy for cases without annotation: ``"error"``, ``"skip"`` or ``"include"`` (see the
    module docstring). ``classes`` (background first) and ``modality`` describe a ``folders`` dataset; the
    published layouts know their own.

    Raises ``ValueError`` for an unknown layout or policy, a missing root, an image that is missing, a case with
    no annotation (policy ``"error"``), and layout-specific inconsistencies, naming the case and file.
    """
    check_choice("layout", layout, LAYOUTS)
    check_choice("unlabelled", unlabelled, UNLABELLED_POLICIES)
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a folder")
    if layout == "folders":
        if not classes or len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(
                f"layout 'folders' needs --classes: at least 2 distinct names, background first, got {classes}"
            )
        specs = _scan_case_folders(root, unlabelled, list(classes), str(modality), _FOLDERS_RATER_RE)
    else:
        if classes is not None:
            raise ValueError(f"layout {layout!r} names its own classes; --classes is for layout 'folders'")
        specs = _SCANNERS[layout](root, unlabelled)
    for spec in specs:
        if not spec.rows:
            raise ValueError(f"no annotated cases found under {root} for layout {layout!r}{spec.suffix}")
    return specs


def build_manifest(
    layout: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    folds: int | None = None,
    seed: int = 0,
    unlabelled: str = "error",
    classes: list[str] | None = None,
    modality: str = "CT",
) -> list[Path]:
    """Scan ``root`` in ``layout`` and write manifest(s) with deterministic K-fold by case; returns their paths.

    ``out`` is the manifest CSV (its metadata goes to the same name with ``.json``). QUBIQ writes one manifest
    per dataset and task, named ``<out stem>_<dataset>_task<TT>.csv`` next to ``out``. Folds come from
    :func:`medjdt.data.manifest.assign_folds` (all raters of a case share the fold); ``folds`` defaults to 5, or to
    the number of labelled cases when there are fewer (an explicit ``folds`` larger than that is an error).
    ``unlabelled``: policy for
    cases without annotation (``"error"``, ``"skip"``, ``"include"``); included unlabelled cases are dealt into
    folds separately, so the labelled cases' folds are those of ``"skip"``. ``classes`` and ``modality``: see
    :func:`scan_layout`.
    """
    out = Path(out)
    if out.suffix != ".csv":
        raise ValueError(f"manifest path {out} must end with .csv")
    specs = scan_layout(layout, root, unlabelled, classes, modality)
    written = []
    for spec in specs:
        case_ids = [r["case_id"] for r in spec.rows]
        spec_folds = min(5, len(set(case_ids))) if folds is None else folds
        fold_of = assign_folds(case_ids, spec_folds, seed)
        if spec.unlabelled_rows:
            unlabelled_ids = [r["case_id"] for r in spec.unlabelled_rows]
            fold_of.update(assign_folds(unlabelled_ids, spec_folds, seed, allow_empty_folds=True))
        rows = [{**r, "fold": fold_of[r["case_id"]]} for r in spec.rows + spec.unlabelled_rows]
        path = out.with_name(f"{out.stem}{spec.suffix}.csv")
        extra = {
            "layout": layout,
            "source_root": os.path.abspath(root),
            "fold_seed": seed,
            "unlabelled_cases": spec.unlabelled,
            **spec.extra,
        }
        written.append(
            write_manifest(
                rows,
                path,
                num_classes=spec.num_classes,
                class_names=spec.class_names,
                modality=spec.modality,
                spatial_dims=spec.spatial_dims,
                in_channels=spec.in_channels,
                num_folds=spec_folds,
                extra_metadata=extra,
            )
        )
    return written

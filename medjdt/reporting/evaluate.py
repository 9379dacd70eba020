"""``medjdt evaluate``: metrics of saved probability maps against the raters, next to the inter-rater baseline.

For every case, the model's probabilities are compared with (``predictor="model"``):

* ``reference="mean"``: the mean of the raters (soft reference);
* ``reference="majority"``: the raters' majority vote (hard; ties go to the lower label);
* ``reference="rater"``: each rater separately (the rater named in the ``rater`` column);
* ``reference="others_mean"`` / ``"others_majority"``: the mean / majority of every rater except ``rater``.

The inter-rater baseline (``predictor="rater"``) compares each rater, as a 0/1 prediction, with the mean and the
majority of the other raters (``others_mean`` / ``others_majority``). Rows with the same ``reference`` and
``rater`` measure the model and the left-out rater against the very same reference, so model-vs-rater agreement
reads directly against rater-vs-rater agreement. ``predictor="raters", reference="pairwise"`` is the mean over
every pair of raters of one rater's metrics against the other (the inter-rater ceiling of the ``reference="rater"``
rows, which average the model against each rater). Cases with a single rater have no leave-one-out or pairwise rows.

Every figure here is on the case's original grid (``grid`` column) and per case. Overlap metrics follow the one
rule of :mod:`medjdt.metrics.overlap` for a class absent from the reference (left out, NaN); the voxels predicted
for such a class are counted in ``absent_fp_voxels`` and, with the voxel size of the image, ``absent_fp_ml``. For a
KiTS manifest (layout ``kits21``/``kits23``) the rows against the majority vote and the pairwise rows also hold the
challenge's own scores (:mod:`medjdt.metrics.kits`: Dice and surface Dice of the regions kidney+masses, masses and
tumour, with the challenge's rule for empty regions).

Every row holds the per-case metrics of :mod:`medjdt.metrics`: ``dice`` and ``iou`` (argmax prediction against
the hard reference, or the argmax of a soft one), ``soft_dice`` and ``thresholded_dice``, ``ece``,
``ece_classwise``, ``brier`` and ``nll``, plus their per-class columns ``<metric>/<class>`` (overlap metrics over
the foreground classes). Calibration of a rater is that of a 0/1 predictor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medjdt._paths import child_path
from medjdt._progress import progress
from medjdt.data.io import AFFINE_ATOL_MM, load_case
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest
from medjdt.labels import fuse
from medjdt.metrics import CalibrationMetrics, SegmentationMetrics
from medjdt.metrics.kits import kits_scores
from medjdt.runs import read_record

KEY_COLUMNS = ("case_id", "predictor", "rater", "reference")
PROBABILITY_SUFFIX = "_probs.nii.gz"


def compare(
    probs: torch.Tensor, reference: torch.Tensor, *, case_id: str, class_names: Sequence[str], n_bins: int = 15
) -> dict[str, float]:
    """Every per-case metric of one prediction against one reference.

    Args:
        probs: probabilities ``(1, C, *spatial)`` summing to 1 over C.
        reference: hard labels ``(1, *spatial)`` (integer) or a soft reference ``(1, C, *spatial)``.
        case_id: the case, named in error messages.
        class_names: the C class names (background first), used in the per-class column names.
        n_bins: confidence bins of the calibration errors.

    Returns:
        ``{metric: value}`` with the columns of :meth:`~medjdt.metrics.SegmentationMetrics.per_case` (without
        ``case_id``): those of ``OverlapMetrics.per_case``, then those of ``CalibrationMetrics.per_case``.

    Raises:
        ValueError: from the metrics, naming the case (shapes, NaN, values outside [0, 1], sums other than 1).
    """
    metrics = SegmentationMetrics(len(class_names), n_bins=n_bins, class_names=class_names)
    metrics.update(probs, reference, case_ids=[case_id])
    return metrics.per_case().drop(columns="case_id").iloc[0].to_dict()


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map ``(*spatial)`` -> ``(1, C, *spatial)`` float32."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 0)[None].float()


def _leave_one_out(raters: torch.Tensor, index: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Mean ``(1, C, *spatial)`` and majority ``(1, *spatial)`` of every rater but ``index``."""
    others = torch.cat([raters[:index], raters[index + 1 :]])
    return {
        "others_mean": fuse(others, "mean", num_classes)[None],
        "others_majority": fuse(others, "majority", num_classes).argmax(0)[None],
    }


def _pairwise(rows: list[dict[str, object]]) -> dict[str, object]:
    """The mean of every numeric value over ``rows`` (NaN left out; NaN when every value is)."""
    frame = pd.DataFrame(rows).select_dtypes("number")
    return frame.mean(skipna=True).to_dict()


def evaluate_case(
    probs: torch.Tensor,
    raters: torch.Tensor,
    rater_names: Sequence[str],
    *,
    case_id: str,
    class_names: Sequence[str],
    n_bins: int = 15,
    voxel_ml: float | None = None,
    kits_spacing: Sequence[float] | None = None,
) -> list[dict[str, object]]:
    """Model-vs-raters and rater-vs-raters rows of one case (row kinds in the module docstring).

    Args:
        probs: the model's probabilities ``(1, C, *spatial)``.
        raters: the raters' label maps ``(R, *spatial)`` (integer, values in ``[0, C)``).
        rater_names: the R rater names.
        case_id: the case.
        class_names: the C class names.
        n_bins: confidence bins of the calibration errors.
        voxel_ml: the volume of one voxel in mL; adds ``absent_fp_ml`` (and per class) to every row.
        kits_spacing: the voxel size in mm per array axis of a KiTS case; adds the KiTS region scores to the
            majority and pairwise rows.

    Returns:
        One dict per row, with :data:`KEY_COLUMNS`, ``grid`` and the metrics of :func:`compare`.
    """
    num_classes = len(class_names)
    if raters.shape[0] != len(rater_names):
        raise ValueError(f"case {case_id!r}: {raters.shape[0]} rater maps but {len(rater_names)} rater names")

    def row(predictor: str, rater: str, reference_name: str, prediction: torch.Tensor, reference: torch.Tensor):
        values = compare(prediction, reference, case_id=case_id, class_names=class_names, n_bins=n_bins)
        if voxel_ml is not None:
            for key in [k for k in values if k.startswith("absent_fp_voxels")]:
                values[key.replace("absent_fp_voxels", "absent_fp_ml")] = float(values[key]) * voxel_ml
        head = {"case_id": case_id, "predictor": predictor, "rater": rater, "reference": reference_name}
        return {**head, "grid": "original", **values}

    def kits(prediction: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return {} if kits_spacing is None else kits_scores(prediction, reference, kits_spacing)

    majority = fuse(raters, "majority", num_classes).argmax(0)
    predicted_labels = probs[0].argmax(0)
    rows = [
        row("model", "", "mean", probs, fuse(raters, "mean", num_classes)[None]),
        {**row("model", "", "majority", probs, majority[None]), **kits(predicted_labels, majority)},
    ]
    for index, name in enumerate(rater_names):
        rows.append(row("model", name, "rater", probs, raters[index][None].long()))
        if raters.shape[0] < 2:
            continue
        references = _leave_one_out(raters, index, num_classes)
        rater_probs = _one_hot(raters[index], num_classes)
        for reference_name, reference in references.items():
            rows.append(row("model", name, reference_name, probs, reference))
            rows.append(row("rater", name, reference_name, rater_probs, reference))
    if raters.shape[0] >= 2:
        pairs = []
        for i in range(raters.shape[0]):
            for j in range(i + 1, raters.shape[0]):
                pair = row("rater", rater_names[i], "rater", _one_hot(raters[i], num_classes), raters[j][None].long())
                pairs.append({**pair, **kits(raters[i], raters[j])})
        head = {"case_id": case_id, "predictor": "raters", "rater": "", "reference": "pairwise", "grid": "original"}
        rows.append({**head, **_pairwise(pairs)})
    return rows


def read_probabilities(path: Path, *, case_id: str, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Read a ``predict`` probability map and check it lies on the grid of the case's image.

    Args:
        path: ``<case_id>_probs.nii.gz``: float, ``(*spatial, C)`` channels-last (NIfTI order).
        case_id: the case, named in error messages.
        image: the case's image as from :func:`medjdt.data.load_case`, ``(K, *spatial)`` with an ``affine``.
        num_classes: C.

    Returns:
        float32 ``(1, C, *spatial)``.

    Raises:
        ValueError: naming the case and file when the map is missing or unreadable, or its shape, channel count or
            affine (tolerance :data:`~medjdt.data.io.AFFINE_ATOL_MM`) differs from the image's.
    """
    if not path.is_file():
        raise ValueError(f"case {case_id!r}: no prediction {path}")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel/gzip/zlib raise many types for unreadable or truncated files
        raise ValueError(f"case {case_id!r}: cannot read prediction {path}: {type(err).__name__}: {err}") from err
    spatial = tuple(image.shape[1:])
    expected = (*spatial, num_classes)
    if data.shape != expected:
        raise ValueError(
            f"case {case_id!r}: prediction {path} has shape {data.shape}, but the case's image grid and classes "
            f"need {expected} (spatial shape {spatial}, {num_classes} channels last)"
        )
    image_affine = np.asarray(image.affine, dtype=np.float64)
    if not np.allclose(img.affine, image_affine, rtol=0.0, atol=AFFINE_ATOL_MM):
        raise ValueError(
            f"case {case_id!r}: prediction {path} is not on the case's image grid (affine differs by more than "
            f"{AFFINE_ATOL_MM} mm):\n{np.round(img.affine, 4)}\nvs image\n{np.round(image_affine, 4)}"
        )
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))[None]


def _records(manifest_path: str | os.PathLike, folds: Iterable[int] | None) -> tuple[Manifest, list[CaseRecord]]:
    manifest = read_manifest(manifest_path)
    records = manifest.cases(folds)
    if not records:
        raise ValueError(f"manifest {manifest.path}: no cases in folds {sorted(folds or [])}")
    return manifest, records


def predicted_cases(predictions: str | os.PathLike) -> list[str] | None:
    """The case ids ``medjdt predict`` recorded for a predictions folder, or None when it recorded none.

    ``predict`` writes ``run.json`` (see :mod:`medjdt.runs.record`) into the folder it claims, which holds the
    ``predictions/`` folder (or is the folder itself with ``--prediction_writer.output_dir``)."""
    folder = Path(predictions)
    for candidate in (folder, folder.parent):
        record = read_record(candidate)
        if record is not None and record.get("kind") == "predict" and isinstance(record.get("cases"), list):
            if record.get("predictions") and Path(record["predictions"]).resolve() != folder.resolve():
                continue
            return [str(c) for c in record["cases"]]
    return None


def evaluate_predictions(
    manifest: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    folds: Iterable[int] | None = None,
    n_bins: int = 15,
    case_views: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Evaluate the probability maps in ``predictions`` (``<case_id>_probs.nii.gz``, as written by
    ``medjdt predict``) against the raters of the cases of ``manifest``: those of ``folds`` when given, else the
    cases ``medjdt predict`` recorded for the folder (:func:`predicted_cases`), else every case. With
    ``case_views`` (a folder), the best, median and worst case by Dice against the majority vote are drawn there
    (:func:`medjdt.reporting.case_views.write_case_views`).

    Returns:
        One row per (case, comparison), sorted by :data:`KEY_COLUMNS`; row kinds and metrics in the module
        docstring.

    Raises:
        ValueError: naming the case, for a case without prediction, a prediction whose grid (shape, affine) or
            channel count differs from the case's image, invalid probabilities, or any error of
            :func:`medjdt.data.load_case`; and for a bad manifest or an empty fold selection.
    """
    return evaluate_with_reliability(manifest, predictions, folds=folds, n_bins=n_bins, case_views=case_views)[0]


def _evaluated_records(manifest_data: Manifest, records: list[CaseRecord], directory: Path,
                       wanted: list[int] | None) -> list[CaseRecord]:
    if not directory.is_dir():
        raise ValueError(f"predictions folder {directory} does not exist")
    cases = predicted_cases(directory) if wanted is None else None
    if cases is None:
        return records
    by_id = {r.case_id: r for r in records}
    unknown = [c for c in cases if c not in by_id]
    if unknown:
        raise ValueError(
            f"predictions folder {directory} holds predictions of case(s) {unknown[:5]} that manifest "
            f"{manifest_data.path} does not have: predicted from another manifest?"
        )
    records = [by_id[c] for c in cases if by_id[c].labelled]
    if not records:
        raise ValueError(f"predictions folder {directory}: none of its cases has annotations to compare with")
    return records


def evaluate_with_reliability(
    manifest: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    folds: Iterable[int] | None = None,
    n_bins: int = 15,
    case_views: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`evaluate_predictions`, plus the reliability bins of the model against the mean of the raters pooled
    over every evaluated voxel (columns ``bin_lower, bin_upper, count, confidence, accuracy``), from one pass."""
    wanted = None if folds is None else list(folds)
    manifest_data, records = _records(manifest, wanted)
    directory = Path(predictions)
    records = _evaluated_records(manifest_data, records, directory, wanted)
    is_kits = manifest_data.metadata.get("layout") in ("kits21", "kits23") and manifest_data.spatial_dims == 3
    calibration = CalibrationMetrics(manifest_data.num_classes, n_bins=n_bins)
    rows = []
    for record in progress(records, desc="evaluate"):
        case = load_case(record, num_classes=manifest_data.num_classes, spatial_dims=manifest_data.spatial_dims)
        probs = read_probabilities(
            child_path(directory, f"{record.case_id}{PROBABILITY_SUFFIX}", "case_id"),
            case_id=record.case_id,
            image=case["image"],
            num_classes=manifest_data.num_classes,
        )
        raters = case["raters"].as_tensor()
        affine = np.asarray(case["image"].affine, dtype=np.float64)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)[: manifest_data.spatial_dims]
        rows += evaluate_case(
            probs, raters, record.raters, case_id=record.case_id, class_names=manifest_data.class_names,
            n_bins=n_bins, voxel_ml=float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0,
            kits_spacing=tuple(float(v) for v in spacing) if is_kits else None,
        )
        calibration.update(probs, fuse(raters, "mean", manifest_data.num_classes)[None], case_ids=[record.case_id])
    frame = pd.DataFrame(rows).sort_values(list(KEY_COLUMNS), ignore_index=True)
    if case_views is not None:
        from medjdt.reporting.case_views import write_case_views  # it draws with matplotlib and reads this module

        write_case_views(frame, manifest_data, records, directory, case_views)
    return frame, calibration.reliability()


def inter_rater_agreement(
    manifest: str | os.PathLike,
    case_ids: Iterable[str] | None = None,
    *,
    n_bins: int = 15,
) -> pd.DataFrame:
    """Per case, how well the raters agree with each other: the mean over raters of each rater's metrics against
    the majority vote of the others (``reference="others_majority"`` rows of :func:`evaluate_case`).

    Args:
        manifest: the dataset manifest.
        case_ids: the cases (default: every case of the manifest).
        n_bins: confidence bins of the calibration errors.

    Returns:
        One row per case with ``case_id``, ``n_raters`` and the mean over raters of ``dice``, ``iou``,
        ``soft_dice`` and ``brier``.

    Raises:
        ValueError: a case id not in the manifest, a case with fewer than two raters, or a case that cannot be read.
    """
    manifest_data, records = _records(manifest, None)
    by_id = {r.case_id: r for r in records}
    wanted = list(by_id) if case_ids is None else list(case_ids)
    unknown = sorted(set(wanted) - set(by_id))
    if unknown:
        raise ValueError(f"manifest {manifest_data.path} has no case(s) {unknown[:10]}")
    rows = []
    for case_id in wanted:
        record = by_id[case_id]
        if len(record.raters) < 2:
            raise ValueError(f"case {case_id!r} has a single rater: no inter-rater agreement")
        raters = load_case(record, num_classes=manifest_data.num_classes, spatial_dims=manifest_data.spatial_dims)[
            "raters"
        ].as_tensor()
        num_classes = manifest_data.num_classes
        values = []
        for index in range(raters.shape[0]):
            reference = _leave_one_out(raters, index, num_classes)["others_majority"]
            prediction = _one_hot(raters[index], num_classes)
            values.append(
                compare(prediction, reference, case_id=case_id, class_names=manifest_data.class_names, n_bins=n_bins)
            )
        frame = pd.DataFrame(values)
        rows.append(
            {
                "case_id": case_id,
                "n_raters": len(values),
                **{m: frame[m].mean() for m in ("dice", "iou", "soft_dice", "brier")},
            }
        )
    return pd.DataFrame(rows)

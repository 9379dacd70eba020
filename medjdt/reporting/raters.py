"""``medjdt raters``: how much the raters of a dataset disagree, before any training, and whether one is an outlier.

Every labelled case with at least two raters is read once (in parallel with ``workers``) and scored per foreground
class:

* **Pairwise Dice** of every pair of raters, with the absent-class rule of :mod:`medjdt.metrics.overlap` applied
  to the pair: a class enters the pair's score in a case when at least one of the two raters marks it (NaN, left
  out of every mean, when neither does; 0 when only one does). Where the second rater marks the class the value
  is :func:`medjdt.metrics.dice` of the first against the second, the very number of the pairwise rows of
  ``medjdt evaluate`` (which, scoring one rater against the other as the reference, leaves the class out when
  only the first rater marks it).
* **Pairwise HD95** in mm (:func:`monai.metrics.compute_hausdorff_distance`, 95th percentile of the symmetric
  surface distances, voxel size from the image's affine), where both raters mark the class; NaN otherwise.
* **STAPLE sensitivity and specificity** of each rater (SimpleITK's ``STAPLEImageFilter``, one class against the
  rest, at most :data:`medjdt.labels.staple.MAX_ITERATIONS` iterations), NaN where no rater marks the class or
  every rater marks every voxel.
* Per case: the **agreement** (mean over the classes marked by some rater of the mean pairwise Dice),
  ``disagreement = 1 - agreement``, and the fraction of the foreground voxels (marked as foreground by at least
  one rater) on which the raters do not all give the same label.

Per class, the pairwise matrices are means over cases; a rater's **mean Dice** is the mean of its row of the Dice
matrix (its agreement with each other rater). **Outlier rule** (:func:`flag_outliers`, at least 3 raters): a
rater is an outlier on a class when its disagreement with the others (1 - its mean Dice) is at least
``factor`` times the disagreement among the other raters (1 - the mean Dice of the pairs it is not part of: leave
it out) and its mean Dice is at least ``min_gap`` below theirs. With two raters no one can be singled out.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medjdt._progress import progress
from medjdt.data.io import load_case
from medjdt.data.manifest import CaseRecord, Manifest, read_manifest
from medjdt.labels.staple import MAX_ITERATIONS
from medjdt.metrics import dice
from medjdt.validation import check_number

OUTLIER_FACTOR = 2.0
"""An outlier disagrees with the others at least this many times as much as they disagree among themselves."""
OUTLIER_MIN_GAP = 0.05
"""... and its mean Dice is at least this far below the mean Dice among the others."""


@dataclass(frozen=True)
class RaterAgreement:
    """What :func:`rater_agreement` found.

    Attributes:
        pairs: per case, class and pair of raters (``rater_a`` before ``rater_b`` in the case's rater order):
            ``case_id, class, rater_a, rater_b, dice, hd95``.
        staple: per case, class and rater: ``case_id, class, rater, sensitivity, specificity``.
        cases: per case: ``case_id, raters, agreement, disagreement, disagreeing_fraction, foreground_voxels,
            rank`` (1 = the most disagreement; cases without any marked class last) and ``dice/<class>`` (the
            mean pairwise Dice of each class), sorted by rank.
        raters: the rater names, in the order of their first appearance in the manifest.
        classes: the foreground class names.
        single_rater_cases: the labelled cases left out because they have one rater.
    """

    pairs: pd.DataFrame
    staple: pd.DataFrame
    cases: pd.DataFrame
    raters: list[str]
    classes: list[str]
    single_rater_cases: list[str]


def _spacing(affine: np.ndarray, spatial_dims: int) -> tuple[float, ...]:
    """The voxel size in mm along each array axis (the column norms of the affine), as ``medjdt evaluate``."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)[:spatial_dims])


def _hd95(a: torch.Tensor, b: torch.Tensor, spacing: Sequence[float]) -> float:
    """MONAI's symmetric 95th-percentile Hausdorff distance (mm) of two non-empty bool masks ``(*spatial)``."""
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own surface-distance code still passes; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            a[None, None].float(), b[None, None].float(), include_background=True, percentile=95,
            spacing=list(spacing),
        )
    return float(value[0, 0])


def _staple(masks: np.ndarray) -> tuple[list[float], list[float]]:
    """STAPLE sensitivity and specificity of each of the binary masks ``(R, *spatial)`` (NaN when undefined)."""
    count = masks.shape[0]
    if not masks.any() or masks.all():
        return [float("nan")] * count, [float("nan")] * count
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    staple.SetMaximumIterations(MAX_ITERATIONS)
    staple.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks])
    return [float(v) for v in staple.GetSensitivity()], [float(v) for v in staple.GetSpecificity()]


def case_agreement(
    raters: torch.Tensor,
    rater_names: Sequence[str],
    *,
    case_id: str,
    class_names: Sequence[str],
    spacing: Sequence[float],
) -> tuple[list[dict], list[dict], dict]:
    """The rater agreement of one case (definitions in the module docstring).

    Args:
        raters: the raters' label maps ``(R, *spatial)`` (integer, values in ``[0, C)``), R >= 2.
        rater_names: the R rater names.
        case_id: the case, named in error messages and in the rows.
        class_names: the C class names, background first.
        spacing: the voxel size in mm along each spatial axis.

    Returns:
        ``(pair rows, STAPLE rows, case row)`` with the columns of :class:`RaterAgreement`'s ``pairs``, ``staple``
        and ``cases`` (without ``rank``).

    Raises:
        ValueError: fewer than two raters, or not as many names as maps.
    """
    count, num_classes = raters.shape[0], len(class_names)
    if count < 2 or count != len(rater_names):
        raise ValueError(f"case {case_id!r}: {count} rater map(s) and {len(rater_names)} name(s); need 2 or more")
    labels = raters.long()
    present = torch.stack([torch.bincount(r.flatten(), minlength=num_classes)[:num_classes] > 0 for r in labels])
    pairs = []
    for i in range(count):
        one_hot = F.one_hot(labels[i], num_classes).movedim(-1, 0)[None].float()
        for j in range(i + 1, count):
            scores = dice(one_hot, labels[j][None])[0]  # NaN where rater j lacks the class
            for c in range(1, num_classes):
                value = float(scores[c - 1]) if present[j, c] else (0.0 if present[i, c] else float("nan"))
                both = bool(present[i, c] and present[j, c])
                hd95 = _hd95(labels[i] == c, labels[j] == c, spacing) if both else float("nan")
                pairs.append({"case_id": case_id, "class": class_names[c], "rater_a": rater_names[i],
                              "rater_b": rater_names[j], "dice": value, "hd95": hd95})
    staple = []
    numpy_labels = labels.numpy()
    for c in range(1, num_classes):
        sensitivity, specificity = _staple(numpy_labels == c)
        staple += [{"case_id": case_id, "class": class_names[c], "rater": name, "sensitivity": sens,
                    "specificity": spec} for name, sens, spec in zip(rater_names, sensitivity, specificity)]
    per_class = pd.DataFrame(pairs).groupby("class", sort=False)["dice"].mean()
    foreground = (labels > 0).any(0)
    split = foreground & ~(labels == labels[0]).all(0)
    voxels = int(foreground.sum())
    row = {
        "case_id": case_id,
        "raters": count,
        "agreement": float(per_class.mean()) if per_class.notna().any() else float("nan"),
        "disagreeing_fraction": float(split.sum()) / voxels if voxels else float("nan"),
        "foreground_voxels": voxels,
        **{f"dice/{name}": float(value) for name, value in per_class.items()},
    }
    row["disagreement"] = 1.0 - row["agreement"]
    return pairs, staple, row


def _score_case(record: CaseRecord, manifest: Manifest) -> tuple[list[dict], list[dict], dict]:
    case = load_case(record, num_classes=manifest.num_classes, spatial_dims=manifest.spatial_dims)
    return case_agreement(
        case["raters"].as_tensor(), record.raters, case_id=record.case_id, class_names=manifest.class_names,
        spacing=_spacing(case["image"].affine, manifest.spatial_dims),
    )


def rater_agreement(manifest: str | os.PathLike, *, workers: int = 1) -> RaterAgreement:
    """Score the agreement of the raters of every labelled case of ``manifest`` with two or more raters.

    Args:
        manifest: the dataset manifest CSV.
        workers: cases read and scored at the same time (threads); 1 reads one after the other.

    Returns:
        :class:`RaterAgreement`.

    Raises:
        ValueError: a bad manifest, no case with two or more raters, or a case that cannot be read (naming it).
    """
    workers = check_number("workers", workers, low=1, integer=True, where="rater_agreement")
    data = read_manifest(manifest)
    labelled = data.cases(labelled=True)
    records = [r for r in labelled if len(r.raters) >= 2]
    if not records:
        raise ValueError(f"manifest {data.path}: no case has two or more raters, so there is no agreement to measure")
    if workers == 1:
        results = list(progress((_score_case(r, data) for r in records), total=len(records), desc="raters"))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = pool.map(_score_case, records, itertools.repeat(data))
            results = list(progress(jobs, total=len(records), desc="raters"))
    cases = pd.DataFrame([row for _, _, row in results])
    cases["rank"] = cases["disagreement"].rank(method="first", ascending=False, na_option="bottom").astype(int)
    columns = ["case_id", "raters", "agreement", "disagreement", "disagreeing_fraction", "foreground_voxels", "rank"]
    cases = cases[columns + [c for c in cases.columns if c not in columns]].sort_values("rank", ignore_index=True)
    return RaterAgreement(
        pairs=pd.DataFrame([p for pairs, _, _ in results for p in pairs]),
        staple=pd.DataFrame([s for _, staple, _ in results for s in staple]),
        cases=cases,
        raters=list(dict.fromkeys(name for r in records for name in r.raters)),
        classes=list(data.class_names[1:]),
        single_rater_cases=[r.case_id for r in labelled if len(r.raters) < 2],
    )


def pairwise_table(agreement: RaterAgreement, metric: str) -> pd.DataFrame:
    """The pairwise matrix of ``metric`` (``"dice"`` or ``"hd95"``) per class in long form.

    Returns:
        ``class, rater_a, rater_b, value, cases``: every ordered pair of different raters (the matrix is
        symmetric), ``value`` the mean over the ``cases`` cases where the pair's value is defined (NaN when none).
    """
    rows = []
    for name in agreement.classes:
        of_class = agreement.pairs[agreement.pairs["class"] == name]
        for a, b in itertools.permutations(agreement.raters, 2):
            values = of_class.loc[((of_class["rater_a"] == a) & (of_class["rater_b"] == b))
                                  | ((of_class["rater_a"] == b) & (of_class["rater_b"] == a)), metric].dropna()
            rows.append({"class": name, "rater_a": a, "rater_b": b,
                         "value": float(values.mean()) if len(values) else float("nan"), "cases": len(values)})
    return pd.DataFrame(rows, columns=["class", "rater_a", "rater_b", "value", "cases"])


def flag_outliers(
    raters: pd.DataFrame, *, factor: float = OUTLIER_FACTOR, min_gap: float = OUTLIER_MIN_GAP
) -> pd.Series:
    """The outlier rule of the module docstring, on rows with ``mean_dice`` and ``others_dice``; False when the
    others' Dice is undefined (fewer than 3 raters)."""
    factor = check_number("factor", factor, low=1, where="flag_outliers")
    min_gap = check_number("min_gap", min_gap, low=0, high=1, where="flag_outliers")
    mean, others = raters["mean_dice"], raters["others_dice"]
    flagged = ((1.0 - mean) >= factor * (1.0 - others)) & ((others - mean) >= min_gap)
    return flagged & mean.notna() & others.notna()


def rater_table(
    agreement: RaterAgreement, *, factor: float = OUTLIER_FACTOR, min_gap: float = OUTLIER_MIN_GAP
) -> pd.DataFrame:
    """Per class and rater: ``mean_dice`` (mean of its row of the Dice matrix), ``others_dice`` (mean Dice of the
    pairs without it), ``mean_hd95`` (mm), ``staple_sensitivity`` and ``staple_specificity`` (means over cases),
    ``cases`` (cases it annotated) and ``outlier`` (:func:`flag_outliers`)."""
    dice_pairs, hd95_pairs = pairwise_table(agreement, "dice"), pairwise_table(agreement, "hd95")
    staple = agreement.staple.groupby(["class", "rater"])[["sensitivity", "specificity"]].mean()
    annotated = agreement.staple.groupby(["class", "rater"])["case_id"].nunique()
    rows = []
    for name, rater in itertools.product(agreement.classes, agreement.raters):
        of_class = dice_pairs[dice_pairs["class"] == name]
        others = of_class[(of_class["rater_a"] != rater) & (of_class["rater_b"] != rater)]
        hd95 = hd95_pairs[(hd95_pairs["class"] == name) & (hd95_pairs["rater_a"] == rater)]["value"]
        rows.append({
            "class": name,
            "rater": rater,
            "mean_dice": of_class[of_class["rater_a"] == rater]["value"].mean(),
            "others_dice": others["value"].mean(),
            "mean_hd95": hd95.mean(),
            "staple_sensitivity": staple["sensitivity"].get((name, rater), float("nan")),
            "staple_specificity": staple["specificity"].get((name, rater), float("nan")),
            "cases": int(annotated.get((name, rater), 0)),
        })
    table = pd.DataFrame(rows)
    table["outlier"] = flag_outliers(table, factor=factor, min_gap=min_gap)
    return table

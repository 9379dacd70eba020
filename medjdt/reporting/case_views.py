"""Case views: the cases behind an evaluation's numbers, drawn (the best, the median and the worst by Dice).

One PNG per chosen case, two rows of three panels:

* row 1: the axial slice where the raters disagree on the most voxels (voxels where not every rater gives the
  same label); row 2: the axial slice with the most prediction errors (voxels where the argmax of the
  probabilities differs from the raters' majority vote). Ties go to the lowest slice; a volume without any
  disagreement (or error) shows the slice with the most foreground in the majority vote instead, and says so;
* left: the image (first channel) in the display window (CT: the recorded HU window of the run when known, else
  [-200, 300]; other modalities: the 1st-99th percentile of the volume), each rater's contour of each foreground
  class in the rater's colour (one line style per class) and the prediction's contour in white;
* middle: the predictive uncertainty, the entropy of the probabilities over log C (in [0, 1]); read from
  ``<case_id>_uncertainty.nii.gz`` beside the probabilities when that file exists, else computed from them;
* right: the rater disagreement, the fraction of raters whose label differs from the majority vote.

Display: every volume is reoriented to the closest RAS+ orientation of its affine (as nibabel's
``as_closest_canonical``: axes permuted and flipped, never resampled), so the axial slice is the last axis, x runs
towards the subject's right on screen (neurological convention) and y towards anterior (up). Axes are in mm:
voxel centres at the world coordinates of the reoriented affine's origin plus index times spacing. A 2-D case is
one axial slice. The slice index in the titles counts in the reoriented volume; ``z`` is its world coordinate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medjdt._paths import child_path
from medjdt.data.io import load_case
from medjdt.data.manifest import CaseRecord, Manifest
from medjdt.labels import fuse
from medjdt.reporting.evaluate import PROBABILITY_SUFFIX, read_probabilities
from medjdt.reporting.plots import save_figure
from medjdt.runs import read_record

__all__ = [
    "DEFAULT_CT_WINDOW",
    "RANKS",
    "ViewCase",
    "case_view_figure",
    "display_window",
    "load_view_case",
    "normalised_entropy",
    "recorded_window",
    "select_cases",
    "view_slices",
    "write_case_views",
]

RANKS = ("best", "median", "worst")
DEFAULT_CT_WINDOW = (-200.0, 300.0)
UNCERTAINTY_SUFFIX = "_uncertainty.nii.gz"
_RATER_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:pink",
                  "tab:olive", "tab:brown", "gold")
_CLASS_STYLES = ("solid", "dashed", "dotted", "dashdot")
PREDICTION_COLOUR = "white"
K = TypeVar("K", bound=Hashable)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy over log C: ``(C, *spatial)`` probabilities -> ``(*spatial)`` in [0, 1]."""
    entropy = np.zeros(probs.shape[1:], dtype=np.float32)
    for p in np.asarray(probs, dtype=np.float32):  # one class at a time: a CT volume in float64 takes GBs
        entropy -= p * np.log(np.where(p > 0, p, np.float32(1)))
    return np.clip(entropy / np.float32(math.log(probs.shape[0])), 0.0, 1.0)


def select_cases(dice: Mapping[K, float]) -> dict[str, K]:
    """The best, median and worst key by Dice: ``{"best": key, "median": key, "worst": key}``.

    Keys are sorted by (Dice, key) ascending, NaN Dice left out (a case without foreground in the reference);
    worst is the first, best the last and median the ``(n - 1) // 2``-th (the lower middle for even n). A case is
    drawn once: with fewer than three keys the ranks it would share go to best, then worst (so one key is only
    "best", two are "best" and "worst"); with none the result is empty.
    """
    order = sorted((float(v), k) for k, v in dice.items() if v is not None and math.isfinite(float(v)))
    if not order:
        return {}
    chosen: dict[str, K] = {}
    for rank, key in (("best", order[-1][1]), ("worst", order[0][1]), ("median", order[(len(order) - 1) // 2][1])):
        if key not in chosen.values():
            chosen[rank] = key
    return chosen


def view_slices(raters: np.ndarray, predicted: np.ndarray, majority: np.ndarray) -> dict[str, int]:
    """The axial slices (last axis) to show: ``{"disagreement": k, "error": k}``.

    Args:
        raters: label maps ``(R, X, Y, Z)``.
        predicted: the argmax prediction ``(X, Y, Z)``.
        majority: the raters' majority vote ``(X, Y, Z)``.

    ``disagreement``: the slice with most voxels where not every rater gives the same label; ``error``: the slice
    with most voxels where ``predicted != majority``; ties go to the lowest slice; where every count is 0, the slice
    with the most foreground of ``majority``.
    """
    fallback = int(np.argmax((majority > 0).sum((0, 1))))
    counts = {"disagreement": (raters != raters[:1]).any(0).sum((0, 1)), "error": (predicted != majority).sum((0, 1))}
    return {name: int(np.argmax(c)) if c.max() > 0 else fallback for name, c in counts.items()}


def display_window(modality: str, image: np.ndarray, window: Sequence[float] | None = None) -> tuple[float, float]:
    """Intensity window of the image: CT -> ``window`` (default :data:`DEFAULT_CT_WINDOW`); other modalities -> the
    1st and 99th percentile of ``image`` (``window`` is ignored)."""
    if modality.strip().lower() == "ct":
        low, high = DEFAULT_CT_WINDOW if window is None else (float(window[0]), float(window[1]))
        return low, high
    low, high = (float(v) for v in np.percentile(image, [1, 99]))
    return (low, high) if high > low else (low, low + 1.0)


def recorded_window(predictions: str | os.PathLike) -> tuple[float, float] | None:
    """The CT window ``medjdt predict`` recorded (``inputs.data.window`` of ``run.json`` in the predictions folder
    or its parent, when ``inputs.data.intensity`` is ``"ct"``), else None."""
    folder = Path(predictions)
    for candidate in (folder, folder.parent):
        try:
            record = read_record(candidate)
        except ValueError:
            continue
        data = ((record or {}).get("inputs") or {}).get("data") or {}
        window = data.get("window")
        if data.get("intensity") == "ct" and isinstance(window, list) and len(window) == 2:
            return float(window[0]), float(window[1])
    return None


@dataclass(frozen=True)
class ViewCase:
    """One case to draw, on its original grid (any orientation; :func:`case_view_figure` reorients it).

    Attributes:
        case_id: the case.
        image: ``(X, Y, Z)`` (the first image channel).
        raters: ``(R, X, Y, Z)`` integer label maps.
        probs: ``(C, X, Y, Z)`` probabilities.
        affine: ``(4, 4)`` voxel -> world (mm) of the arrays.
        rater_names: the R rater names.
        class_names: the C class names, background first.
        modality: the manifest's modality (``"CT"``...).
        uncertainty: ``(X, Y, Z)`` normalised entropy, or None to compute it from ``probs``.
    """

    case_id: str
    image: np.ndarray
    raters: np.ndarray
    probs: np.ndarray
    affine: np.ndarray
    rater_names: tuple[str, ...]
    class_names: tuple[str, ...]
    modality: str
    uncertainty: np.ndarray | None = None


def _canonical(case: ViewCase) -> tuple[ViewCase, np.ndarray]:
    """``case`` reoriented to the closest RAS+ axes, and its new affine."""
    ornt = nib.orientations.io_orientation(case.affine)
    shape = case.image.shape

    def spatial(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    def channels(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(spatial(np.moveaxis(a, 0, -1)), -1, 0)

    affine = case.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    uncertainty = None if case.uncertainty is None else spatial(case.uncertainty)
    return ViewCase(case.case_id, spatial(case.image), channels(case.raters), channels(case.probs), affine,
                    case.rater_names, case.class_names, case.modality, uncertainty), affine


def _style(label: int) -> str:
    return _CLASS_STYLES[(label - 1) % len(_CLASS_STYLES)]


def _contour(ax, xs: np.ndarray, ys: np.ndarray, mask: np.ndarray, colour: str, style: str, gid: str,
             width: float) -> None:
    """Contour of a 2-D mask ``(X, Y)``, padded with background so that a mask touching the border is closed."""
    if not mask.any():
        return
    padded = np.pad(mask.astype(np.float32), 1)
    dx, dy = (xs[1] - xs[0] if len(xs) > 1 else 1.0), (ys[1] - ys[0] if len(ys) > 1 else 1.0)
    px = np.concatenate([[xs[0] - dx], xs, [xs[-1] + dx]])
    py = np.concatenate([[ys[0] - dy], ys, [ys[-1] + dy]])
    contours = ax.contour(px, py, padded.T, levels=[0.5], colors=[colour], linestyles=[style], linewidths=width)
    contours.set_gid(gid)


def case_view_figure(case: ViewCase, *, dice: float, window: Sequence[float] | None = None,
                     note: str = "") -> Figure:
    """The case view of ``case`` (layout in the module docstring).

    Args:
        case: the arrays of the case.
        dice: the Dice of the case shown in the title.
        window: the CT window (ignored for other modalities), default :data:`DEFAULT_CT_WINDOW`.
        note: appended to the title (e.g. the run, or where the Dice comes from).

    Returns:
        The figure. Each contour is a ``ContourSet`` with gid ``"rater=<name>/class=<class>"`` or
        ``"prediction/class=<class>"`` (absent where the mask is empty on the slice). The axes of row ``<row>``
        (``disagreement`` or ``error``) have the gids ``"image:<row>"`` (its title starts ``"slice <k> "``),
        ``"uncertainty:<row>"`` and ``"disagreement:<row>"``.

    Raises:
        ValueError: arrays whose shapes disagree, naming the case.
    """
    spatial = case.image.shape
    if case.image.ndim != 3 or case.raters.shape[1:] != spatial or case.probs.shape[1:] != spatial:
        raise ValueError(f"case {case.case_id!r}: image {spatial}, raters {case.raters.shape} and probabilities "
                         f"{case.probs.shape} must share the spatial shape (X, Y, Z)")
    if case.raters.shape[0] != len(case.rater_names) or case.probs.shape[0] != len(case.class_names):
        raise ValueError(f"case {case.case_id!r}: {case.raters.shape[0]} rater maps for {len(case.rater_names)} "
                         f"names, {case.probs.shape[0]} probability channels for {len(case.class_names)} classes")
    case, affine = _canonical(case)
    num_classes = len(case.class_names)
    majority = fuse(case.raters, "majority", num_classes).argmax(0).numpy()
    predicted = case.probs.argmax(0)
    entropy = normalised_entropy(case.probs) if case.uncertainty is None else case.uncertainty
    disagreement = (case.raters != majority[None]).mean(0)
    slices = view_slices(case.raters, predicted, majority)
    low, high = display_window(case.modality, case.image, window)

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    xs = affine[0, 3] + spacing[0] * np.arange(case.image.shape[0])
    ys = affine[1, 3] + spacing[1] * np.arange(case.image.shape[1])
    extent = (xs[0] - spacing[0] / 2, xs[-1] + spacing[0] / 2, ys[0] - spacing[1] / 2, ys[-1] + spacing[1] / 2)
    fig = Figure(figsize=(15, 9.5), layout="constrained")
    axes = fig.subplots(2, 3, width_ratios=[1.25, 1, 1], squeeze=False)
    rows = (("disagreement", "most rater disagreement", (case.raters != case.raters[:1]).any(0)),
            ("error", "largest prediction error", predicted != majority))
    for (name, what, voxels), (ax, ax_u, ax_d) in zip(rows, axes):
        k = slices[name]
        z = float((affine @ np.array([0.0, 0.0, k, 1.0]))[2])
        count = int(voxels[:, :, k].sum())
        suffix = "" if voxels.any() else " (none anywhere: most foreground instead)"
        ax.imshow(case.image[:, :, k].T, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent)
        for r, rater in enumerate(case.rater_names):
            for c in range(1, num_classes):
                _contour(ax, xs, ys, case.raters[r, :, :, k] == c, _RATER_COLOURS[r % len(_RATER_COLOURS)],
                         _style(c), f"rater={rater}/class={case.class_names[c]}",
                         1.2)
        for c in range(1, num_classes):
            _contour(ax, xs, ys, predicted[:, :, k] == c, PREDICTION_COLOUR, _style(c),
                     f"prediction/class={case.class_names[c]}", 1.8)
        ax.set_gid(f"image:{name}")
        ax.set_title(f"slice {k} (z = {z:.1f} mm): {what}, {count} voxels{suffix}", fontsize="medium")
        for panel, values, label, cmap in ((ax_u, entropy, "uncertainty: entropy / log C", "magma"),
                                           (ax_d, disagreement, "raters disagreeing with the majority", "viridis")):
            panel.set_gid(f"{'uncertainty' if panel is ax_u else 'disagreement'}:{name}")
            shown = panel.imshow(values[:, :, k].T, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", extent=extent)
            fig.colorbar(shown, ax=panel, shrink=0.8, label="fraction" if panel is ax_d else "normalised entropy")
            panel.set_title(f"slice {k}: {label}", fontsize="medium")
        for panel in (ax, ax_u, ax_d):
            panel.set_xlim(extent[0], extent[1])
            panel.set_ylim(extent[2], extent[3])
            panel.set_xlabel("x (mm, towards R)")
            panel.set_ylabel("y (mm, towards A)")
    handles = [Line2D([], [], color=_RATER_COLOURS[r % len(_RATER_COLOURS)], label=f"rater {n}")
               for r, n in enumerate(case.rater_names)]
    handles.append(Line2D([], [], color=PREDICTION_COLOUR, linewidth=1.8, label="prediction (argmax)"))
    handles += [Line2D([], [], color="black", linestyle=_style(c), label=f"class {case.class_names[c]}")
                for c in range(1, num_classes)]
    fig.legend(handles=handles, loc="outside right upper", facecolor="0.6", fontsize="small")
    title = f"case {case.case_id}: Dice {dice:.4f} vs majority vote"
    fig.suptitle(f"{title}; {note}" if note else title)
    return fig


def load_view_case(manifest: Manifest, record: CaseRecord, predictions: str | os.PathLike) -> ViewCase:
    """The arrays of ``record`` for :func:`case_view_figure`: its image and raters (:func:`medjdt.data.load_case`),
    its ``<case_id>_probs.nii.gz`` in ``predictions`` and, when present there, its ``<case_id>_uncertainty.nii.gz``.

    Raises:
        ValueError: naming the case or file, as :func:`~medjdt.reporting.evaluate.read_probabilities`, or an
            uncertainty map that is unreadable or not on the image's grid.
    """
    folder = Path(predictions)
    case = load_case(record, num_classes=manifest.num_classes, spatial_dims=manifest.spatial_dims)
    probs = read_probabilities(child_path(folder, f"{record.case_id}{PROBABILITY_SUFFIX}", "case_id"),
                               case_id=record.case_id, image=case["image"], num_classes=manifest.num_classes)[0]
    image = np.asarray(case["image"].as_tensor()[0], dtype=np.float32)
    raters = np.asarray(case["raters"].as_tensor(), dtype=np.int64)
    probs = probs.numpy()
    uncertainty = None
    path = child_path(folder, f"{record.case_id}{UNCERTAINTY_SUFFIX}", "case_id")
    if path.is_file():
        try:
            uncertainty = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        except Exception as err:  # nibabel/gzip raise many types for damaged files
            raise ValueError(f"case {record.case_id!r}: cannot read uncertainty map {path}: {err}") from err
        if uncertainty.shape != image.shape:
            raise ValueError(f"case {record.case_id!r}: uncertainty map {path} has shape {uncertainty.shape}, "
                             f"the image {image.shape}")
    if manifest.spatial_dims == 2:  # one axial slice
        image, raters, probs = image[..., None], raters[..., None], probs[..., None]
        uncertainty = None if uncertainty is None else uncertainty[..., None]
    return ViewCase(record.case_id, image, raters, probs, np.asarray(case["image"].affine, dtype=np.float64),
                    tuple(record.raters), tuple(manifest.class_names), manifest.modality, uncertainty)


def clear_views(out_dir: Path, prefix: str = "") -> None:
    """Remove the earlier ``<rank>_<prefix>*.png`` of ``out_dir``, so that the folder shows one evaluation only."""
    for rank in RANKS:
        for old in out_dir.glob(f"{rank}_{prefix}*.png"):
            old.unlink(missing_ok=True)


def write_case_views(
    evaluation: pd.DataFrame,
    manifest: Manifest,
    records: Sequence[CaseRecord],
    predictions: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    window: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<rank>_<case_id>.png`` for the best, median and worst case by the Dice of the model
    against the majority vote (the ``predictor="model", reference="majority"`` rows of ``evaluation``).

    Earlier ``best_*.png``, ``median_*.png`` and ``worst_*.png`` of ``out_dir`` are removed first. Cases whose Dice
    is NaN are not chosen; without any Dice nothing is written.

    Args:
        evaluation: the rows of :func:`medjdt.reporting.evaluate.evaluate_predictions`.
        manifest: the manifest evaluated; ``records`` its evaluated cases.
        predictions: the folder of ``<case_id>_probs.nii.gz``.
        out_dir: where to write (created).
        window: the CT window, default :func:`recorded_window` of ``predictions`` or :data:`DEFAULT_CT_WINDOW`.

    Returns:
        ``{rank: png path}``.
    """
    rows = evaluation[(evaluation["predictor"] == "model") & (evaluation["reference"] == "majority")]
    dice = dict(zip(rows["case_id"].astype(str), rows["dice"].astype(float)))
    chosen = select_cases(dice)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_views(out)
    window = recorded_window(predictions) if window is None else window
    by_id = {r.case_id: r for r in records}
    written = {}
    for rank, case_id in chosen.items():
        figure = case_view_figure(load_view_case(manifest, by_id[case_id], predictions), dice=dice[case_id],
                                  window=window, note=f"{rank} of {len(rows)} case(s)")
        written[rank] = save_figure(figure, child_path(out, f"{rank}_{case_id}.png", "case_id"))
    return written

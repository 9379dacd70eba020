"""The headline scores of each evaluated case, one row per case, from the long table of :mod:`.evaluate`.

Columns (every value per case, on the case's original grid):

* against the raters' majority vote: ``dice``, ``iou`` (means over the foreground classes present in the
  reference) and ``dice/<class>``, ``iou/<class>``; ``absent_fp_voxels`` and ``absent_fp_ml`` (voxels predicted
  as a class the majority lacks); for KiTS the challenge's ``kits_dice``, ``kits_sd`` and their regions;
* against the mean of the raters: ``soft_dice``, ``thresholded_dice``, ``ece``, ``brier``, ``nll`` (and per class
  for the overlap ones);
* against each rater: ``rater_dice`` (and ``rater_dice/<class>``), the model's Dice against each rater, averaged
  over the raters;
* the inter-rater ceiling of the same case: ``inter_rater_dice`` (and per class, and ``inter_rater_kits_*``), one
  rater's Dice against another, averaged over every pair of raters: what ``rater_dice`` is judged against.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["HIGHER_IS_BETTER", "case_scores"]

_MAJORITY = ("dice", "iou", "absent_fp_voxels", "absent_fp_ml", "kits_dice", "kits_sd")
_MEAN = ("soft_dice", "thresholded_dice", "ece", "brier", "nll")
# Metrics where a higher value is better (the others: ece, brier, nll, absent false positives).
HIGHER_IS_BETTER = ("dice", "iou", "soft_dice", "thresholded_dice", "rater_dice", "inter_rater_dice", "kits_dice",
                    "kits_sd")


def _columns(frame: pd.DataFrame, heads: tuple[str, ...]) -> list[str]:
    return [c for c in frame.columns if c.split("/", 1)[0] in heads]


def case_scores(evaluation: pd.DataFrame) -> pd.DataFrame:
    """One row per case with the columns of the module docstring, sorted by ``case_id``.

    Args:
        evaluation: the rows of :func:`medjdt.reporting.evaluate.evaluate_predictions` (or of ``medjdt evaluate``'s
            CSV): ``case_id, predictor, rater, reference`` and the metric columns.

    Raises:
        ValueError: the table lacks the key columns or the model's rows against the majority vote and the mean.
    """
    missing = [c for c in ("case_id", "predictor", "rater", "reference") if c not in evaluation.columns]
    if missing:
        raise ValueError(f"evaluation table lacks the column(s) {missing}")

    def rows(predictor: str, reference: str) -> pd.DataFrame:
        selected = evaluation[(evaluation["predictor"] == predictor) & (evaluation["reference"] == reference)]
        return selected.set_index("case_id")

    majority, mean = rows("model", "majority"), rows("model", "mean")
    if majority.empty or mean.empty:
        raise ValueError("evaluation table has no rows of the model against the majority vote and the mean")
    out = pd.concat([majority[_columns(majority, _MAJORITY)], mean[_columns(mean, _MEAN)]], axis=1)
    per_rater = rows("model", "rater")
    if not per_rater.empty:
        dice = per_rater[_columns(per_rater, ("dice",))].groupby(level=0).mean()
        out = out.join(dice.rename(columns=lambda c: "rater_" + c))
    pairwise = rows("raters", "pairwise")
    if not pairwise.empty:
        ceiling = pairwise[_columns(pairwise, ("dice", "kits_dice", "kits_sd"))]
        out = out.join(ceiling.rename(columns=lambda c: "inter_rater_" + c))
    return out.rename_axis("case_id").reset_index().sort_values("case_id", ignore_index=True)

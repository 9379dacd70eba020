"""Statistics of a fusion study: per-arm means with case-bootstrap CIs, paired comparisons against a baseline.

A study has several *arms* (training variants, e.g. ``mean``, ``majority``, ``staple``), each trained with several
*seeds*; every model is scored on the same held-out test *cases*. The input is a long frame ``scores`` with
columns ``arm`` (str), ``seed`` (int), ``case_id`` (str) and one float column per metric (``dice``, ``ece``,
``dice/kidney``, ...). NaN means "not defined for this case" and is dropped per metric, never read as 0.

Cases are the resampling unit: the seeds of an arm are first averaged within each case (:func:`case_means`), then
the per-case means are bootstrapped (:func:`bootstrap_ci`). Paired comparisons use the per-case difference
``arm - baseline`` on the cases where both are defined, with a bootstrap CI and a two-sided Wilcoxon signed-rank
p-value. The same ``seed`` is used for every arm and metric (common random numbers), so results are reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

from medjdt.metrics.calibration import calibration_error_from_sums
from medjdt.validation import check_number

KEY_COLUMNS = ("arm", "seed", "case_id")
LOWER_IS_BETTER_PREFIXES = ("ece", "brier", "nll")
BIN_COLUMNS = ("arm", "seed", "bin_lower", "bin_upper", "count", "confidence", "accuracy")
_CHUNK_ELEMENTS = 2_000_000  # resample indices drawn per chunk (16 MB of int64)


def higher_is_better(metric: str, directions: Mapping[str, bool] | None = None) -> bool:
    """Whether larger values of ``metric`` are better.

    ``directions`` (metric -> higher-is-better) wins when it names the metric; otherwise the default rule: names
    starting with ``ece``, ``brier`` or ``nll`` or containing ``fp`` are lower-is-better, all others higher.
    """
    if directions is not None and metric in directions:
        return bool(directions[metric])
    name = metric.lower()
    return not (name.startswith(LOWER_IS_BETTER_PREFIXES) or "fp" in name)


ALPHA = 0.05


def verdict(ci_low: float, ci_high: float, higher: bool, p: float | None = None, alpha: float = ALPHA) -> str:
    """``"arm"``, ``"baseline"`` or ``"neither"``: which side a CI of ``arm - baseline`` favours.

    A side is named only when the CI excludes 0 (a NaN bound means "neither") and, when the paired test's
    p-value ``p`` is given, it is below ``alpha``: with few cases a bootstrap CI can exclude 0 where the rank test
    cannot tell the arms apart (3 cases never reach p < 0.05), and neither alone is then claimed.
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "neither"
    if p is not None and not (np.isfinite(p) and p < alpha):
        return "neither"
    if ci_low > 0:
        return "arm" if higher else "baseline"
    if ci_high < 0:
        return "baseline" if higher else "arm"
    return "neither"


def _check_scores(scores: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("metrics is empty: name at least one metric column")
    for column in (*KEY_COLUMNS, *metrics):
        if column not in scores.columns:
            raise ValueError(f"scores has no column {column!r} (columns: {', '.join(map(str, scores.columns))})")
    for metric in metrics:
        if not pd.api.types.is_numeric_dtype(scores[metric]):
            raise ValueError(f"metric column {metric!r} is not numeric (dtype {scores[metric].dtype})")
    duplicated = scores.duplicated(list(KEY_COLUMNS))
    if duplicated.any():
        row = scores.loc[duplicated, list(KEY_COLUMNS)].iloc[0]
        raise ValueError(
            f"scores has more than one row for (arm, seed, case_id) = ({row['arm']!r}, {row['seed']!r}, "
            f"{row['case_id']!r})"
        )
    return metrics


def _arms(scores: pd.DataFrame) -> list[str]:
    return list(pd.unique(scores["arm"]))


def case_means(scores: pd.DataFrame, metric: str) -> pd.Series:
    """Mean over seeds of ``metric`` per (arm, case), NaNs dropped.

    Returns:
        Series named ``metric`` with a MultiIndex ``(arm, case_id)`` in order of first appearance; a case whose
        every seed is NaN is absent.
    """
    _check_scores(scores, [metric])
    defined = scores.loc[scores[metric].notna(), ["arm", "case_id", metric]]
    return defined.groupby(["arm", "case_id"], sort=False)[metric].mean().astype(float)


def bootstrap_ci(
    values: np.ndarray, *, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of 1-D ``values`` and its percentile-bootstrap confidence interval.

    NaNs are dropped. The values are resampled with replacement ``n_resamples`` times with
    ``numpy.random.default_rng(seed)`` (index matrices drawn in chunks, so memory stays bounded), and the interval
    is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the resampled means. With one
    value the result is ``(value, nan, nan)``; with none, ``(nan, nan, nan)``.

    Raises:
        ValueError: ``values`` not 1-D, ``n_resamples < 1`` or ``confidence`` outside (0, 1).
    """
    data = np.asarray(values, dtype=float)
    if data.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {data.shape}")
    n_resamples = check_number("n_resamples", n_resamples, low=1, integer=True, where="bootstrap_ci")
    check_number("confidence", confidence, low=0, high=1, low_inclusive=False, high_inclusive=False)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(data))
    if data.size == 1:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // data.size)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        index = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[index].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return mean, float(low), float(high)


def arm_summary(
    scores: pd.DataFrame, metrics: Iterable[str], *, n_resamples: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Per (arm, metric): mean over cases of the seed-averaged scores, with a 95% bootstrap CI over cases.

    Returns:
        One row per (arm, metric), arms in order of first appearance, with columns ``arm, metric, mean, ci_low,
        ci_high, n_cases, n_seeds`` (``n_cases``: cases with a defined value; ``n_seeds``: seeds with at least one
        defined value). An arm with no defined value gets NaNs and ``n_cases = 0``.
    """
    metrics = _check_scores(scores, metrics)
    rows = []
    for metric in metrics:
        means = case_means(scores, metric)
        defined = scores.loc[scores[metric].notna()]
        for arm in _arms(scores):
            values = means.xs(arm, level="arm").to_numpy() if arm in means.index.get_level_values("arm") else []
            mean, low, high = bootstrap_ci(np.asarray(values, dtype=float), n_resamples=n_resamples, seed=seed)
            n_seeds = defined.loc[defined["arm"] == arm, "seed"].nunique()
            rows.append((arm, metric, mean, low, high, len(values), int(n_seeds)))
    frame = pd.DataFrame(rows, columns=["arm", "metric", "mean", "ci_low", "ci_high", "n_cases", "n_seeds"])
    return _arm_major(frame, _arms(scores), metrics)


def _arm_major(frame: pd.DataFrame, arms: list[str], metrics: list[str]) -> pd.DataFrame:
    order = frame["arm"].map({arm: i for i, arm in enumerate(arms)}) * len(metrics) + frame["metric"].map(
        {metric: i for i, metric in enumerate(metrics)}
    )
    return frame.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def paired_differences(scores: pd.DataFrame, metric: str, baseline: str) -> pd.DataFrame:
    """Per (arm other than ``baseline``, case): the case mean of the arm minus the case mean of the baseline.

    Returns:
        Columns ``arm, case_id, difference``; only cases where both the arm and the baseline are defined.

    Raises:
        ValueError: ``baseline`` is not an arm of ``scores``.
    """
    _check_scores(scores, [metric])
    arms = _arms(scores)
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not in scores (arms: {', '.join(map(str, arms))})")
    means = case_means(scores, metric)
    arm_level = means.index.get_level_values("arm")
    base = means[arm_level == baseline].droplevel("arm")
    frames = []
    for arm in arms:
        if arm == baseline:
            continue
        own = means[arm_level == arm].droplevel("arm")
        common = own.index[own.index.isin(base.index)]
        difference = own.loc[common].to_numpy() - base.loc[common].to_numpy()
        frames.append(pd.DataFrame({"arm": arm, "case_id": common.to_numpy(), "difference": difference}))
    if not frames:
        return pd.DataFrame({"arm": [], "case_id": [], "difference": []}).astype({"difference": float})
    return pd.concat(frames, ignore_index=True)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided p-value of ``scipy.stats.wilcoxon(differences)`` (default settings); NaN where it is undefined.

    NaN for fewer than 2 differences, all differences zero, or when scipy refuses (``ValueError``) or returns NaN;
    scipy's warnings (ties or zeros make it use the normal approximation) are silenced.
    """
    data = np.asarray(differences, dtype=float)
    data = data[~np.isnan(data)]
    if data.size < 2 or not np.any(data != 0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. ties or zeros: scipy falls back to the normal approximation
        try:
            p = float(stats.wilcoxon(data).pvalue)
        except ValueError:
            return float("nan")
    return p if np.isfinite(p) else float("nan")


def paired_comparison(
    scores: pd.DataFrame,
    metrics: Iterable[str],
    baseline: str,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    directions: Mapping[str, bool] | None = None,
) -> pd.DataFrame:
    """Each arm against ``baseline``: mean paired difference per case with bootstrap CI and Wilcoxon p-value.

    Args:
        directions: metric -> higher-is-better, overriding the default rule of :func:`higher_is_better`.

    Returns:
        One row per (arm other than baseline, metric) with columns ``arm, baseline, metric, mean_difference,
        ci_low, ci_high, wilcoxon_p, n_cases, better``; ``better`` is ``"arm"``, ``"baseline"`` or ``"neither"``
        (see :func:`verdict`: the CI excludes 0 and p < 0.05), taking the metric's direction into account.
    """
    metrics = _check_scores(scores, metrics)
    arms = [arm for arm in _arms(scores) if arm != baseline]
    rows = []
    for metric in metrics:
        differences = paired_differences(scores, metric, baseline)
        higher = higher_is_better(metric, directions)
        for arm in arms:
            values = differences.loc[differences["arm"] == arm, "difference"].to_numpy(dtype=float)
            mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
            p = wilcoxon_p(values)
            rows.append((arm, baseline, metric, mean, low, high, p, len(values), verdict(low, high, higher, p)))
    columns = ["arm", "baseline", "metric", "mean_difference", "ci_low", "ci_high", "wilcoxon_p", "n_cases", "better"]
    return _arm_major(pd.DataFrame(rows, columns=columns), arms, metrics)


def pool_reliability(bins: pd.DataFrame) -> pd.DataFrame:
    """Pool reliability bins over seeds: per (arm, bin), count-weighted mean confidence and accuracy.

    Args:
        bins: rows ``arm, seed, bin_lower, bin_upper, count, confidence, accuracy`` (confidence and accuracy are
            the means over the bin's voxels; they may be NaN where ``count`` is 0).

    Returns:
        Columns ``arm, bin_lower, bin_upper, count, confidence, accuracy, n_seeds``: ``count`` summed over seeds,
        confidence and accuracy weighted by count (NaN for a bin empty in every seed); arms in order of first
        appearance, bins by ``bin_lower``.
    """
    for column in BIN_COLUMNS:
        if column not in bins.columns:
            raise ValueError(f"bins has no column {column!r} (columns: {', '.join(map(str, bins.columns))})")
    counts = bins["count"].to_numpy(dtype=float)
    if np.any(counts < 0) or np.any(np.isnan(counts)):
        raise ValueError("bins has a negative or NaN count")
    work = bins[["arm", "seed", "bin_lower", "bin_upper"]].copy()
    work["count"] = counts
    for column in ("confidence", "accuracy"):
        work[column] = np.where(counts > 0, bins[column].to_numpy(dtype=float) * counts, 0.0)
    grouped = work.groupby(["arm", "bin_lower", "bin_upper"], sort=False)
    pooled = grouped[["count", "confidence", "accuracy"]].sum().reset_index()
    pooled["n_seeds"] = grouped["seed"].nunique().to_numpy()
    total = pooled["count"].to_numpy()
    for column in ("confidence", "accuracy"):
        pooled[column] = np.divide(pooled[column].to_numpy(), total, out=np.full(total.shape, np.nan), where=total > 0)
    arm_rank = pooled["arm"].map({arm: i for i, arm in enumerate(_arms(bins))})
    pooled = pooled.assign(_rank=arm_rank).sort_values(["_rank", "bin_lower"], kind="stable")
    return pooled.drop(columns="_rank").reset_index(drop=True)


def expected_calibration_error_from_bins(frame: pd.DataFrame) -> float:
    """ECE of the reliability bins of one arm, by :func:`medjdt.metrics.calibration.calibration_error_from_sums`.

    The ECE is sum_b n_b / N |acc_b - conf_b| over the bins, N the number of voxels; NaN when every bin is empty.

    Args:
        frame: one row per bin with ``count`` (n_b), ``confidence`` and ``accuracy`` (the bin's means; anything,
            NaN included, where ``count`` is 0), e.g. ``val_reliability.csv`` or one arm of
            :func:`pool_reliability`.

    Raises:
        ValueError: a column is missing, or ``frame`` holds more than one arm.
    """
    for column in ("count", "confidence", "accuracy"):
        if column not in frame.columns:
            raise ValueError(f"bins have no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    if "arm" in frame.columns and frame["arm"].nunique() > 1:
        raise ValueError(f"bins hold {frame['arm'].nunique()} arms; pass the bins of one arm")
    counts = frame["count"].to_numpy(dtype=float)
    filled = counts > 0
    # per-bin sums (count, confidence sum, accuracy sum) from the means; empty bins add nothing
    sums = np.stack(
        [counts] + [np.where(filled, frame[c].to_numpy(dtype=float) * counts, 0.0) for c in ("confidence", "accuracy")]
    )
    return float(calibration_error_from_sums(sums))

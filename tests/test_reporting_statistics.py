"""Fusion-study statistics: bootstrap CIs over cases, paired comparisons, pooled reliability, figures and tables."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from medjdt.metrics import CalibrationMetrics
from medjdt.metrics.calibration import calibration_error_from_sums
from medjdt.reporting.statistics import (
    arm_summary,
    bootstrap_ci,
    case_means,
    expected_calibration_error_from_bins,
    higher_is_better,
    paired_comparison,
    paired_differences,
    pool_reliability,
    verdict,
)
from medjdt.reporting.study_figures import (
    forest_figure,
    plot_dice_vs_ece,
    plot_forest,
    plot_reliability_by_arm,
)
from medjdt.reporting.study_tables import headline, pipe_table, summary_table, write_csv, write_study_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arm", "seed", "case_id", "dice", "ece"])


def _study(n_cases: int = 12, seeds: int = 3, shift: dict | None = None, seed: int = 0) -> pd.DataFrame:
    """Arms majority (baseline), mean and staple on the same cases; ``shift`` adds to dice per arm."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    base_dice = rng.uniform(0.7, 0.95, n_cases)
    base_ece = rng.uniform(0.01, 0.03, n_cases)
    rows = []
    for arm in ("majority", "mean", "staple"):
        for s in range(seeds):
            for c in range(n_cases):
                dice = base_dice[c] + shift.get(arm, 0.0) + rng.normal(0, 0.01)
                ece = base_ece[c] + rng.normal(0, 0.001)
                rows.append((arm, s, f"case{c:02d}", dice, ece))
    return _scores(rows)


# --- bootstrap -----------------------------------------------------------------------------------------------


def test_bootstrap_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(42).gamma(2.0, 1.0, size=30)
    mean, low, high = bootstrap_ci(x, n_resamples=20_000, seed=1)
    # scipy >= 1.15 names the generator ``rng``; older versions ``random_state``.
    generator = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    reference = stats.bootstrap(
        (x,), np.mean, method="percentile", n_resamples=20_000, **{generator: np.random.default_rng(7)}
    ).confidence_interval
    assert mean == np.mean(x)
    tolerance = 0.02 * np.std(x)
    assert abs(low - reference.low) < tolerance
    assert abs(high - reference.high) < tolerance


def test_bootstrap_narrows_with_more_cases_and_handles_degenerate_input():
    rng = np.random.default_rng(3)
    few = bootstrap_ci(rng.normal(0.8, 0.1, 10), n_resamples=2000)
    many = bootstrap_ci(rng.normal(0.8, 0.1, 200), n_resamples=2000)
    assert many[2] - many[1] < few[2] - few[1]
    assert few[1] < few[0] < few[2]
    single = bootstrap_ci(np.array([0.5, np.nan]))
    assert single[0] == 0.5 and np.isnan(single[1]) and np.isnan(single[2])
    assert all(np.isnan(bootstrap_ci(np.array([np.nan]))))
    assert all(np.isnan(bootstrap_ci(np.array([]))))
    # NaNs are dropped, not zeroed, and the result is reproducible for a seed.
    assert bootstrap_ci(np.array([1.0, 2.0, np.nan, 3.0]), n_resamples=500, seed=4) == bootstrap_ci(
        np.array([1.0, 2.0, 3.0]), n_resamples=500, seed=4
    )
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(np.arange(3.0), confidence=1.5)


# --- per-arm summary -----------------------------------------------------------------------------------------


def test_seeds_are_averaged_within_cases_before_resampling():
    # Case a has three seeds (mean 0.9), cases b and c have one each: mean of case means is (0.9+0.3+0.6)/3 = 0.6,
    # while the mean over rows would be (0.8+0.9+1.0+0.3+0.6)/5 = 0.72.
    scores = _scores(
        [("m", 0, "a", 0.8, 0.1), ("m", 1, "a", 0.9, 0.1), ("m", 2, "a", 1.0, 0.1),
         ("m", 0, "b", 0.3, 0.1), ("m", 0, "c", 0.6, 0.1)]
    )  # fmt: skip
    means = case_means(scores, "dice")
    assert means.loc[("m", "a")] == pytest.approx(0.9)
    row = arm_summary(scores, ["dice"], n_resamples=2000).iloc[0]
    assert row["mean"] == pytest.approx(0.6)
    assert (row["n_cases"], row["n_seeds"]) == (3, 3)
    # The CI is the bootstrap of the three case means, not of the five rows.
    expected = bootstrap_ci(np.array([0.9, 0.3, 0.6]), n_resamples=2000)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(expected[1:])


def test_nans_are_dropped_per_metric_not_zeroed():
    scores = _scores(
        [("m", 0, "a", 0.8, np.nan), ("m", 1, "a", np.nan, 0.02), ("m", 0, "b", 0.6, 0.04), ("m", 1, "b", 0.4, 0.06),
         ("m", 0, "c", np.nan, 0.01), ("m", 1, "c", np.nan, 0.03)]
    )  # fmt: skip
    dice = case_means(scores, "dice")
    assert ("m", "c") not in dice.index  # every seed NaN: absent, not 0
    assert dice.loc[("m", "a")] == pytest.approx(0.8)  # the NaN seed is ignored, not averaged in as 0
    summary = arm_summary(scores, ["dice", "ece"], n_resamples=500).set_index("metric")
    assert summary.loc["dice", "mean"] == pytest.approx((0.8 + 0.5) / 2)
    assert summary.loc["dice", "n_cases"] == 2
    assert summary.loc["ece", "mean"] == pytest.approx((0.02 + 0.05 + 0.02) / 3)
    assert summary.loc["ece", "n_cases"] == 3


def test_arm_summary_keeps_arm_order_and_validates_columns():
    scores = _study(n_cases=5, seeds=2)
    summary = arm_summary(scores, ["dice", "ece"], n_resamples=200)
    assert list(summary["arm"]) == ["majority", "majority", "mean", "mean", "staple", "staple"]
    assert list(summary.columns) == ["arm", "metric", "mean", "ci_low", "ci_high", "n_cases", "n_seeds"]
    with pytest.raises(ValueError, match="'hd95'"):
        arm_summary(scores, ["hd95"])
    with pytest.raises(ValueError, match="more than one row"):
        arm_summary(pd.concat([scores, scores.iloc[:1]]), ["dice"])


def test_metric_directions():
    assert higher_is_better("dice") and higher_is_better("dice/kidney") and higher_is_better("soft_dice")
    assert not any(higher_is_better(m) for m in ("ece", "ece/kidney", "brier", "nll", "lesion_fp_count"))
    assert higher_is_better("ece", {"ece": True})


# --- paired comparison ---------------------------------------------------------------------------------------


def test_paired_differences_and_wilcoxon_match_hand_computation():
    scores = _study(n_cases=10, seeds=3, shift={"mean": 0.01})
    differences = paired_differences(scores, "dice", "majority")
    table = scores.groupby(["arm", "case_id"])["dice"].mean().unstack("arm")
    hand = (table["mean"] - table["majority"]).to_numpy()
    mine = differences.loc[differences["arm"] == "mean"].set_index("case_id")["difference"].loc[table.index]
    np.testing.assert_allclose(mine.to_numpy(), hand)
    paired = paired_comparison(scores, ["dice"], "majority", n_resamples=2000).set_index("arm")
    assert list(paired.index) == ["mean", "staple"]
    assert paired.loc["mean", "wilcoxon_p"] == pytest.approx(stats.wilcoxon(hand).pvalue)
    assert paired.loc["mean", "mean_difference"] == pytest.approx(hand.mean())
    assert paired.loc["mean", "n_cases"] == 10
    # Ties and a zero (rounded scores): scipy may warn and use the normal approximation; the p-value is still given.
    gains = np.array([0.01, 0.01, 0.02, 0.0, 0.03, -0.01, 0.02, 0.02])
    rows = [("base", 0, f"c{i}", 0.5, 0.1) for i in range(8)] + [
        ("new", 0, f"c{i}", 0.5 + g, 0.1) for i, g in enumerate(gains)
    ]
    tied = paired_comparison(_scores(rows), ["dice"], "base", n_resamples=200).set_index("arm")
    differences = (np.full(8, 0.5) + gains) - 0.5  # the same floating-point rounding as the per-case differences
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = stats.wilcoxon(differences).pvalue
    assert np.isfinite(reference)
    assert tied.loc["new", "wilcoxon_p"] == pytest.approx(reference)


def test_exact_wilcoxon_p_for_six_positive_differences():
    gains = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    rows = [("base", 0, f"c{i}", 0.5, 0.1) for i in range(6)]
    rows += [("new", 0, f"c{i}", 0.5 + g, 0.1) for i, g in enumerate(gains)]
    paired = paired_comparison(_scores(rows), ["dice", "ece"], "base", n_resamples=2000).set_index("metric")
    assert paired.loc["dice", "wilcoxon_p"] == pytest.approx(2 / 64)
    assert paired.loc["dice", "better"] == "arm"
    # All differences zero: no test possible, p is NaN and neither side is better.
    assert np.isnan(paired.loc["ece", "wilcoxon_p"])
    assert paired.loc["ece", "better"] == "neither"


def test_paired_only_uses_cases_defined_for_both_arms():
    rows = [("base", 0, "a", 0.5, 0.1), ("base", 0, "b", np.nan, 0.1), ("base", 0, "c", 0.7, 0.1),
            ("new", 0, "a", 0.6, 0.1), ("new", 0, "b", 0.9, 0.1), ("new", 0, "c", np.nan, 0.1)]  # fmt: skip
    differences = paired_differences(_scores(rows), "dice", "base")
    assert list(differences["case_id"]) == ["a"]
    assert differences["difference"].iloc[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'nope'"):
        paired_differences(_scores(rows), "dice", "nope")


def test_better_respects_lower_is_better_for_ece():
    rng = np.random.default_rng(5)
    rows = []
    for c in range(15):
        dice, ece = rng.uniform(0.6, 0.9), rng.uniform(0.02, 0.04)
        rows.append(("majority", 0, f"c{c}", dice, ece))
        rows.append(("mean", 0, f"c{c}", dice + 0.02 + rng.normal(0, 0.002), ece - 0.01 + rng.normal(0, 0.001)))
        rows.append(("random", 0, f"c{c}", dice - 0.02 + rng.normal(0, 0.002), ece + 0.01 + rng.normal(0, 0.001)))
    paired = paired_comparison(_scores(rows), ["dice", "ece"], "majority", n_resamples=2000)
    verdicts = paired.set_index(["arm", "metric"])["better"]
    assert verdicts[("mean", "dice")] == "arm"
    assert verdicts[("mean", "ece")] == "arm"  # lower ECE is better although the difference is negative
    assert verdicts[("random", "dice")] == "baseline"
    assert verdicts[("random", "ece")] == "baseline"
    flipped = paired_comparison(_scores(rows), ["ece"], "majority", n_resamples=2000, directions={"ece": True})
    assert flipped.set_index("arm").loc["mean", "better"] == "baseline"


# --- reliability ---------------------------------------------------------------------------------------------


def test_pool_reliability_weights_by_counts():
    bins = pd.DataFrame(
        [("m", 0, 0.0, 0.5, 10, 0.2, 0.1), ("m", 1, 0.0, 0.5, 30, 0.4, 0.5),
         ("m", 0, 0.5, 1.0, 0, np.nan, np.nan), ("m", 1, 0.5, 1.0, 5, 0.9, 0.7),
         ("s", 0, 0.0, 0.5, 0, np.nan, np.nan), ("s", 0, 0.5, 1.0, 4, 0.8, 0.8)],
        columns=["arm", "seed", "bin_lower", "bin_upper", "count", "confidence", "accuracy"],
    )  # fmt: skip
    pooled = pool_reliability(bins)
    m = pooled.loc[pooled["arm"] == "m"].set_index("bin_lower")
    assert m.loc[0.0, "count"] == 40
    assert m.loc[0.0, "confidence"] == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)  # 0.35, not the plain mean 0.3
    assert m.loc[0.0, "accuracy"] == pytest.approx((10 * 0.1 + 30 * 0.5) / 40)
    assert m.loc[0.5, "confidence"] == pytest.approx(0.9)  # the empty bin of seed 0 has no weight
    s = pooled.loc[pooled["arm"] == "s"].set_index("bin_lower")
    assert s.loc[0.0, "count"] == 0 and np.isnan(s.loc[0.0, "confidence"])
    # ECE = (40 * |0.4 - 0.35| + 5 * |0.7 - 0.9|) / 45
    assert expected_calibration_error_from_bins(m) == pytest.approx((40 * 0.05 + 5 * 0.2) / 45)
    assert expected_calibration_error_from_bins(s) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="arms"):
        expected_calibration_error_from_bins(pooled)


def _random_bins(rng: np.random.Generator, n_bins: int = 15) -> pd.DataFrame:
    """Reliability bins with some empty ones, whose means are NaN (as the metrics write them)."""
    count = rng.integers(0, 50, n_bins).astype(float)
    count[[2, 7]] = 0
    confidence = np.where(count > 0, rng.uniform(0, 1, n_bins), np.nan)
    accuracy = np.where(count > 0, rng.uniform(0, 1, n_bins), np.nan)
    edges = np.linspace(0, 1, n_bins + 1)
    frame = {"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": count, "confidence": confidence}
    return pd.DataFrame({**frame, "accuracy": accuracy})


def test_ece_of_bins_is_the_metrics_ece_and_the_textbook_sum():
    for seed in range(5):
        bins = _random_bins(np.random.default_rng(seed))
        n, conf, acc = (bins[c].to_numpy() for c in ("count", "confidence", "accuracy"))
        filled = n > 0
        textbook = np.sum(n[filled] / n.sum() * np.abs(acc[filled] - conf[filled]))  # sum_b n_b/N |acc_b - conf_b|
        core = calibration_error_from_sums(np.stack([n, np.where(filled, n * conf, 0), np.where(filled, n * acc, 0)]))
        adapter = expected_calibration_error_from_bins(bins)
        assert adapter == pytest.approx(textbook, rel=1e-12) and core.item() == pytest.approx(textbook, rel=1e-12)
    empty = _random_bins(np.random.default_rng(0)).assign(count=0.0)
    assert np.isnan(expected_calibration_error_from_bins(empty))


def test_ece_of_a_metrics_reliability_table_is_its_pooled_ece():
    """The bins a run writes (CalibrationMetrics.reliability) give back the run's pooled ECE."""
    generator = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(2, 3, 8, 8, 4, generator=generator)).softmax(1)
    labels = torch.randint(0, 3, (2, 8, 8, 4), generator=generator)
    metric = CalibrationMetrics(3)
    metric.update(probs, labels, ["a", "b"])
    pooled = metric.compute()["ece_D"].item()
    assert expected_calibration_error_from_bins(metric.reliability()) == pytest.approx(pooled, rel=1e-9)


# --- figures -------------------------------------------------------------------------------------------------


def _assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas


def test_figures_are_written_as_png(tmp_path):
    scores = _study(n_cases=6, seeds=2, shift={"mean": 0.02})
    bins = pd.DataFrame(
        [(arm, s, lo, lo + 0.25, 10 + s, lo + 0.1, lo + 0.1 + d)
         for arm, d in (("majority", 0.0), ("mean", 0.05)) for s in range(2) for lo in (0.0, 0.25, 0.5, 0.75)],
        columns=["arm", "seed", "bin_lower", "bin_upper", "count", "confidence", "accuracy"],
    )  # fmt: skip
    paired = paired_comparison(scores, ["dice", "ece"], "majority", n_resamples=500)
    written = [
        plot_reliability_by_arm(pool_reliability(bins), tmp_path / "reliability.png"),
        plot_dice_vs_ece(scores, tmp_path / "scatter.png"),
        plot_forest(paired, tmp_path / "figs" / "forest.png"),
    ]
    for path in written:
        _assert_png(path)
    assert len(forest_figure(paired).axes) == 2
    assert len(forest_figure(paired, metrics=["ece"]).axes) == 1
    labels = [tick.get_text() for tick in forest_figure(paired).axes[0].get_yticklabels()]
    assert set(labels) == {"mean", "staple"}
    assert not list(tmp_path.glob(".*.tmp*"))


# --- tables and headline -------------------------------------------------------------------------------------


def _tables(scores):
    summary = arm_summary(scores, ["dice", "ece"], n_resamples=2000)
    paired = paired_comparison(scores, ["dice", "ece"], "majority", n_resamples=2000)
    return summary, paired


def test_headline_claims_nothing_when_every_ci_includes_zero():
    summary, paired = _tables(_study(n_cases=12, seeds=3))
    assert (paired["ci_low"] < 0).all() and (paired["ci_high"] > 0).all()
    sentence = headline(summary, paired, "majority")
    assert sentence.startswith("No arm differs from majority on Dice")
    assert "no arm differs from majority on ECE" in sentence
    assert "higher" not in sentence and "lower" not in sentence


def test_headline_names_the_better_arm_when_its_ci_excludes_zero():
    summary, paired = _tables(_study(n_cases=12, seeds=3, shift={"mean": 0.05}))
    verdicts = paired.set_index(["arm", "metric"])["better"]
    assert verdicts[("mean", "dice")] == "arm" and verdicts[("staple", "dice")] == "neither"
    sentence = headline(summary, paired, "majority")
    assert "mean has a higher Dice than majority" in sentence
    assert "staple does not differ from majority on Dice" in sentence
    assert "staple has" not in sentence
    assert "no arm differs from majority on ECE" in sentence
    assert sentence.endswith(".") and sentence.count(". ") == 0


def test_summary_table_markdown_and_csv(tmp_path):
    summary, paired = _tables(_study(n_cases=8, seeds=2, shift={"mean": 0.05}))
    table = summary_table(summary, paired, ["dice", "ece"], "majority")
    assert list(table.columns) == ["arm", "dice", "Δdice vs majority", "ece", "Δece vs majority"]
    assert list(table["arm"]) == ["majority", "mean", "staple"]
    row = summary.set_index(["arm", "metric"]).loc[("mean", "dice")]
    assert table.loc[1, "dice"] == f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    assert table.loc[0, "Δdice vs majority"] == "(baseline)"
    assert table.loc[1, "Δdice vs majority"].startswith("+0.0") and ", p=" in table.loc[1, "Δdice vs majority"]
    sentence = headline(summary, paired, "majority")
    path = write_study_markdown(tmp_path / "study.md", "Fusion study", sentence, table, ["cases resampled", "a|b"])
    text = path.read_text(encoding="utf-8")
    blocks = text.split("\n\n")
    assert blocks[0] == "# Fusion study" and blocks[1] == sentence
    assert blocks[2].splitlines()[0].startswith("| arm")
    assert text.rstrip().endswith("- a|b")
    assert pipe_table(pd.DataFrame({"x|y": ["1|2"]})) == "| x\\|y |\n|---|\n| 1\\|2 |"
    csv = write_csv(paired, tmp_path / "paired.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), paired, check_dtype=False)


def test_a_difference_is_claimed_only_when_the_ci_excludes_0_and_the_rank_test_agrees():
    # Three cases, every difference positive: the bootstrap CI excludes 0, but the exact two-sided Wilcoxon p of
    # 3 positive ranks is 2/8 = 0.25, so no side is named.
    rows = [{"arm": arm, "seed": 0, "case_id": f"c{i}", "dice": base + (0.01 * (i + 1) if arm == "mean" else 0.0)}
            for arm in ("majority", "mean") for i, base in enumerate((0.7, 0.8, 0.9))]
    paired = paired_comparison(pd.DataFrame(rows), ["dice"], "majority", n_resamples=2000)
    row = paired.iloc[0]
    assert row["ci_low"] > 0 and row["wilcoxon_p"] == pytest.approx(0.25)
    assert row["better"] == "neither"
    assert verdict(row["ci_low"], row["ci_high"], True) == "arm"  # the CI alone would name the arm

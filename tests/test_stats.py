"""attndrift.stats against the study's published numbers and against scipy/statsmodels."""

import gc
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from attndrift.stats import (
    TestResult,
    anova_oneway,
    bootstrap_ci,
    cohens_d,
    collapse_onset,
    correlation_matrix,
    holm,
    mann_whitney,
    paired_t,
    permutation_corr,
    permutation_corr_test,
    welch,
)

# 000_a834c9d6e890f20a.txt Table 3 / 003 section 3.4: EuroSAT full FT learning-rate sweep.
SWEEP_LR = [1e-6, 5e-6, 1e-5, 5e-5, 1e-4]
SWEEP_DELTA_ENTROPY = [1.45, 0.33, -0.14, -4.19, -10.40]


# --- the study's published numbers ----------------------------------------------------------

def test_exact_permutation_pearson_matches_table_2():
    r, p = permutation_corr(np.log10(SWEEP_LR), SWEEP_DELTA_ENTROPY, method="pearson")
    assert round(r, 3) == -0.893
    assert p == pytest.approx(4 / 120) and round(p, 4) == 0.0333  # 4 of the 120 pairings


def test_exact_permutation_spearman_matches_table_2():
    rho, p = permutation_corr(np.log10(SWEEP_LR), SWEEP_DELTA_ENTROPY, method="spearman")
    assert rho == pytest.approx(-1.0)
    assert p == pytest.approx(2 / 120) and round(p, 4) == 0.0167  # the two perfect orders


def test_permutation_test_states_what_it_tested():
    res = permutation_corr_test(np.log10(SWEEP_LR), SWEEP_DELTA_ENTROPY)
    assert isinstance(res, TestResult) and res.n == 5
    assert "exact, all 120 permutations" in res.test and "two-sided" in res.test
    assert "|stat| >= |observed|" in res.test


def test_holm_reproduces_the_regularizer_family_of_table_2():
    # 003 section 3.7: paired per-layer t (12 layers, df 11) of APR 0.01, 0.1, 1.0 and entropy
    # floor 0.01, 0.1; 000 Table 2 reports their Holm-adjusted p. The t values are published
    # rounded to 2-3 decimals, hence the tolerance on APR 0.01 (0.2186 vs 0.2194).
    t = {"apr_0.01": 2.132, "apr_0.1": 1.85, "apr_1.0": 0.85, "ef_0.01": 2.15, "ef_0.1": 2.638}
    raw = [2 * sps.t.sf(v, 11) for v in t.values()]
    adjusted = dict(zip(t, holm(raw), strict=True))
    assert adjusted["ef_0.1"] == pytest.approx(0.1154, abs=1e-4)
    assert adjusted["apr_0.01"] == pytest.approx(0.2194, abs=1e-3)
    assert all(v > 0.05 for v in adjusted.values())  # "no regularizer survives Holm correction"


@pytest.mark.parametrize(("groups", "f", "p"), [
    # 003 section 3.8: early/middle/late layers (4 each), mean ± sd of per-layer Δ entropy %.
    ([(-0.23, 0.16), (0.14, 0.64), (-0.36, 1.27)], 0.29, 0.755),  # full FT EuroSAT
    ([(0.04, 0.22), (1.15, 0.52), (0.57, 1.72)], 0.85, 0.460),  # LoRA r=8 EuroSAT
])
def test_anova_reproduces_the_layer_position_test(groups, f, p):
    # Four values with exactly the published mean and sd. The study's sd is numpy's default
    # population sd (ddof=0): with it both published F values come out; with ddof=1 they do not.
    z = np.array([-1.5, -0.5, 0.5, 1.5])
    z = z / z.std(ddof=0)
    res = anova_oneway(*[m + s * z for m, s in groups])
    assert res.statistic == pytest.approx(f, abs=0.02)
    assert res.pvalue == pytest.approx(p, abs=0.01)
    assert res.df == (2.0, 9.0)


@pytest.mark.parametrize(("t", "d"), [(-7.157, -5.844), (-7.969, -6.507), (-18.441, -15.057),
                                      (-14.439, -11.789)])
def test_cohens_d_uses_the_pooled_sd_of_table_6(t, d):
    # 002 Table 6 (3 vs 3 seeds): with equal n, pooled-sd d = t * sqrt(1/3 + 1/3). The published
    # pairs satisfy it, and so do ours on any 3-vs-3 data.
    assert t * math.sqrt(2 / 3) == pytest.approx(d, abs=2e-3)
    rng = np.random.default_rng(int(-t * 1000))
    a, b = rng.normal(0, 1, 3), rng.normal(1, 1, 3)
    assert cohens_d(a, b).statistic == pytest.approx(welch(a, b).statistic * math.sqrt(2 / 3))


# --- against scipy / statsmodels on random inputs --------------------------------------------

@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_welch_mann_whitney_paired_anova_match_scipy(rng):
    for _ in range(20):
        a, b = rng.normal(0, 1, rng.integers(3, 15)), rng.normal(0.5, 2, rng.integers(3, 15))
        ref = sps.ttest_ind(a, b, equal_var=False)
        res = welch(a, b)
        assert (res.statistic, res.pvalue, res.df) == pytest.approx(
            (ref.statistic, ref.pvalue, ref.df))
        assert res.estimate == pytest.approx(a.mean() - b.mean()) and res.n == (a.size, b.size)
        ref = sps.mannwhitneyu(a, b, alternative="two-sided")
        assert (mann_whitney(a, b).statistic, mann_whitney(a, b).pvalue) == pytest.approx(
            (ref.statistic, ref.pvalue))
        c = a + rng.normal(0.2, 0.5, a.size)
        ref = sps.ttest_rel(a, c)
        assert (paired_t(a, c).statistic, paired_t(a, c).pvalue) == pytest.approx(
            (ref.statistic, ref.pvalue))
        ref = sps.f_oneway(a, b, c)
        assert (anova_oneway(a, b, c).statistic, anova_oneway(a, b, c).pvalue) == pytest.approx(
            (ref.statistic, ref.pvalue))
    for res in (welch(a, b), mann_whitney(a, b), paired_t(a, c)):
        assert "two-sided" in res.test


def test_cohens_d_formula(rng):
    a, b = rng.normal(0, 1, 7), rng.normal(1, 3, 11)
    pooled = math.sqrt((6 * a.var(ddof=1) + 10 * b.var(ddof=1)) / 16)
    res = cohens_d(a, b)
    assert res.statistic == pytest.approx((a.mean() - b.mean()) / pooled)
    assert math.isnan(res.pvalue) and "pooled" in res.test
    assert math.isnan(cohens_d([1.0], [2.0, 3.0]).statistic)


def test_holm_matches_statsmodels(rng):
    gc.freeze()  # multipletests calls gc.collect() each time: keep it from scanning the heap
    try:
        for _ in range(50):
            p = rng.uniform(0, 0.3, rng.integers(1, 15))
            p[rng.integers(0, p.size)] = p[0]  # ties
            assert holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    finally:
        gc.unfreeze()
    adjusted = holm([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(adjusted[1])
    assert adjusted[[0, 2, 3]] == pytest.approx(multipletests([0.01, 0.04, 0.03], method="holm")[1])
    assert holm([]).shape == (0,)


def _brute_force_p(x, y, corr):
    observed = corr(x, y).statistic
    null = [corr(x, np.asarray(y)[list(p)]).statistic
            for p in itertools.permutations(range(len(y)))]
    return observed, np.mean(np.abs(null) >= abs(observed) - 1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_exact_permutation_corr_matches_brute_force_scipy(rng, method):
    corr = sps.pearsonr if method == "pearson" else sps.spearmanr
    for n in (4, 5, 6):
        x, y = rng.normal(size=n), rng.normal(size=n)
        y = y if method == "pearson" else np.round(y, 0)  # spearman: with ties
        stat, p = permutation_corr(x, y, method)
        ref_stat, ref_p = _brute_force_p(x, y, corr)
        assert stat == pytest.approx(ref_stat) and p == pytest.approx(ref_p)


def test_monte_carlo_permutation_corr_above_eight(rng):
    x, y = rng.normal(size=9), rng.normal(size=9)
    y = y + 0.6 * x
    res = permutation_corr_test(x, y)
    assert "Monte Carlo" in res.test and "seed 0" in res.test
    assert res.statistic == pytest.approx(sps.pearsonr(x, y).statistic)
    # exact over all 9! pairings, vectorised independently of the implementation under test
    perms = np.array(list(itertools.permutations(range(9))), dtype=np.intp)
    yc = (y - y.mean())[perms]
    xc = x - x.mean()
    null = (yc @ xc) / (np.linalg.norm(xc) * np.linalg.norm(y - y.mean()))
    exact = np.mean(np.abs(null) >= abs(res.statistic) - 1e-12)
    assert res.pvalue == pytest.approx(exact, abs=0.01)
    assert permutation_corr_test(x, y).pvalue == res.pvalue  # seeded: reproducible


def test_permutation_corr_degenerate_inputs():
    assert all(math.isnan(v) for v in permutation_corr([1, 2], [3, 4]))
    assert all(math.isnan(v) for v in permutation_corr([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="method"):
        permutation_corr([1, 2, 3], [1, 2, 3], method="kendall")


def test_bootstrap_ci_is_seeded_and_matches_scipy(rng):
    x = rng.normal(2, 1, 20)
    res = bootstrap_ci(x, seed=3, n_resamples=2000)
    ref = sps.bootstrap((x,), np.mean, n_resamples=2000, method="percentile",
                        vectorized=False, rng=np.random.default_rng(3))
    assert res.ci == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert res.ci[0] < x.mean() < res.ci[1] and res.statistic == pytest.approx(x.mean())
    assert bootstrap_ci(x, seed=3, n_resamples=2000) == res
    assert bootstrap_ci([1.0, 1.0, 1.0]).ci == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]).ci)


def test_correlation_matrix_matches_scipy(rng):
    data = {"a": rng.normal(size=12), "b": rng.normal(size=12), "c": rng.normal(size=12)}
    data["c"][3] = np.nan  # pairwise-complete
    cm = correlation_matrix(data)
    assert cm.names == ("a", "b", "c") and np.allclose(np.diag(cm.r), 1)
    ref = sps.pearsonr(data["a"][np.arange(12) != 3], data["c"][np.arange(12) != 3])
    assert (cm.r[0, 2], cm.p[0, 2], cm.n[0, 2]) == pytest.approx((ref.statistic, ref.pvalue, 11))
    assert cm.r[2, 0] == cm.r[0, 2]
    sp = correlation_matrix(data, "spearman")
    assert sp.r[0, 1] == pytest.approx(sps.spearmanr(data["a"], data["b"]).statistic)


def test_collapse_onset():
    fractions = [0.0, 0.07, 0.2, 0.5, 1.0]
    assert collapse_onset(fractions, [0.0, -1.5, -4.0, -8.0, -10.4]) == 0.07
    assert collapse_onset(fractions, [0.0, -0.5, -0.9, -1.0, -0.14]) is None  # -1% is not below
    assert collapse_onset(fractions, [0.0, 0.3, math.nan, 0.6, 0.58]) is None
    assert collapse_onset(fractions, [0.0, -0.5, -2.0, -1.0, 0.5], threshold=-1.5) == 0.2


def test_bootstrap_ci_of_three_seeds_lies_on_attainable_means():
    """With 3 values a resample mean is one of the 10 multiset means: the percentile bounds
    are two of them (or between two neighbours, by interpolation)."""
    x = [1.0, 2.0, 5.0]
    means = sorted({sum(c) / 3 for c in itertools.combinations_with_replacement(x, 3)})
    assert len(means) == 10
    res = bootstrap_ci(x, n_resamples=10_000)
    assert means[0] <= res.ci[0] <= means[2] and means[-3] <= res.ci[1] <= means[-1]


def test_sample_size_note_gives_the_smallest_attainable_mann_whitney_p():
    from attndrift.analysis.inference import sample_size_note

    note = sample_size_note([{"n": "2 vs 2"}, {"n": "3 vs 3"}, {"n": "3 vs 2"}, {"n": "2 vs 2"}])
    # perfectly separated samples reach the smallest two-sided exact p (scipy, independently)
    for na, nb in ((2, 2), (3, 2), (3, 3)):
        a, b = np.arange(na) + 10.0, np.arange(nb) * 1.0
        p = sps.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
        assert f"{na} vs {nb} seeds: smallest Mann-Whitney p {p:.3g}" in note
    assert "2 vs 2 seeds: smallest Mann-Whitney p 0.333, Welch t = d·√(n/2) = Cohen's d" in note
    # equal sides: Welch t = d sqrt(n/2), checked on data
    xa, xb = [1.0, 2.5, 4.0], [0.0, 0.5, 2.0]
    t = welch(xa, xb).statistic
    assert t == pytest.approx(cohens_d(xa, xb).statistic * np.sqrt(3 / 2))
    assert sample_size_note([]) == ""


def test_welch_with_an_empty_side_is_nan_without_a_warning():
    """Issue 24 item 18: a metric no record has gives empty samples; n/a, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = welch([], [1.0, 2.0, 3.0])
        both = welch([math.nan], [])
    assert math.isnan(res.estimate) and math.isnan(res.pvalue) and res.n == (0, 3)
    assert math.isnan(both.estimate)

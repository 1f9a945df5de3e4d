"""Statistical tests for the study: thin wrappers over scipy (Holm's step-down is three lines of
numpy, tested equal to statsmodels' ``multipletests``).

Every test returns what was tested alongside the number: a frozen `TestResult` whose ``test``
string names the test, the null hypothesis and the sidedness. Inference in attndrift is
run-level (seeds are the units); callers label per-layer uses as exploratory, because the
layers of one model are not independent samples.

``permutation_corr`` is exact for small n: it enumerates all n! pairings, which is what the
study's corrected five-point learning-rate analysis did (n = 5 gives 120 pairings, so the
smallest attainable p is 1/120).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

EXACT_MAX_N = 8  # 8! = 40,320 pairings: exact enumeration is still instant
MC_RESAMPLES = 50_000
_TIE_RTOL = 1e-9  # permuted statistics equal to the observed one up to rounding count as ">="

ArrayLike = Sequence[float] | np.ndarray


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Identical or too few samples make scipy warn (precision loss, degrees of freedom <= 0);
    the NaN or infinite result already says so, and a report must not spray warnings."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass(frozen=True)
class TestResult:
    """One test's outcome. ``pvalue`` is NaN for effect sizes and intervals."""

    __test__ = False  # not a pytest test class despite the name

    statistic: float
    pvalue: float
    test: str
    n: int | tuple[int, ...]
    df: float | tuple[float, float] | None = None
    estimate: float | None = None  # e.g. mean difference for t tests
    ci: tuple[float, float] | None = None


def _arr(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[np.isfinite(a)]


def welch(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Welch's two-sample t test (unequal variances), two-sided."""
    a, b = _arr(a), _arr(b)
    with _quiet():
        res = stats.ttest_ind(a, b, equal_var=False)
    # an empty side has no mean: n/a (NaN), without numpy's "Mean of empty slice" warning
    estimate = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    return TestResult(float(res.statistic), float(res.pvalue),
                      "Welch t test (unequal variances), two-sided, H0: mean(a) = mean(b)",
                      (a.size, b.size), df=float(res.df), estimate=estimate)


def mann_whitney(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Mann-Whitney U test, two-sided; exact null distribution for small samples without ties."""
    a, b = _arr(a), _arr(b)
    with _quiet():
        res = stats.mannwhitneyu(a, b, alternative="two-sided", method="auto")
    return TestResult(float(res.statistic), float(res.pvalue),
                      "Mann-Whitney U test (U of a), two-sided, H0: P(a > b) = P(b > a)",
                      (a.size, b.size))


def cohens_d(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Cohen's d = (mean(a) - mean(b)) / pooled sd, pooled sd with n-1 weights per group."""
    a, b = _arr(a), _arr(b)
    na, nb = a.size, b.size
    dof = na + nb - 2
    if na < 2 or nb < 2:
        d = math.nan
    else:
        pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / dof)
        diff = float(a.mean() - b.mean())
        d = diff / pooled if pooled > 0 else math.copysign(math.inf, diff) if diff else math.nan
    return TestResult(d, math.nan, "Cohen's d, pooled sd sqrt(((na-1)sa² + (nb-1)sb²)/(na+nb-2))",
                      (na, nb))


def paired_t(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Paired t test on a - b, two-sided (pairs with a non-finite member are dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    with _quiet():
        res = stats.ttest_rel(a, b)
    return TestResult(float(res.statistic), float(res.pvalue),
                      "paired t test, two-sided, H0: mean(a - b) = 0", int(a.size),
                      df=float(res.df), estimate=float((a - b).mean()) if a.size else math.nan)


def anova_oneway(*groups: ArrayLike) -> TestResult:
    """One-way ANOVA F test across ``groups`` (equal variances assumed)."""
    arrs = [_arr(g) for g in groups]
    with _quiet():
        res = stats.f_oneway(*arrs)
    k, n = len(arrs), sum(a.size for a in arrs)
    return TestResult(float(res.statistic), float(res.pvalue),
                      f"one-way ANOVA F test over {k} groups, H0: all group means equal",
                      tuple(a.size for a in arrs), df=(float(k - 1), float(n - k)))


def bootstrap_ci(x: ArrayLike, statistic: Callable[[np.ndarray], float] = np.mean, *,
                 level: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> TestResult:
    """Percentile bootstrap confidence interval of ``statistic`` (seeded, so reproducible)."""
    x = _arr(x)
    value = float(statistic(x)) if x.size else math.nan
    ci = (math.nan, math.nan)
    if x.size >= 2 and np.ptp(x) > 0:
        vectorized = statistic in (np.mean, np.median)  # these take axis=: one numpy call
        res = stats.bootstrap((x,), statistic, n_resamples=n_resamples, confidence_level=level,
                              method="percentile", vectorized=vectorized,
                              rng=np.random.default_rng(seed))
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    elif x.size >= 2:  # constant data: every resample gives the same value
        ci = (value, value)
    return TestResult(value, math.nan, f"{level:.0%} percentile bootstrap CI "
                      f"({n_resamples} resamples, seed {seed})", int(x.size), ci=ci)


def _corr_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` [n] with each row of ``ys`` [m, n]."""
    xc = x - x.mean()
    yc = ys - ys.mean(axis=-1, keepdims=True)
    denom = math.sqrt(float(xc @ xc)) * np.sqrt((yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc @ xc) / denom


def permutation_corr_test(x: ArrayLike, y: ArrayLike, method: str = "pearson", *,
                          seed: int = 0, n_resamples: int = MC_RESAMPLES) -> TestResult:
    """Permutation test of the correlation of ``x`` and ``y`` (the richer form).

    Two-sided p = share of pairings of y with x whose |r| >= |r observed| (the observed pairing
    included). Exact (all n! pairings) for n <= 8, else ``n_resamples`` seeded random pairings.
    Spearman is Pearson on average ranks.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', not {method!r}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = x.size
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
    name = "Pearson r" if method == "pearson" else "Spearman rho"
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return TestResult(math.nan, math.nan, f"{name}: undefined (n < 3 or constant input)", n)
    observed = float(_corr_rows(x, y[None, :])[0])
    if n <= EXACT_MAX_N:
        perms = np.array(list(itertools.permutations(range(n))))
        how = f"exact, all {len(perms)} permutations"
    else:
        rng = np.random.default_rng(seed)
        perms = np.vstack([np.arange(n)[None, :],
                           rng.permuted(np.tile(np.arange(n), (n_resamples - 1, 1)), axis=1)])
        how = f"Monte Carlo, {n_resamples} permutations incl. the observed one, seed {seed}"
    null = _corr_rows(x, y[perms])
    extreme = np.abs(null) >= abs(observed) * (1 - _TIE_RTOL)
    return TestResult(observed, float(extreme.mean()),
                      f"permutation test of {name} ({how}); two-sided p = share of permutations "
                      f"with |stat| >= |observed|", n)


def permutation_corr(x: ArrayLike, y: ArrayLike, method: str = "pearson") -> tuple[float, float]:
    """``(stat, p)`` of `permutation_corr_test`: exact for n <= 8, two-sided on |stat|."""
    res = permutation_corr_test(x, y, method)
    return res.statistic, res.pvalue


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN entries stay NaN and are outside the family.

    The step-down formula, max over j <= i of (m - j + 1) p_(j), capped at 1, in numpy: equal
    to statsmodels' ``multipletests(method="holm")`` (tests/test_stats.py checks it), which
    calls ``gc.collect()`` on every call (~0.25 s each in a process holding matplotlib and
    scipy; a report adjusts a dozen families).
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        steps = np.maximum.accumulate(p[order] * np.arange(ok.size, 0, -1))
        out[order] = np.minimum(steps, 1.0)
    return out


@dataclass(frozen=True)
class CorrelationMatrix:
    names: tuple[str, ...]
    r: np.ndarray  # [k, k]
    p: np.ndarray  # [k, k], asymptotic two-sided p of scipy
    n: np.ndarray  # [k, k] pairwise-complete sample sizes
    method: str


def correlation_matrix(data: Mapping[str, ArrayLike], method: str = "pearson"
                       ) -> CorrelationMatrix:
    """Pairwise correlations of the columns of ``data`` (pairwise-complete observations)."""
    names = tuple(data)
    cols = [np.asarray(data[k], dtype=float) for k in names]
    k = len(names)
    r, p, n = np.eye(k), np.zeros((k, k)), np.zeros((k, k), dtype=int)
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    for i, j in itertools.combinations_with_replacement(range(k), 2):
        keep = np.isfinite(cols[i]) & np.isfinite(cols[j])
        n[i, j] = n[j, i] = int(keep.sum())
        if i == j:
            continue
        a, b = cols[i][keep], cols[j][keep]
        if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            r[i, j] = r[j, i] = p[i, j] = p[j, i] = math.nan
            continue
        with _quiet():
            res = fn(a, b)
        r[i, j] = r[j, i] = float(res.statistic)
        p[i, j] = p[j, i] = float(res.pvalue)
    return CorrelationMatrix(names, r, p, n, method)

"""Small-sample statistics for experiment reports: mean with a Student-t CI, and Welch's t-test.

An experiment repeats each configuration over a few seeds (typically n = 3), so every number in a
report is a mean over seeds with a 95% confidence interval from Student's t distribution
(`mean ± t(0.975, n-1) · s / sqrt(n)`, s the sample standard deviation with ddof = 1). With n = 1
there is no spread to estimate and no interval: `MeanCI.half_width` is None, never 0.

Two configurations are compared with Welch's unequal-variance t-test (Welch 1947; degrees of
freedom by the Welch–Satterthwaite equation), as `scipy.stats.ttest_ind(equal_var=False)`
computes it, plus the matching CI of the difference of means. It needs n >= 2 on both sides;
otherwise the comparison is "n/a" with a reason. A bootstrap is deliberately not offered: with
three seeds a resampling distribution has at most ten distinct means and its interval is not
trustworthy.

When runs with the same seed share everything but the configuration (in this tool: the same
initial weights and the same samples in the same order, both set by the seed), `paired` compares
them seed by seed: a one-sample t-test on the per-seed differences, which removes the seed-to-seed
variation both runs share. It needs n >= 2 common seeds.

`holm` adjusts a family of p-values for multiple comparisons (Holm 1979), so a report can say
which differences survive having looked at several configurations at once.

Missing values (None) are dropped and counted out of n; non-finite values are kept, so a seed that
diverged to NaN makes the mean NaN instead of silently disappearing.

Why the t-tests are written out instead of calling `scipy.stats.ttest_ind(equal_var=False)` and
`ttest_rel(...).confidence_interval()`: they compute the same statistics (tests/unit/test_stats.py
checks t, df, p and the CI against them), but with numpy's arithmetic (pairwise sums, its own
variance) instead of `math.fsum`, so they differ in the last one or two bits (8 of the 18
comparisons of docs/results/tier-mix). The CSV and JSON carry full-precision floats, and a
committed report must regenerate byte for byte. scipy still supplies the t distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True, slots=True)
class MeanCI:
    """Mean of n values with a two-sided Student-t confidence interval (None when n < 2)."""

    n: int
    mean: float | None
    """None when n == 0."""
    std: float | None
    """Sample standard deviation (ddof = 1); None when n < 2."""
    half_width: float | None
    """`t(1 - (1 - confidence)/2, n - 1) * std / sqrt(n)`; None when n < 2."""
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float | None:
        return None if self.half_width is None or self.mean is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None or self.mean is None else self.mean + self.half_width

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": json_number(self.mean), "std": json_number(self.std),
                "ci_half_width": json_number(self.half_width), "ci_low": json_number(self.low),
                "ci_high": json_number(self.high), "confidence": self.confidence}


@dataclass(frozen=True, slots=True)
class Comparison:
    """`mean(x) - mean(baseline)` with Welch's t-test; `p` is None (n/a) when either n < 2."""

    n_x: int
    n_baseline: int
    mean_x: float | None
    mean_baseline: float | None
    diff: float | None
    """mean(x) - mean(baseline); computed whenever both sides have n >= 1."""
    t: float | None
    df: float | None
    """Welch–Satterthwaite degrees of freedom."""
    p: float | None
    """Two-sided p-value of Welch's t-test; None when the test is not applicable."""
    ci_low: float | None
    ci_high: float | None
    """CI of the difference at `confidence`, with the Welch df."""
    reason: str | None = None
    """Why the test is n/a, when it is."""
    confidence: float = CONFIDENCE

    @property
    def applicable(self) -> bool:
        return self.p is not None

    def significant(self, alpha: float = ALPHA) -> bool | None:
        """p < alpha; None when the test is n/a."""
        return None if self.p is None else self.p < alpha

    def to_dict(self) -> dict:
        """The test's own numbers. No `significant` here: whether a difference counts is decided on
        the Holm-adjusted p over its family, which only the report knows (export.py adds it)."""
        return {"n_x": self.n_x, "n_baseline": self.n_baseline, "mean_x": json_number(self.mean_x),
                "mean_baseline": json_number(self.mean_baseline), "diff": json_number(self.diff),
                "t": json_number(self.t), "df": json_number(self.df), "p_welch": json_number(self.p),
                "ci_low": json_number(self.ci_low), "ci_high": json_number(self.ci_high),
                "reason": self.reason, "confidence": self.confidence}


def clean(values: Iterable[float | None]) -> list[float]:
    """Drop None (missing); keep NaN/Inf (a diverged seed must stay visible)."""
    return [float(v) for v in values if v is not None]


def t_quantile(q: float, df: float) -> float:
    """Student-t quantile (scipy.stats.t.ppf)."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> MeanCI:
    """Mean and two-sided Student-t CI over seeds. n = 1: no std, no CI. n = 0: all None."""
    xs = clean(values)
    n = len(xs)
    if n == 0:
        return MeanCI(0, None, None, None, confidence)
    mean = math.fsum(xs) / n
    if n == 1:
        return MeanCI(1, mean, None, None, confidence)
    std = _sample_std(xs, mean)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) if math.isfinite(std) else math.nan
    return MeanCI(n, mean, std, half, confidence)


def welch(x: Sequence[float | None], baseline: Sequence[float | None],
          confidence: float = CONFIDENCE) -> Comparison:
    """Welch's t-test of mean(x) against mean(baseline), and the CI of their difference.

    n/a (p None, with `reason`) when either side has fewer than 2 values, a value is not finite,
    or both sides have zero spread (the t statistic is undefined).
    """
    a, b = clean(x), clean(baseline)
    na, nb = len(a), len(b)
    ma = math.fsum(a) / na if na else None
    mb = math.fsum(b) / nb if nb else None
    diff = ma - mb if ma is not None and mb is not None else None
    means = (na, nb, ma, mb, diff)
    if na < 2 or nb < 2:
        return _not_applicable(means, f"needs n >= 2 seeds on both sides (have {na} vs {nb})", confidence)
    if not all(math.isfinite(v) for v in (*a, *b)):
        return _not_applicable(means, "a value is NaN or Inf", confidence)
    va, vb = _sample_std(a, ma) ** 2 / na, _sample_std(b, mb) ** 2 / nb
    se = math.sqrt(va + vb)
    if se == 0.0:
        return _not_applicable(means, "no spread on either side (identical values)", confidence)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return _t_test(means, se, df, confidence)


def paired(x: Mapping[int, float | None], baseline: Mapping[int, float | None],
           confidence: float = CONFIDENCE) -> Comparison:
    """Paired t-test over the seeds both sides have: mean of `x[s] - baseline[s]`, its CI and p.

    `n_x == n_baseline` is the number of pairs; n/a (p None, with `reason`) below 2 pairs, with a
    non-finite value, or when every pair differs by exactly the same amount (no spread).
    """
    seeds = sorted(s for s in x.keys() & baseline.keys() if x[s] is not None and baseline[s] is not None)
    diffs = [float(x[s]) - float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    n = len(diffs)
    ma = math.fsum(float(x[s]) for s in seeds) / n if n else None  # type: ignore[arg-type]
    mb = math.fsum(float(baseline[s]) for s in seeds) / n if n else None  # type: ignore[arg-type]
    diff = math.fsum(diffs) / n if n else None
    means = (n, n, ma, mb, diff)
    if n < 2:
        return _not_applicable(means, f"needs n >= 2 seeds run on both sides (have {n} in common)", confidence)
    if not all(math.isfinite(d) for d in diffs):
        return _not_applicable(means, "a value is NaN or Inf", confidence)
    se = _sample_std(diffs, diff) / math.sqrt(n)
    if se == 0.0:
        return _not_applicable(means, "every seed differs by the same amount (no spread)", confidence)
    return _t_test(means, se, float(n - 1), confidence)


_Means = tuple[int, int, float | None, float | None, float | None]
"""(n_x, n_baseline, mean_x, mean_baseline, diff), the first five fields of a `Comparison`."""


def _t_test(means: _Means, se: float, df: float, confidence: float) -> Comparison:
    """Two-sided t-test of `diff / se` with `df` degrees of freedom, and the CI `diff ± t(df) · se`."""
    from scipy import stats

    diff = means[4]
    t = diff / se
    p = float(2.0 * stats.t.sf(abs(t), df))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return Comparison(*means, t, df, p, diff - half, diff + half, None, confidence)


def _not_applicable(means: _Means, reason: str, confidence: float) -> Comparison:
    return Comparison(*means, None, None, None, None, None, reason, confidence)


@dataclass(frozen=True, slots=True)
class Equivalence:
    """Two one-sided paired t-tests (TOST; Schuirmann 1987) of |mean difference| < delta."""

    delta: float
    p: float | None
    """max of the two one-sided p-values; None when n/a (fewer than 2 pairs, no spread)."""
    ci90_low: float | None
    ci90_high: float | None
    """The (1 - 2 alpha) CI: equivalence at alpha holds exactly when it lies inside (-delta, +delta)."""

    def equivalent(self, alpha: float = ALPHA) -> bool:
        return self.p is not None and self.p < alpha


def tost_paired(x: Mapping[int, float | None], baseline: Mapping[int, float | None], delta: float,
                alpha: float = ALPHA) -> Equivalence:
    """TOST over the seeds both sides have: H0 |mean(x - baseline)| >= delta, at level alpha."""
    from scipy import stats

    seeds = sorted(s for s in x.keys() & baseline.keys() if x[s] is not None and baseline[s] is not None)
    diffs = [float(x[s]) - float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    n = len(diffs)
    if n < 2 or not all(math.isfinite(d) for d in diffs):
        return Equivalence(delta, None, None, None)
    mean = math.fsum(diffs) / n
    se = _sample_std(diffs, mean) / math.sqrt(n)
    if se == 0.0:
        return Equivalence(delta, None, None, None)
    df = float(n - 1)
    p_low = float(stats.t.sf((mean + delta) / se, df))     # H0: diff <= -delta
    p_high = float(stats.t.cdf((mean - delta) / se, df))   # H0: diff >= +delta
    half = t_quantile(1.0 - alpha, df) * se
    return Equivalence(delta, max(p_low, p_high), mean - half, mean + half)


def significance_word(comp: Comparison, holm_p: float | None) -> str:
    """`yes` only when the Holm-adjusted p is below alpha: a report compares several configurations
    against one baseline, so an unadjusted p < alpha alone is `unadjusted only`, not a finding."""
    if comp.p is None:
        return "n/a"
    if holm_p is not None and holm_p < ALPHA:
        return "yes"
    return "unadjusted only" if comp.p < ALPHA else "no"


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); None stays None."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _sample_std(xs: Sequence[float], mean: float) -> float:
    return math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (len(xs) - 1))


def json_number(v: float | None) -> float | None:
    """JSON has no NaN/Inf: they become None (reports count non-finite values separately)."""
    return v if v is not None and math.isfinite(v) else None

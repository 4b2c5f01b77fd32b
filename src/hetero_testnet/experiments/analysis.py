"""The pre-registered analysis (prereg.py) computed from a report's runs: outcomes and the verdict.

Exactly what the experiment file declared and nothing more: per primary comparison the paired
t-test over the seeds both configurations finished (two-sided), Holm-adjusted over the primary
family; the TOST for equivalence within ±delta; the 95% upper bound for non-inferiority; per check
its mean paired difference and unadjusted paired p; then the first verdict rule that holds.
results.json and results.md carry these numbers under the same field names (`FIELDS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.experiments.prereg import Analysis, Condition, VerdictRule
from hetero_testnet.experiments.stats import holm, json_number, paired, tost_paired

BySeed = Callable[[str], Mapping[int, float | None]]
ByMetric = Callable[[str, str], Mapping[int, float | None]]
"""(label, metric) -> that configuration's metric per finished seed."""
FIELDS = ("comparison", "a", "b", "n_pairs", "diff", "ci95_low", "ci95_high", "ci90_low", "ci90_high", "t", "df",
          "p", "p_holm", "significant", "tost_p", "equivalent", "non_inferior", "outcomes")
"""The columns of a primary comparison, in results.json (`analysis.comparisons[]`) and results.md alike."""
CHECK_FIELDS = ("check", "a", "b", "n_pairs", "diff", "max_diff", "p", "passed")


@dataclass
class ComparisonResult:
    comparison: str
    a: str
    b: str
    n_pairs: int
    diff: float | None
    ci95_low: float | None
    ci95_high: float | None
    ci90_low: float | None
    ci90_high: float | None
    t: float | None
    df: float | None
    p: float | None
    p_holm: float | None = None
    significant: bool = False
    """Holm-adjusted p < alpha: the decision."""
    tost_p: float | None = None
    equivalent: bool = False
    non_inferior: bool = False
    outcomes: list[str] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in FIELDS}
        return {k: json_number(v) if isinstance(v, float) else v for k, v in d.items()} | {"reason": self.reason}


@dataclass
class CheckResult:
    check: str
    a: str
    b: str
    n_pairs: int
    diff: float | None
    max_diff: float
    p: float | None
    passed: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in CHECK_FIELDS}
        return {k: json_number(v) if isinstance(v, float) else v for k, v in d.items()} | {"reason": self.reason}


@dataclass
class AnalysisResult:
    analysis: Analysis
    comparisons: list[ComparisonResult]
    checks: list[CheckResult]
    verdict: str
    verdict_reason: str
    secondary: list[ComparisonResult] = field(default_factory=list)
    """Pre-registered secondary comparisons: their own metrics and Holm family, not in the verdict."""

    def comparison(self, name: str) -> ComparisonResult:
        return next(c for c in self.comparisons if c.comparison == name)

    def to_dict(self) -> dict[str, Any]:
        return {"declared": self.analysis.to_dict(), "comparisons": [c.to_dict() for c in self.comparisons],
                "checks": [c.to_dict() for c in self.checks], "verdict": self.verdict,
                "verdict_reason": self.verdict_reason,
                **({"secondary": [c.to_dict() for c in self.secondary]} if self.secondary else {})}


def _compare(analysis: Analysis, name: str, a: str, b: str, by_seed: BySeed) -> ComparisonResult:
    pa, pb = by_seed(a), by_seed(b)
    cp = paired(pa, pb)
    eq = tost_paired(pa, pb, analysis.delta, analysis.alpha)
    return ComparisonResult(comparison=name, a=a, b=b, n_pairs=cp.n_x, diff=cp.diff, ci95_low=cp.ci_low,
                            ci95_high=cp.ci_high, ci90_low=eq.ci90_low, ci90_high=eq.ci90_high, t=cp.t, df=cp.df,
                            p=cp.p, tost_p=eq.p, equivalent=eq.equivalent(analysis.alpha),
                            non_inferior=cp.ci_high is not None and cp.ci_high < analysis.delta, reason=cp.reason)


def _holds(condition: Condition, results: dict[str, ComparisonResult]) -> bool:
    return condition.outcome in results[condition.comparison].outcomes


def _rule_holds(rule: VerdictRule, results: dict[str, ComparisonResult]) -> bool:
    return (all(_holds(c, results) for c in rule.all) if rule.all else True) and \
        (any(_holds(c, results) for c in rule.any) if rule.any else True)


def _describe(rule: VerdictRule) -> str:
    parts = []
    if rule.all:
        parts.append("all of " + ", ".join(map(str, rule.all)))
    if rule.any:
        parts.append("any of " + ", ".join(map(str, rule.any)))
    return " and ".join(parts)


def _decide(analysis: Analysis, family: list[ComparisonResult]) -> None:
    """Holm over one family, then each comparison's outcomes."""
    for r, p_adj in zip(family, holm([r.p for r in family])):
        r.p_holm = p_adj
        r.significant = p_adj is not None and p_adj < analysis.alpha
        r.outcomes = ([("better" if r.diff < 0 else "worse")] if r.significant and r.diff else []) + \
            (["equivalent"] if r.equivalent else []) + (["non_inferior"] if r.non_inferior else [])


def run_analysis(analysis: Analysis, by_seed: BySeed, by_metric: ByMetric | None = None) -> AnalysisResult:
    """Compute the declared analysis; `by_seed(label)` gives a configuration's primary metric per
    finished seed, `by_metric(label, metric)` any metric (for the secondary comparisons)."""
    results = [_compare(analysis, c.name, c.a, c.b, by_seed) for c in analysis.comparisons]
    _decide(analysis, results)
    secondary = [_compare(analysis, c.name, c.a, c.b, lambda label, m=c.metric: by_metric(label, m))
                 for c in analysis.secondary] if by_metric is not None else []
    _decide(analysis, secondary)
    checks = []
    for c in analysis.checks:
        cp = paired(by_seed(c.a), by_seed(c.b))
        ok = cp.p is not None and cp.diff is not None and cp.diff <= c.max_diff and cp.p < analysis.alpha
        checks.append(CheckResult(c.name, c.a, c.b, cp.n_x, cp.diff, c.max_diff, cp.p, ok, cp.reason))
    failed = [c.check for c in checks if not c.passed]
    if failed:
        return AnalysisResult(analysis, results, checks, analysis.failed_check,
                              f"check {', '.join(failed)} did not pass, so no comparison is interpreted", secondary)
    by_name = {r.comparison: r for r in results}
    for rule in analysis.verdicts:
        if _rule_holds(rule, by_name):
            return AnalysisResult(analysis, results, checks, rule.verdict, f"{_describe(rule)} held", secondary)
    return AnalysisResult(analysis, results, checks, analysis.otherwise, "no verdict rule held", secondary)

"""The pre-registered analysis of an experiment file (`analysis:`), declared before any run exists.

An experiment that wants to *answer* a question says in its YAML, before it runs, what answers it:

    analysis:
      metric: val_loss_widest         # the primary endpoint (a report metric; lower is better): here the
                                      # val loss of the widest model each configuration trained
      test: paired_t                  # paired by seed (same seed = same initial weights), two-sided
      correction: holm                # over the primary comparisons, at alpha
      alpha: 0.05
      delta: 0.02                     # smallest effect of interest, in the metric's units (nats)
      equivalence: tost               # "no difference" = two one-sided tests at alpha: 90% CI in (-delta, +delta)
      comparisons:                    # the primary family; diff = a - b, paired by seed
        - {name: HET-CM, a: HET, b: CM}
      secondary:                      # pre-registered too, each with its own metric; Holm over this family
        - {name: HET-SMALL-tier2, a: HET, b: SMALL, metric: val_loss_tier2}   # not in the verdict
      checks:                         # preconditions (manipulation checks), not in the Holm family
        - {name: ORACLE-SMALL, a: ORACLE, b: SMALL, max_diff: -0.05}
      verdicts:                       # checked in order, the first that holds is the verdict
        - {verdict: helps, all: [HET-SMALL better, HET-DROP better, HET-CM non_inferior]}
        - {verdict: hurts, any: [HET-DROP worse, HET-CM worse]}
      otherwise: inconclusive
      failed_check: "inconclusive: ..."   # the verdict when a check fails, whatever the comparisons say

Per comparison the report computes one *outcome* of each kind, and a verdict condition names one:
- `better` / `worse`: Holm-adjusted paired p < alpha, and the difference below / above 0;
- `equivalent`: TOST at alpha (both one-sided p < alpha; the 90% CI lies inside (-delta, +delta));
- `non_inferior`: the upper bound of the two-sided 95% CI is below +delta.
A check passes when the mean paired difference is at most `max_diff` and its (unadjusted) paired
p < alpha. Conditions over several comparisons are intersection-union tests (every one must hold),
so they need no further multiplicity correction. Everything else in a report is exploratory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from hetero_testnet.errors import ConfigError

OUTCOMES = ("better", "worse", "equivalent", "non_inferior")
TESTS = ("paired_t",)
CORRECTIONS = ("holm",)
EQUIVALENCE = ("tost",)
_METRIC = re.compile(r"(val|train)_loss_tier\d+|val_loss_widest")


@dataclass(frozen=True, slots=True)
class PlannedComparison:
    name: str
    a: str
    b: str
    """diff = metric(a) - metric(b), seed by seed."""


@dataclass(frozen=True, slots=True)
class SecondaryComparison:
    name: str
    a: str
    b: str
    metric: str
    """Its own metric (e.g. a submodel's val loss); diff = metric(a) - metric(b), seed by seed."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    a: str
    b: str
    max_diff: float


@dataclass(frozen=True, slots=True)
class Condition:
    comparison: str
    outcome: str

    def __str__(self) -> str:
        return f"{self.comparison} {self.outcome}"


@dataclass(frozen=True, slots=True)
class VerdictRule:
    verdict: str
    all: tuple[Condition, ...] = ()
    any: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Analysis:
    metric: str
    test: str
    correction: str
    alpha: float
    delta: float
    equivalence: str
    comparisons: tuple[PlannedComparison, ...]
    checks: tuple[Check, ...]
    verdicts: tuple[VerdictRule, ...]
    otherwise: str
    failed_check: str
    secondary: tuple[SecondaryComparison, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.secondary:
            d["secondary"] = [asdict(c) for c in self.secondary]
        else:  # experiment.json of files without it stays as it was
            del d["secondary"]
        d["comparisons"] = [asdict(c) for c in self.comparisons]
        d["checks"] = [asdict(c) for c in self.checks]
        d["verdicts"] = [{"verdict": r.verdict, "all": [str(c) for c in r.all], "any": [str(c) for c in r.any]}
                         for r in self.verdicts]
        return d


def _req(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _str(d: dict, key: str, where: str, default: str | None = None) -> str:
    value = d.pop(key, default)
    _req(isinstance(value, str) and bool(value.strip()), f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _num(d: dict, key: str, where: str, default: float | None = None) -> float:
    value = d.pop(key, default)
    _req(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: field {key!r} must be a number")
    return float(value)


def _pairs(items: Any, where: str, labels: set[str], cls: type) -> tuple:
    _req(isinstance(items, list), f"{where} must be a list")
    out = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        _req(isinstance(item, dict), f"{here} must be a mapping with name, a, b")
        d = dict(item)
        name, a, b = _str(d, "name", here), _str(d, "a", here), _str(d, "b", here)
        for label in (a, b):
            _req(label in labels, f"{here}: {label!r} is not a configuration label")
        extra = {"max_diff": _num(d, "max_diff", here)} if cls is Check else {}
        if cls is SecondaryComparison:
            extra = {"metric": _str(d, "metric", here)}
            _req(bool(_METRIC.fullmatch(extra["metric"])), f"{here}: metric must be val_loss_tier<t>, "
                 "train_loss_tier<t> or val_loss_widest")
        _req(not d, f"{here}: unknown field {', '.join(map(repr, d))}")
        out.append(cls(name=name, a=a, b=b, **extra))
    return tuple(out)


def _conditions(items: Any, where: str, names: set[str]) -> tuple[Condition, ...]:
    _req(isinstance(items, list), f"{where} must be a list of '<comparison> <outcome>' strings")
    out = []
    for item in items:
        parts = str(item).split()
        _req(len(parts) == 2 and parts[0] in names and parts[1] in OUTCOMES,
             f"{where}: {item!r} must be '<comparison> <outcome>' with a primary comparison "
             f"({', '.join(sorted(names))}) and an outcome ({', '.join(OUTCOMES)})")
        out.append(Condition(parts[0], parts[1]))
    return tuple(out)


def _verdicts(items: Any, where: str, names: set[str]) -> tuple[VerdictRule, ...]:
    _req(isinstance(items, list) and bool(items), f"{where} must list at least one verdict rule")
    rules = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        _req(isinstance(item, dict), f"{here} must be a mapping with verdict and all or any")
        d = dict(item)
        verdict = _str(d, "verdict", here)
        all_ = _conditions(d.pop("all", []), f"{here}.all", names)
        any_ = _conditions(d.pop("any", []), f"{here}.any", names)
        _req(bool(all_ or any_), f"{here} needs `all` or `any` conditions")
        _req(not d, f"{here}: unknown field {', '.join(map(repr, d))}")
        rules.append(VerdictRule(verdict, all_, any_))
    return tuple(rules)


def parse_analysis(raw: Any, where: str, labels: set[str]) -> Analysis:
    """The `analysis:` mapping of an experiment file, validated against its configuration labels."""
    _req(isinstance(raw, dict), f"{where} must be a mapping")
    d = dict(raw)
    metric = _str(d, "metric", where, "val_loss_tier0")
    _req(bool(_METRIC.fullmatch(metric)), f"{where}: metric must be val_loss_tier<t>, train_loss_tier<t> or "
         "val_loss_widest")
    test, correction = _str(d, "test", where, "paired_t"), _str(d, "correction", where, "holm")
    equivalence = _str(d, "equivalence", where, "tost")
    _req(test in TESTS, f"{where}: test must be one of {', '.join(TESTS)}")
    _req(correction in CORRECTIONS, f"{where}: correction must be one of {', '.join(CORRECTIONS)}")
    _req(equivalence in EQUIVALENCE, f"{where}: equivalence must be one of {', '.join(EQUIVALENCE)}")
    alpha, delta = _num(d, "alpha", where, 0.05), _num(d, "delta", where)
    _req(0 < alpha < 0.5 and delta > 0, f"{where}: alpha must be in (0, 0.5) and delta > 0")
    comparisons = _pairs(d.pop("comparisons", None), f"{where}.comparisons", labels, PlannedComparison)
    _req(bool(comparisons), f"{where}.comparisons must list at least one comparison")
    checks = _pairs(d.pop("checks", []), f"{where}.checks", labels, Check)
    secondary = _pairs(d.pop("secondary", []), f"{where}.secondary", labels, SecondaryComparison)
    names = [c.name for c in (*comparisons, *checks, *secondary)]
    _req(len(set(names)) == len(names), f"{where}: comparison and check names must be unique")
    verdicts = _verdicts(d.pop("verdicts", None), f"{where}.verdicts", {c.name for c in comparisons})
    otherwise = _str(d, "otherwise", where, "inconclusive")
    failed_check = _str(d, "failed_check", where, "inconclusive: a precondition (check) failed")
    _req(not d, f"{where}: unknown field {', '.join(map(repr, d))}")
    return Analysis(metric=metric, test=test, correction=correction, alpha=alpha, delta=delta,
                    equivalence=equivalence, comparisons=comparisons, checks=checks, verdicts=verdicts,
                    otherwise=otherwise, failed_check=failed_check, secondary=secondary)


def analysis_from_dict(d: dict[str, Any]) -> Analysis:
    """An `Analysis` again from its `to_dict()` (as experiment.json records it)."""
    raw = {**d, "verdicts": [{"verdict": r["verdict"], **({"all": r["all"]} if r["all"] else {}),
                              **({"any": r["any"]} if r["any"] else {})} for r in d["verdicts"]]}
    labels = {x for c in (*d["comparisons"], *d.get("checks", []), *d.get("secondary", []))
              for x in (c["a"], c["b"])}
    return parse_analysis(raw, "experiment.json: analysis", labels)

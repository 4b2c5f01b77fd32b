"""results.md sections for the pre-registered analysis and the reference lines (render.py joins them).

The analysis tables use the field names of results.json (`analysis.comparisons[]`,
`analysis.checks[]`) as their column headers, in the same order (analysis.FIELDS), so a reader can
recompute any cell from the JSON and find it under the same name.
"""

from __future__ import annotations

from typing import Any

from hetero_testnet.experiments.analysis import CHECK_FIELDS, FIELDS, AnalysisResult
from hetero_testnet.experiments.format import NA, fmt, fmt_p
from hetero_testnet.experiments.references import References
from hetero_testnet.experiments.report import Report

_P_FIELDS = {"p", "p_holm", "tost_p"}


def reference_rows(refs: References) -> list[list[str]]:
    rows = []
    if refs.unigram is not None:
        rows.append(["unigram", fmt(refs.unigram), f"add-k token frequencies of the training split, k = {refs.unigram_k:g}"
                     " (fitted on the training split)"])
    if refs.bigram is not None:
        rows.append(["bigram", fmt(refs.bigram), f"interpolated bigram, λ = {refs.bigram_lambda:g} with that "
                     "unigram (fitted on the training split)"])
    if refs.untrained is not None:
        rows.append(["untrained model", fmt(refs.untrained), f"the run config's model at initialisation, seed "
                     f"{refs.untrained_seed}, full model"])
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, bool):
        return "**true**" if value else "false"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    if isinstance(value, float):
        return fmt_p(value) if key in _P_FIELDS else (f"{value:.1f}" if key == "df" else fmt(value, signed=True))
    return f"`{value}`" if key in ("comparison", "check", "a", "b") else str(value)


def _table(fields: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(f"`{f}`" for f in fields) + " |", "|" + "|".join("---" for _ in fields) + "|"]
    return out + ["| " + " | ".join(_cell(f, row.get(f)) for f in fields) + " |" for row in rows]


def _declared(result: AnalysisResult) -> list[str]:
    a = result.analysis
    lines = [f"- Primary metric: `{a.metric}` (lower is better). Test: `{a.test}` (paired by seed over the seeds "
             f"both configurations finished, two-sided), correction: `{a.correction}` over the {len(a.comparisons)} "
             f"primary comparisons, alpha = {a.alpha:g}.",
             f"- Smallest effect of interest delta = {a.delta:g}; equivalence: `{a.equivalence}` (two one-sided "
             f"tests at alpha: `equivalent` when `tost_p` < {a.alpha:g}, i.e. the 90% CI "
             f"(`ci90_low`, `ci90_high`) lies inside ±{a.delta:g}); `non_inferior` when `ci95_high` < +{a.delta:g}.",
             f"- Outcomes: `better` / `worse` = `significant` (`p_holm` < {a.alpha:g}) with `diff` < 0 / > 0 "
             "(diff = a − b).",
             "- Verdict rules, checked in order (the first that holds is the verdict):"]
    for rule in a.verdicts:
        parts = ([f"all of {', '.join(map(str, rule.all))}"] if rule.all else []) + \
            ([f"any of {', '.join(map(str, rule.any))}"] if rule.any else [])
        lines.append(f"  - **{rule.verdict}** if {' and '.join(parts)}")
    lines.append(f"  - otherwise **{a.otherwise}**")
    if a.checks:
        names = ", ".join(f"`{c.name}` ({c.a} − {c.b} ≤ {c.max_diff:g}, paired p < {a.alpha:g})" for c in a.checks)
        lines.append(f"- Preconditions (checks, not in the Holm family): {names}; if one fails the verdict is "
                     f"**{a.failed_check}**.")
    return lines


def analysis_sections(report: Report) -> list[list[str]]:
    """The pre-registered analysis: what was declared, the checks, the primary comparisons, the verdict."""
    result = report.analysis
    if result is None:
        return []
    lines = ["## Pre-registered analysis", "",
             "Declared in the experiment file before any run (recorded in experiment.json); computed exactly as "
             "declared. Everything else in this report is exploratory.", "", *_declared(result), ""]
    if result.checks:
        lines += ["### Checks", ""] + _table(CHECK_FIELDS, [c.to_dict() for c in result.checks]) + [""]
    lines += ["### Primary comparisons (diff = a − b, paired by seed)", ""]
    lines += _table(FIELDS, [c.to_dict() for c in result.comparisons]) + [""]
    na = [c for c in result.comparisons if c.reason]
    if na:
        lines += [f"n/a: {', '.join(f'`{c.comparison}` ({c.reason})' for c in na)}.", ""]
    lines += [f"**Verdict: {result.verdict}** ({result.verdict_reason}).", ""]
    if result.secondary:
        metrics = ", ".join(f"`{c.name}`: {c.metric}" for c in result.analysis.secondary)
        lines += ["### Secondary comparisons (pre-registered; their own Holm family; not in the verdict)", "",
                  f"Metrics: {metrics}.", ""]
        lines += _table(FIELDS, [c.to_dict() for c in result.secondary]) + [""]
    return [lines]

""""What these numbers can and cannot tell": plain-language statements generated from a `Report`.

Every statement here holds for any experiment and is worded from the numbers (a difference, its
test, the seeds, the health counts). What only one experiment can say (how a published result it
redoes was measured, say) is not written here but in that experiment's YAML, `report.notes`, and
listed after the statements about method, before those about the runs' health.
"""

from __future__ import annotations

from hetero_testnet.experiments.format import fmt, fmt_p
from hetero_testnet.experiments.report import PRIMARY_METRIC, Report
from hetero_testnet.experiments.stats import ALPHA, Comparison


def conclusions(report: Report) -> list[str]:
    """One Markdown paragraph per statement, in reading order."""
    return [*_references(report), *_against_baseline(report), *_paired(report), *_method(report), *report.notes,
            *_health(report)]


UNIGRAM_BAND = 0.05
"""Within this many nats of the unigram line, a model is said to sit at unigram level."""


def _references(report: Report) -> list[str]:
    """Where each shared model's full-model validation loss sits against the unigram and bigram lines."""
    refs = report.references
    if not refs.available:
        return []
    parts, at_unigram = [], 0
    for c in report.configs:
        s = c.stat(PRIMARY_METRIC)
        if c.sync != "allreduce" or s.mean is None:
            continue
        gap_u, gap_b = s.mean - refs.unigram, s.mean - refs.bigram
        if gap_u > -UNIGRAM_BAND:
            at_unigram += 1
            where = "above the unigram line" if gap_u > 0 else f"at unigram level, less than {UNIGRAM_BAND:g} below it"
        elif gap_b > 0:
            where = "between the unigram and bigram lines"
        else:
            where = "below the bigram line"
        parts.append(f"`{c.label}` {fmt(s.mean)} ({fmt(gap_u, signed=True)} vs unigram, {fmt(gap_b, signed=True)} "
                     f"vs bigram: {where})")
    if not parts:
        return []
    tail = (" A model within a few hundredths of a nat of the unigram line has learned little beyond how often "
            "each token occurs, so differences between such models say nothing about what capacity or "
            "heterogeneity do to a model that learns." if at_unigram else "")
    return [f"Reference lines (unigram {fmt(refs.unigram)}, bigram {fmt(refs.bigram)}, untrained "
            f"{fmt(refs.untrained)}, on the same validation tokens): full-model validation loss " + "; ".join(parts)
            + "." + tail]


def _against_baseline(report: Report) -> list[str]:
    """Per configuration: what Welch's test on full-model validation loss supports."""
    comps = report.comparisons.get(PRIMARY_METRIC, {})
    tested = sum(1 for c in comps.values() if c.applicable)
    return [_welch_statement(report, label, cp, tested) for label, cp in comps.items() if cp.diff is not None]


def _welch_statement(report: Report, label: str, cp: Comparison, tested: int) -> str:
    versus = f"`{label}` vs `{report.baseline}`"
    ci = f"95% CI [{fmt(cp.ci_low, signed=True)}, {fmt(cp.ci_high, signed=True)}]"
    if not cp.applicable:
        return (f"{versus}: full-model validation loss differs by {fmt(cp.diff, signed=True)}, but no test is "
                f"possible ({cp.reason}): a single run per side is an anecdote, not evidence.")
    if not cp.significant():
        return (f"{versus}: the difference in full-model validation loss ({fmt(cp.diff, signed=True)}, {ci}, "
                f"p = {fmt_p(cp.p)}) is not distinguishable from seed noise; this does not show the two are "
                "equal, only that these seeds cannot tell them apart.")
    holm_p = report.holm(PRIMARY_METRIC, label)
    direction = "lower (better)" if cp.diff < 0 else "higher (worse)"
    tail = (f"and survives Holm correction (p = {fmt_p(holm_p)})" if holm_p is not None and holm_p < ALPHA
            else f"but not after Holm correction for {tested} comparisons (p = {fmt_p(holm_p)}): treat it as a "
                 "lead to re-test with more seeds")
    return (f"{versus}: full-model validation loss is {direction} by {fmt(abs(cp.diff))} ({ci}, Welch p = "
            f"{fmt_p(cp.p)}, n = {cp.n_x} vs {cp.n_baseline}) {tail}.")


def _paired(report: Report) -> list[str]:
    """One statement over every configuration the paired-by-seed test applies to."""
    tested = {label: cp for label, cp in report.paired.get(PRIMARY_METRIC, {}).items() if cp.applicable}
    if not tested:
        return []
    base = report.config(report.baseline).by_seed(PRIMARY_METRIC)
    parts = []
    for label, cp in tested.items():
        cfg = report.config(label).by_seed(PRIMARY_METRIC)
        worse = sum(1 for s in cfg.keys() & base.keys()
                    if cfg[s] is not None and base[s] is not None and cfg[s] > base[s])
        parts.append(f"`{label}` {fmt(cp.diff, signed=True)} (higher on {worse} of {cp.n_x} seeds, paired "
                     f"p = {fmt_p(cp.p)}, Holm p = {fmt_p(report.paired_holm(PRIMARY_METRIC, label))})")
    survivors = [label for label in tested if (report.paired_holm(PRIMARY_METRIC, label) or 1.0) < ALPHA]
    verdict = ("; after Holm correction the paired test supports a difference for "
               + ", ".join(f"`{x}`" for x in survivors)) if survivors else \
        "; none survives Holm correction, so the pairing does not turn these into findings either"
    return [f"Paired by seed (same initial weights and batches), full-model validation loss against "
            f"`{report.baseline}`: " + "; ".join(parts) + verdict + "."]


def _method(report: Report) -> list[str]:
    """What the design allows: the tests' power, which loss to compare, `sync: none`, early stopping."""
    ns = sorted({len(c.finished) for c in report.configs if c.sync == "allreduce"})
    out = [f"With n = {'/'.join(map(str, ns)) or '0'} seeds per configuration the tests have little power: "
           "only differences several times the seed-to-seed standard deviation can reach p < 0.05. A difference "
           "smaller than the seed spread (see the tables) is not evidence of anything.",
           "Compare configurations on validation loss, not train loss: train loss is measured on each client's "
           "own batches, tier-t clients train a smaller submodel, and the number of clients per tier differs "
           "between mixes. The train-loss columns describe what each tier experienced, not model quality."]
    if any(c.sync == "none" for c in report.configs):
        out.append("`sync: none` runs are not a shared model: each client trains alone on a fraction of the data and "
                   "its validation loss is per replica (tabled above; the main table shows their mean). They are an "
                   "ablation of the reference's behaviour, usually on one seed, so no significance test applies; "
                   "their numbers are not comparable with a shared model's as a like-for-like result.")
    steps = report.experiment.get("steps")
    sched = report.experiment.get("lr_schedule") or {}
    if steps and sched.get("total_steps") and steps < sched["total_steps"]:
        out.append(f"Runs stop after {steps} of the schedule's {sched['total_steps']} steps: these are early-training "
                   "losses, and a ranking this early need not hold at convergence.")
    return out


def _health(report: Report) -> list[str]:
    """NaN/Inf, explosions, crashes, discards and bad exits; client drops; runs that did not finish."""
    health = {c.label: c.health() for c in report.configs}
    troubled = [label for label, h in health.items() if h["nan_inf_count"] or h["grad_norm_explosions"]
                or h["clients_crashed"] or h["steps_discarded"] or h["client_nonzero_exits"]]
    if troubled:
        out = ["Health problems (NaN/Inf, gradient-norm explosions, crashed clients, discarded steps or client "
               "processes exiting non-zero) occurred in: " + ", ".join(f"`{label}`" for label in troubled)
               + "; their losses deserve suspicion."]
    else:
        out = ["No NaN/Inf values, gradient-norm explosions, crashed clients or discarded steps were recorded."]
    drops = sum(h["client_drops"] for h in health.values())
    if drops:
        out.append(f"{drops} client drop(s) were recorded (see the health table); a client that rejoined resumed "
                   "from the shared state, so its run is still one model, but its timing numbers include the pause.")
    unfinished = [c for c in report.configs if c.runs_not_finished]
    if unfinished:
        out.append("Not every planned run finished (" + ", ".join(f"`{c.label}`: {c.runs_not_finished}"
                                                                  for c in unfinished) +
                   "); their statistics rest on fewer seeds than planned. Rerun `testnet experiment run` to "
                   "complete them (finished runs are skipped).")
    return out

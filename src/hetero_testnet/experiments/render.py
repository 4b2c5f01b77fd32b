"""`results.md` of an experiment `Report` (report.py): one function per section, in the order they appear.

Pure views over the computed numbers: nothing here reads run files or does statistics beyond
formatting. Each section returns its lines (ending with a blank line, or nothing when it does not
apply); `render_markdown` joins them. The prose of "What these numbers can and cannot tell" is
conclusions.py; the plots are plots.py.
"""

from __future__ import annotations

import math

from hetero_testnet.experiments.conclusions import conclusions
from hetero_testnet.experiments.render_analysis import analysis_sections, reference_rows
from hetero_testnet.experiments.render_capacity import capacity_section
from hetero_testnet.experiments.format import NA, fmt, fmt_ci, fmt_p, md_table, tier_name
from hetero_testnet.experiments.report import DIFF_METRICS, PRIMARY_METRIC, ConfigResult, Report
from hetero_testnet.experiments.spec import run_name
from hetero_testnet.experiments.stats import ALPHA, Comparison, significance_word


def render_markdown(report: Report, plot_files: list[str]) -> str:
    sections = [_title(report), _setup(report), _reference_lines(report), *analysis_sections(report),
                _final_losses(report),
                *(_difference(report, metric) for metric in DIFF_METRICS), _paired(report), _health(report),
                capacity_section(report),
                _replicas(report), _runs(report), _plots(plot_files), _conclusions(report), _csv_columns()]
    return "\n".join(line for section in sections for line in section)


# --------------------------------------------------------------------------- sections

def _title(report: Report) -> list[str]:
    exp = report.experiment
    lines = [f"# Experiment `{exp.get('name', 'experiment')}`: results", ""]
    if exp.get("description"):
        lines += [exp["description"].strip(), ""]
    return lines


def _setup(report: Report) -> list[str]:
    exp = report.experiment
    sched = exp.get("lr_schedule") or {}
    n_fin = sum(len(c.finished) for c in report.configs)
    n_planned = sum(len(c.planned_seeds) or len(c.runs) for c in report.configs)
    samples = sorted({r.val_num_samples for r in report.runs if r.val_num_samples is not None})
    lines = ["## Setup", ""]
    if exp.get("base_config"):
        lines.append(f"- Base config `{exp['base_config']}`; each run stops after {exp.get('steps')} committed "
                     f"steps. LR schedule unchanged from the base config: cosine, {sched.get('warmup_steps')} warmup "
                     f"steps, horizon {sched.get('total_steps')} steps, base LR {sched.get('base_lr')}.")
    if exp.get("deadlines"):
        lines.append("- Straggler deadlines (bound waits, do not change training): " + ", ".join(
            f"{k} {v:g} s" for k, v in exp["deadlines"].items()) + ".")
    return lines + [
        f"- Runs: {n_fin} finished of {n_planned} planned. Loss statistics use finished runs only; health "
        "counts (NaN/Inf, gradient-norm explosions, client crashes) use every run directory present.",
        f"- Validation: every {exp.get('eval_every', '?')} steps and at the end, on the same "
        f"{'/'.join(map(str, samples)) or '?'} held-out sequences for every run and tier (tier 0 = the full "
        "model; tier t = the submodel with the first 1/2^t of every FFN's neurons).",
        f"- **Final train loss** (K = {report.last_k}): per client, the mean of its training loss over the "
        f"run's last {report.last_k} committed steps, on its own training batches; per tier, the mean over "
        "that tier's clients. **Final val loss**: validation loss at the run's last evaluation.",
        "- Every number is a mean over seeds ± the half-width of its 95% confidence interval (Student t, "
        "n − 1 degrees of freedom); n is the number of seeds. With n = 1 there is no interval.",
        ("- The experiment declared its analysis before it ran (*Pre-registered analysis* below); every other "
         "test in this report is **exploratory**." if report.analysis else
         "- The experiment declared no analysis before it ran: every test in this report is **exploratory** "
         "(a lead to test again, not a finding)."),
        f"- Exploratory differences are taken against the baseline `{report.baseline}` with Welch's t-test and a "
        f"paired t-test; `p_holm` corrects for comparing several configurations, and `significant` means "
        f"`p_holm` < {ALPHA} (results.json uses the same names). A test needs n ≥ 2 seeds on both sides; otherwise "
        "it is n/a.",
        "",
    ]


def _reference_lines(report: Report) -> list[str]:
    refs = report.references
    if not refs.available:
        return ["## Reference lines", "", f"{refs.reason or 'no reference lines'}.", ""]
    lines = ["## Reference lines (the same validation tokens)", "",
             f"Scored on the {refs.val_targets:,} validation target tokens every run was scored on, fitted on the "
             f"{refs.train_tokens:,}-token training split only (data `{refs.data_dir}`). A model at or above the "
             "unigram line has learned nothing a table of token frequencies does not know; below the bigram line "
             "it uses more than one token of context.", ""]
    lines += md_table(["reference", "val loss (nats/token)", "how"], reference_rows(refs))
    if refs.note:
        lines += ["", f"Note: {refs.note}."]
    return lines + [""]


def _final_losses(report: Report) -> list[str]:
    val_tiers = sorted({t for c in report.configs for r in c.finished for t in r.val_loss_by_tier}) or [0]
    train_tiers = sorted({t for c in report.configs for r in c.finished for t in r.train_loss_by_tier}) \
        or report.tiers
    header = ["configuration", "sync", "seeds n (which)"]
    header += [f"train loss, {tier_name(t, 'train')}, last {report.last_k} steps" for t in train_tiers]
    header += [f"val loss, {tier_name(t, 'val')}" for t in val_tiers]
    rows = []
    for c in report.configs:
        row = [f"`{c.label}` (tiers {','.join(map(str, c.tiers))})", c.sync, _seeds_cell(c)]
        row += [fmt_ci(c.stat(f"train_loss_tier{t}")) for t in train_tiers]
        row += [fmt_ci(c.stat(f"val_loss_tier{t}")) + (" ‡" if c.sync == "none" and c.stat(f"val_loss_tier{t}").n
                                                       else "") for t in val_tiers]
        rows.append(row)
    lines = ["## Final losses (mean ± 95% CI over seeds)", ""] + md_table(header, rows)
    if any(c.sync == "none" for c in report.configs):
        lines += ["", "‡ `sync: none`: no shared model. The value is the mean over the independent replicas "
                  "that evaluated that tier (each client's own model); see *Independent replicas* below."]
    return lines + [""]


def _difference(report: Report, metric: str) -> list[str]:
    """Welch's test of `metric` against the baseline, per configuration."""
    comps = report.comparisons.get(metric)
    if not comps:
        return []
    kind, t = metric.split("_loss_tier")
    what = f"{'validation' if kind == 'val' else 'train'} loss, {tier_name(int(t), kind)}"
    k = sum(1 for cp in comps.values() if cp.applicable)
    header = ["configuration", "n (config vs baseline)", "Δ = config − baseline", "95% CI of Δ",
              "`p_welch`", f"`p_holm` (k={k})", f"`significant` (`p_holm` < {ALPHA})",
              "descriptive only: size of Δ vs the larger seed std"]
    rows = []
    for label, cp in comps.items():
        holm_p = report.holm(metric, label)
        rows.append([f"`{label}`", f"{cp.n_x} vs {cp.n_baseline}", fmt(cp.diff, signed=True), _ci(cp),
                     fmt_p(cp.p), fmt_p(holm_p), _mark(significance_word(cp, holm_p), cp),
                     _spread_word(report, label, metric, cp)])
    return [f"## Exploratory: difference vs baseline `{report.baseline}`, {what} (Welch)", ""] + \
        md_table(header, rows) + [""]


def _paired(report: Report) -> list[str]:
    """Per-seed differences of full-model validation loss, and the paired t-test over them."""
    pairs = report.paired.get(PRIMARY_METRIC, {})
    if not any(cp.n_x for cp in pairs.values()):
        return []
    base_by_seed = report.config(report.baseline).by_seed(PRIMARY_METRIC)
    seeds = sorted(base_by_seed)
    k = sum(1 for cp in pairs.values() if cp.applicable)
    lines = [f"## Exploratory: paired by seed, validation loss, tier 0 (full model), vs `{report.baseline}`", "",
             _pairing_sentence(report) + " With n − 1 degrees of freedom the test rests on very few pairs.", ""]
    header = ["configuration", *(f"Δ seed {s}" for s in seeds), "pairs", "mean Δ", "95% CI of mean Δ",
              "`p` (paired t)", f"`p_holm` (k={k})", f"`significant` (`p_holm` < {ALPHA})"]
    rows = []
    for label, cp in pairs.items():
        cfg = report.config(label).by_seed(PRIMARY_METRIC)
        deltas = [fmt(cfg[s] - base_by_seed[s], signed=True)
                  if cfg.get(s) is not None and base_by_seed[s] is not None else NA for s in seeds]
        holm_p = report.paired_holm(PRIMARY_METRIC, label)
        rows.append([f"`{label}`", *deltas, str(cp.n_x), fmt(cp.diff, signed=True), _ci(cp), fmt_p(cp.p),
                     fmt_p(holm_p), _mark(significance_word(cp, holm_p), cp)])
    return lines + md_table(header, rows) + [""]


def _pairing_sentence(report: Report) -> str:
    """What a seed shares between two runs: the initial weights, and the data order where the runs
    recorded a data seed equal to their seed (every run since seeds vary it; none before)."""
    runs = [r for r in report.runs if r.finished]
    if any(r.data_seed is not None and r.data_seed != r.seed for r in runs):
        return ("Runs with the same seed start from the same initial weights; not every run's data seed equals "
                "its seed (`data_seed` in results.json), so a pair does not always share the data order. A "
                "paired t-test on the per-seed differences removes the initialisation variation both runs share.")
    if runs and all(r.data_seed is not None for r in runs):
        return ("Runs with the same seed start from the same initial weights and train on the same samples in "
                "the same order (the seed sets both; each run's `data_seed` is in results.json), so the seed "
                "pairs them and a paired t-test on the per-seed differences removes the variation of "
                "initialisation and data order both runs share. The intervals show both kinds of variation.")
    return ("Runs with the same seed start from the same initial weights; in this tool every run also trains on "
            "the same global batches in the same order whatever its seed (the seed does not change the data "
            "order), so the seed pairs them and a paired t-test on the per-seed differences removes the "
            "initialisation variation both runs share. The intervals therefore show initialisation noise only.")


def _health(report: Report) -> list[str]:
    header = ["configuration", "steps completed", "wall time (s)", "train tokens/s", "NaN/Inf count",
              f"grad-norm explosions (> {report.grad_norm_threshold:g})", "max grad norm (pre-clip)",
              "clients completed", "clients crashed", "client drops (may rejoin)", "steps discarded",
              "client non-zero exits",
              "runs not finished", "failed attempts"]
    rows = []
    for c in report.configs:
        h = c.health()
        rows.append([f"`{c.label}`", fmt_ci(c.stat("steps_completed"), 1), fmt_ci(c.stat("wall_time_s"), 1),
                     fmt_ci(c.stat("train_tokens_per_sec"), 0), h["nan_inf_count"], h["grad_norm_explosions"],
                     fmt(h["grad_norm_max"], 3), h["clients_completed"], h["clients_crashed"],
                     h["client_drops"], h["steps_discarded"], h["client_nonzero_exits"],
                     c.runs_not_finished, c.failed_attempts])
    return ["## Throughput and health", ""] + md_table(header, rows) + [
        "", "Train tokens/s = tokens of committed steps / their summed step wall time, leaving out rounds "
        "that began right after a periodic validation (clients validate synchronously); wall time is the "
        "coordinator's, start-up and validation included. Runs ran one after another on the same machine; "
        "clients of one run share its cores, so throughput compares configurations only on that machine.",
        ""]


def _replicas(report: Report) -> list[str]:
    """Every replica's final validation loss, for the `sync: none` runs."""
    none_runs = [r for c in report.configs if c.sync == "none" for r in c.runs]
    if not none_runs:
        return []
    rows = []
    for r in none_runs:
        for key, v in r.val_by_replica.items():
            client, tier = key.split("_tier")
            cid = int(client.removeprefix("client")) if client.removeprefix("client").isdigit() else None
            own = r.client_tiers.get(cid, "?") if cid is not None else "?"
            rows.append([r.name, client.removeprefix("client"), own, tier_name(int(tier), "val"), fmt(v)])
    return ["## Independent replicas (`sync: none`)", "",
            "Each client trained its own model on its own data (the reference's AdamW behaviour); "
            "there is no shared model. Final validation loss of every replica:", ""] + \
        md_table(["run", "client", "client's training tier", "evaluated as", "val loss"], rows) + [""]


def _runs(report: Report) -> list[str]:
    rows = [[r.name, r.seed if r.seed is not None else NA, r.status, f"{r.steps_completed}/{r.total_steps or '?'}",
             r.reason.replace("|", "/")[:120]] for r in report.runs]
    for c in report.configs:
        present = {r.seed for r in c.runs}
        rows += [[run_name(c.label, s), s, "not run", NA, "no run directory"]
                 for s in c.planned_seeds if s not in present]
    return ["## Runs", ""] + md_table(["run", "seed", "status", "steps", "reason"], rows) + [""]


def _plots(plot_files: list[str]) -> list[str]:
    if not plot_files:
        return []
    lines = ["## Plots", ""]
    for f in plot_files:
        lines += [f"![{f}]({f})", ""]
    return lines + ["Lines are means over finished seeds; bands are 95% CIs (Student t) where n ≥ 2. Dashed: "
                    "`sync: none` (mean over independent replicas). Train loss is per step, each client on its own "
                    "batches; it is noisy and tiers train different submodels.", ""]


def _conclusions(report: Report) -> list[str]:
    return ["## What these numbers can and cannot tell", ""] + [f"- {s}" for s in conclusions(report)] + [""]


def _csv_columns() -> list[str]:
    return ["## Columns of results.csv", "",
            "`<metric>_mean`, `<metric>_ci95` (95% CI half-width; empty when n < 2), `<metric>_n` (seeds); "
            "`train_loss_tier<t>`: final train loss of tier-t clients over the last `last_k` steps; "
            "`val_loss_tier<t>`: final validation loss of the tier-t (sub)model, tier 0 = full model; "
            "`*_diff_vs_baseline` = config − baseline with its Welch CI, p and Holm p (exploratory), "
            "`*_diff_significant` "
            "yes (Holm p < 0.05) / unadjusted only (p < 0.05 before correction) / no / n/a; `*_paired_n`, "
            "`*_paired_diff`, `*_paired_p`, `*_paired_p_holm`: the paired-by-seed test (seeds both sides "
            "ran); `runs_not_finished` (planned seeds without a finished run), `failed_attempts` (attempts that "
            "ended unfinished, or were cut off and started again); `nan_inf_count`, `grad_norm_explosions` "
            "(steps with pre-clip grad norm > "
            "`grad_norm_threshold`), `clients_completed`/`clients_crashed` (in a finished run, connected at the "
            "end and never killed / the rest), `client_drops` (`client_lost` events; a dropped client may "
            "rejoin), `steps_discarded`, `client_nonzero_exits` (client processes exiting non-zero, during or "
            "after training), all summed over the runs present.", ""]


# --------------------------------------------------------------------------- cells

def _seeds_cell(c: ConfigResult) -> str:
    seeds = ",".join(str(r.seed) for r in c.finished) or NA
    missing = f"; {c.runs_not_finished} not finished" if c.runs_not_finished else ""
    return f"{len(c.finished)} ({seeds}){missing}"


def _mark(significance: str, cp: Comparison) -> str:
    """The table cell for a `stats.significance_word`."""
    return {"yes": "**yes** *", "no": "no", "unadjusted only": f"no (p < {ALPHA} before correction)",
            "n/a": f"n/a: {cp.reason}"}[significance]


def _ci(cp: Comparison) -> str:
    return NA if cp.ci_low is None else f"[{fmt(cp.ci_low, signed=True)}, {fmt(cp.ci_high, signed=True)}]"


def _spread_word(report: Report, label: str, metric: str, cp: Comparison) -> str:
    if cp.diff is None or not math.isfinite(cp.diff):
        return NA
    cfg = report.config(label)
    base = report.config(report.baseline)
    stds = [s for s in (cfg.stat(metric).std, base.stat(metric).std) if s is not None and math.isfinite(s)]
    if not stds:
        return "unknown (n < 2)"
    spread = max(stds)
    return f"within ({abs(cp.diff):.4f} < {spread:.4f})" if abs(cp.diff) < spread else \
        f"larger ({abs(cp.diff):.4f} ≥ {spread:.4f})"

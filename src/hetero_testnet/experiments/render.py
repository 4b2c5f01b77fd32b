"""Rendering of an experiment `Report` (report.py): `results.md` and the PNG plots.

Pure views over the computed numbers: nothing here reads run files or does statistics beyond
formatting. Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch, so importing this never changes a caller's matplotlib state).
"""

from __future__ import annotations

import math
from pathlib import Path

from hetero_testnet.experiments.spec import run_name
from hetero_testnet.experiments.report import DIFF_METRICS, ConfigResult, Report
from hetero_testnet.experiments.stats import ALPHA, Comparison, MeanCI, mean_ci, significance_word

NA = "—"


# --------------------------------------------------------------------------- formatting

def fmt_ci(s: MeanCI, digits: int = 4) -> str:
    if s.n == 0 or s.mean is None:
        return NA
    if not math.isfinite(s.mean):
        return f"NaN (n={s.n})"
    if s.half_width is None:
        return f"{s.mean:.{digits}f} (n=1, no CI)"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"


def fmt(v: float | None, digits: int = 4, signed: bool = False) -> str:
    if v is None:
        return NA
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else str(v)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def tier_name(t: int, kind: str) -> str:
    if kind == "val":
        return "tier 0 (full model)" if t == 0 else f"tier {t} submodel (FFN 1/{2 ** t})"
    return f"tier {t} clients"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _seeds_cell(c: ConfigResult) -> str:
    seeds = ",".join(str(r.seed) for r in c.finished) or NA
    missing = f"; {c.runs_not_finished} not finished" if c.runs_not_finished else ""
    return f"{len(c.finished)} ({seeds}){missing}"


# --------------------------------------------------------------------------- markdown

def render_markdown(report: Report, plot_files: list[str]) -> str:
    exp = report.experiment
    name = exp.get("name", "experiment")
    tiers = report.tiers
    val_tiers = sorted({t for c in report.configs for r in c.finished for t in r.val_loss_by_tier}) or [0]
    train_tiers = sorted({t for c in report.configs for r in c.finished for t in r.train_loss_by_tier}) or tiers
    lines = [f"# Experiment `{name}`: results", ""]
    if exp.get("description"):
        lines += [exp["description"].strip(), ""]

    # --- setup
    sched = exp.get("lr_schedule") or {}
    n_fin = sum(len(c.finished) for c in report.configs)
    n_planned = sum(len(c.planned_seeds) or len(c.runs) for c in report.configs)
    samples = sorted({r.val_num_samples for r in report.runs if r.val_num_samples is not None})
    lines += ["## Setup", ""]
    if exp.get("base_config"):
        lines.append(f"- Base config `{exp['base_config']}`; each run stops after {exp.get('steps')} committed "
                     f"steps. LR schedule unchanged from the base config: cosine, {sched.get('warmup_steps')} warmup "
                     f"steps, horizon {sched.get('total_steps')} steps, base LR {sched.get('base_lr')}.")
    if exp.get("deadlines"):
        lines.append("- Straggler deadlines (bound waits, do not change training): " + ", ".join(
            f"{k} {v:g} s" for k, v in exp["deadlines"].items()) + ".")
    lines += [
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
        f"- Differences are taken against the baseline `{report.baseline}` with Welch's t-test "
        f"(mark: p < {ALPHA}); Holm-adjusted p-values correct for comparing several configurations. "
        "A test needs n ≥ 2 seeds on both sides; otherwise it is n/a.",
        "",
    ]

    # --- final losses
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
    lines += ["## Final losses (mean ± 95% CI over seeds)", ""] + _table(header, rows)
    if any(c.sync == "none" for c in report.configs):
        lines += ["", "‡ `sync: none`: no shared model. The value is the mean over the independent replicas "
                  "that evaluated that tier (each client's own model); see *Independent replicas* below."]
    lines.append("")

    # --- differences
    for metric in DIFF_METRICS:
        comps = report.comparisons.get(metric)
        if not comps:
            continue
        kind, t = metric.split("_loss_tier")
        what = f"{'validation' if kind == 'val' else 'train'} loss, {tier_name(int(t), kind)}"
        k = sum(1 for cp in comps.values() if cp.applicable)
        lines += [f"## Difference vs baseline `{report.baseline}`: {what}", ""]
        header = ["configuration", "n (config vs baseline)", "Δ = config − baseline", "95% CI of Δ",
                  "p (Welch)", f"p (Holm, k={k})", f"significant (Holm p < {ALPHA})",
                  "size of Δ vs seed spread (larger std)"]
        rows = []
        for label, cp in comps.items():
            sig = significance_word(cp, report.holm(metric, label))
            rows.append([f"`{label}`", f"{cp.n_x} vs {cp.n_baseline}", fmt(cp.diff, signed=True), _ci(cp),
                         fmt_p(cp.p), fmt_p(report.holm(metric, label)),
                         _mark(sig, cp),
                         _spread_word(report, label, metric, cp)])
        lines += _table(header, rows) + [""]
    lines += _paired_section(report)

    # --- health
    lines += ["## Throughput and health", ""]
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
    lines += _table(header, rows)
    lines += ["", "Train tokens/s = tokens of committed steps / their summed step wall time, leaving out rounds "
              "that began right after a periodic validation (clients validate synchronously); wall time is the "
              "coordinator's, start-up and validation included. Runs ran one after another on the same machine; "
              "clients of one run share its cores, so throughput compares configurations only on that machine.",
              ""]

    # --- replicas
    none_runs = [r for c in report.configs if c.sync == "none" for r in c.runs]
    if none_runs:
        lines += ["## Independent replicas (`sync: none`)", "",
                  "Each client trained its own model on its own data (the reference's AdamW behaviour); "
                  "there is no shared model. Final validation loss of every replica:", ""]
        rows = []
        for r in none_runs:
            for key, v in r.val_by_replica.items():
                client, tier = key.split("_tier")
                cid = int(client.removeprefix("client")) if client.removeprefix("client").isdigit() else None
                own = r.client_tiers.get(cid, "?") if cid is not None else "?"
                rows.append([r.name, client.removeprefix("client"), own, tier_name(int(tier), "val"), fmt(v)])
        lines += _table(["run", "client", "client's training tier", "evaluated as", "val loss"], rows) + [""]

    # --- runs
    lines += ["## Runs", ""]
    rows = [[r.name, r.seed if r.seed is not None else NA, r.status, f"{r.steps_completed}/{r.total_steps or '?'}",
             r.reason.replace("|", "/")[:120]] for r in report.runs]
    for c in report.configs:
        present = {r.seed for r in c.runs}
        rows += [[run_name(c.label, s), s, "not run", NA, "no run directory"]
                 for s in c.planned_seeds if s not in present]
    lines += _table(["run", "seed", "status", "steps", "reason"], rows) + [""]

    # --- plots
    if plot_files:
        lines += ["## Plots", ""]
        for f in plot_files:
            lines += [f"![{f}]({f})", ""]
        lines += ["Lines are means over finished seeds; bands are 95% CIs (Student t) where n ≥ 2. Dashed: "
                  "`sync: none` (mean over independent replicas). Train loss is per step, each client on its own "
                  "batches; it is noisy and tiers train different submodels.", ""]

    # --- conclusions
    lines += ["## What these numbers can and cannot tell", ""] + [f"- {s}" for s in conclusions(report)] + [""]

    # --- columns
    lines += ["## Columns of results.csv", "",
              "`<metric>_mean`, `<metric>_ci95` (95% CI half-width; empty when n < 2), `<metric>_n` (seeds); "
              "`train_loss_tier<t>`: final train loss of tier-t clients over the last `last_k` steps; "
              "`val_loss_tier<t>`: final validation loss of the tier-t (sub)model, tier 0 = full model; "
              "`*_diff_vs_baseline` = config − baseline with its Welch CI, p and Holm p, `*_diff_significant` "
              "yes (Holm p < 0.05) / unadjusted only (p < 0.05 before correction) / no / n/a; `*_paired_n`, "
              "`*_paired_diff`, `*_paired_p`, `*_paired_p_holm`: the paired-by-seed test (seeds both sides "
              "ran); `runs_not_finished` (planned seeds without a finished run), `failed_attempts` (attempts that "
              "ended unfinished, or were cut off and started again); `nan_inf_count`, `grad_norm_explosions` "
              "(steps with pre-clip grad norm > "
              "`grad_norm_threshold`), `clients_completed`/`clients_crashed` (in a finished run, connected at the "
              "end and never killed / the rest), `client_drops` (`client_lost` events; a dropped client may "
              "rejoin), `steps_discarded`, `client_nonzero_exits` (client processes exiting non-zero, during or "
              "after training), all summed over the runs present.", ""]
    return "\n".join(lines)


def _mark(significance: str, cp: Comparison) -> str:
    """The table cell for a `stats.significance_word`."""
    return {"yes": "**yes** *", "no": "no", "unadjusted only": f"no (p < {ALPHA} before correction)",
            "n/a": f"n/a: {cp.reason}"}[significance]


def _ci(cp: Comparison) -> str:
    return NA if cp.ci_low is None else f"[{fmt(cp.ci_low, signed=True)}, {fmt(cp.ci_high, signed=True)}]"


PAIRED_METRIC = "val_loss_tier0"


def _paired_section(report: Report) -> list[str]:
    """Per-seed differences of full-model validation loss, and the paired t-test over them."""
    pairs = report.paired.get(PAIRED_METRIC, {})
    if not any(cp.n_x for cp in pairs.values()):
        return []
    base = report.config(report.baseline)
    base_by_seed = base.by_seed(PAIRED_METRIC)
    seeds = sorted(base_by_seed)
    k = sum(1 for cp in pairs.values() if cp.applicable)
    lines = [f"## Paired by seed: validation loss, tier 0 (full model), vs `{report.baseline}`", "",
             "Runs with the same seed start from the same initial weights and train on the same global batches in "
             "the same order; only the configuration differs. The seed therefore pairs them, and a paired t-test on "
             "the per-seed differences removes the variation both runs share. Welch's test above ignores the "
             "pairing and stays the primary test; this one is secondary: more powerful when seeds share variation, "
             "but with n − 1 degrees of freedom it rests on very few pairs.",
             ""]
    header = ["configuration", *(f"Δ seed {s}" for s in seeds), "pairs", "mean Δ", "95% CI of mean Δ",
              "p (paired t)", f"p (Holm, k={k})", f"significant (Holm p < {ALPHA})"]
    rows = []
    for label, cp in pairs.items():
        cfg = report.config(label).by_seed(PAIRED_METRIC)
        deltas = [fmt(cfg[s] - base_by_seed[s], signed=True)
                  if cfg.get(s) is not None and base_by_seed[s] is not None else NA for s in seeds]
        holm_p = report.paired_holm(PAIRED_METRIC, label)
        sig = significance_word(cp, holm_p)
        rows.append([f"`{label}`", *deltas, str(cp.n_x), fmt(cp.diff, signed=True), _ci(cp), fmt_p(cp.p),
                     fmt_p(holm_p), _mark(sig, cp)])
    return lines + _table(header, rows) + [""]


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


def conclusions(report: Report) -> list[str]:
    """Plain-language statements of what the tables support, generated from the numbers."""
    out = []
    comps = report.comparisons.get("val_loss_tier0", {})
    for label, cp in comps.items():
        if cp.diff is None:
            continue
        direction = "lower (better)" if cp.diff < 0 else "higher (worse)"
        holm_p = report.holm("val_loss_tier0", label)
        if not cp.applicable:
            out.append(f"`{label}` vs `{report.baseline}`: full-model validation loss differs by "
                       f"{fmt(cp.diff, signed=True)}, but no test is possible ({cp.reason}): a single run per side "
                       "is an anecdote, not evidence.")
        elif cp.significant():
            tail = (f"and survives Holm correction (p = {fmt_p(holm_p)})" if holm_p is not None and holm_p < ALPHA
                    else f"but not after Holm correction for {sum(1 for c in comps.values() if c.applicable)} "
                         f"comparisons (p = {fmt_p(holm_p)}): treat it as a lead to re-test with more seeds")
            out.append(f"`{label}` vs `{report.baseline}`: full-model validation loss is {direction} by "
                       f"{fmt(abs(cp.diff))} (95% CI [{fmt(cp.ci_low, signed=True)}, {fmt(cp.ci_high, signed=True)}], "
                       f"Welch p = {fmt_p(cp.p)}, n = {cp.n_x} vs {cp.n_baseline}) {tail}.")
        else:
            out.append(f"`{label}` vs `{report.baseline}`: the difference in full-model validation loss "
                       f"({fmt(cp.diff, signed=True)}, 95% CI [{fmt(cp.ci_low, signed=True)}, "
                       f"{fmt(cp.ci_high, signed=True)}], p = {fmt_p(cp.p)}) is not distinguishable from seed "
                       "noise; this does not show the two are equal, only that these seeds cannot tell them apart.")
    pairs = report.paired.get(PAIRED_METRIC, {})
    tested = {label: cp for label, cp in pairs.items() if cp.applicable}
    if tested:
        parts = []
        for label, cp in tested.items():
            cfg = report.config(label).by_seed(PAIRED_METRIC)
            base = report.config(report.baseline).by_seed(PAIRED_METRIC)
            worse = sum(1 for s in cfg.keys() & base.keys()
                        if cfg[s] is not None and base[s] is not None and cfg[s] > base[s])
            parts.append(f"`{label}` {fmt(cp.diff, signed=True)} (higher on {worse} of {cp.n_x} seeds, paired "
                         f"p = {fmt_p(cp.p)}, Holm p = {fmt_p(report.paired_holm(PAIRED_METRIC, label))})")
        survivors = [label for label in tested
                     if (report.paired_holm(PAIRED_METRIC, label) or 1.0) < ALPHA]
        verdict = ("; after Holm correction the paired test supports a difference for "
                   + ", ".join(f"`{x}`" for x in survivors)) if survivors else \
            "; none survives Holm correction, so the pairing does not turn these into findings either"
        out.append(f"Paired by seed (same initial weights and batches), full-model validation loss against "
                   f"`{report.baseline}`: " + "; ".join(parts) + verdict + ".")
    ns = sorted({len(c.finished) for c in report.configs if c.sync == "allreduce"})
    out.append(f"With n = {'/'.join(map(str, ns)) or '0'} seeds per configuration the tests have little power: "
               "only differences several times the seed-to-seed standard deviation can reach p < 0.05. A difference "
               "smaller than the seed spread (see the tables) is not evidence of anything.")
    out.append("Compare configurations on validation loss, not train loss: train loss is measured on each client's "
               "own batches, tier-t clients train a smaller submodel, and the number of clients per tier differs "
               "between mixes. The train-loss columns describe what each tier experienced, not model quality.")
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
    out.append("The reference's published numbers (8.10 / 7.97 / 8.38 / 7.98) were single runs, the mean of the last "
               "three training-loss log lines, from clients that never shared gradients; they are not comparable "
               "with the validation losses here.")
    health = [c for c in report.configs if c.health()["nan_inf_count"] or c.health()["grad_norm_explosions"]
              or c.health()["clients_crashed"] or c.health()["steps_discarded"]
              or c.health()["client_nonzero_exits"]]
    if health:
        out.append("Health problems (NaN/Inf, gradient-norm explosions, crashed clients, discarded steps or "
                   "client processes exiting non-zero) "
                   "occurred in: "
                   + ", ".join(f"`{c.label}`" for c in health) + "; their losses deserve suspicion.")
    else:
        out.append("No NaN/Inf values, gradient-norm explosions, crashed clients or discarded steps were recorded.")
    drops = sum(c.health()["client_drops"] for c in report.configs)
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


# --------------------------------------------------------------------------- plots

def write_plots(report: Report, out_dir: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    samples = sorted({r.val_num_samples for r in report.runs if r.val_num_samples is not None})
    for kind, fname in (("val", "val_loss.png"), ("train", "train_loss.png")):
        tiers = sorted({t for c in report.configs for r in c.finished
                        for t in (r.val_curve if kind == "val" else r.train_curve)})
        if not tiers:
            tiers = [0]
        fig = Figure(figsize=(6.0 * len(tiers), 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(tiers), squeeze=False)[0]
        for ax, t in zip(axes, tiers):
            drawn = False
            for i, c in enumerate(report.configs):
                curves = [(r.val_curve if kind == "val" else r.train_curve).get(t) for r in c.finished]
                curves = [cv for cv in curves if cv]
                if not curves:
                    continue
                drawn = True
                xs = sorted({s for cv in curves for s in cv})
                stats = [mean_ci([cv.get(s) for cv in curves]) for s in xs]
                # eval step = steps completed; client_step step is 0-based -> plot train at step + 1
                xplot = xs if kind == "val" else [s + 1 for s in xs]
                ys = [s.mean if s.mean is not None else math.nan for s in stats]
                style = "--" if c.sync == "none" else "-"
                color = f"C{i % 10}"
                ax.plot(xplot, ys, style, color=color, marker="o" if kind == "val" else None, markersize=3,
                        label=f"{c.label} ({c.sync}, n={len(curves)})")
                lo = [s.low if s.low is not None else math.nan for s in stats]
                hi = [s.high if s.high is not None else math.nan for s in stats]
                if any(not math.isnan(v) for v in lo):
                    ax.fill_between(xplot, lo, hi, color=color, alpha=0.15, linewidth=0)
            title = (f"Validation loss, {tier_name(t, 'val')}" if kind == "val"
                     else f"Train loss (own batches), {tier_name(t, 'train')}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("steps completed")
            ax.set_ylabel("val loss" + (f" ({'/'.join(map(str, samples))} held-out seqs)" if samples else "")
                          if kind == "val" else "train loss (mean over tier's clients)")
            ax.grid(True, alpha=0.3)
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(f"{report.experiment.get('name', '')}: mean over seeds, band = 95% CI (n ≥ 2)", fontsize=10)
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        paths.append(path)
    diff = _write_diff_plot(report, out_dir / "val_loss_diff.png")
    return paths + ([diff] if diff else [])


def _write_diff_plot(report: Report, path: Path) -> Path | None:
    """Validation loss minus the baseline's on the same seed, at every evaluation step.

    The absolute curves of similar configurations overlap (a 0.05 difference on a 10 -> 7 curve);
    the same-seed difference is what the comparison is about, so it gets its own figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = report.config(report.baseline)
    base_runs = {r.seed: r for r in base.finished if r.seed is not None}
    tiers = sorted({t for r in base_runs.values() for t in r.val_curve})
    others = [(i, c) for i, c in enumerate(report.configs) if c.label != report.baseline]
    if not tiers or not others:
        return None
    fig = Figure(figsize=(6.0 * len(tiers), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tiers), squeeze=False)[0]
    for ax, t in zip(axes, tiers):
        ax.axhline(0.0, color="black", linewidth=0.8)
        for i, c in others:
            pairs = [(r.val_curve.get(t) or {}, base_runs[r.seed].val_curve.get(t) or {})
                     for r in c.finished if r.seed in base_runs]
            steps = sorted({s for mine, theirs in pairs for s in mine.keys() & theirs.keys()})
            if not steps:
                continue
            stats = [mean_ci([mine[s] - theirs[s] for mine, theirs in pairs if s in mine and s in theirs])
                     for s in steps]
            color = f"C{i % 10}"
            ax.plot(steps, [st.mean for st in stats], "--" if c.sync == "none" else "-", color=color, marker="o",
                    markersize=3, label=f"{c.label} ({c.sync}, pairs={max(st.n for st in stats)})")
            if any(st.half_width is not None for st in stats):
                ax.fill_between(steps, [st.low if st.low is not None else math.nan for st in stats],
                                [st.high if st.high is not None else math.nan for st in stats],
                                color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"Validation loss − `{report.baseline}` (same seed), {tier_name(t, 'val')}", fontsize=10)
        ax.set_xlabel("steps completed")
        ax.set_ylabel("Δ val loss (> 0: worse than baseline)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.experiment.get('name', '')}: mean of same-seed differences, band = 95% CI "
                 "(pairs ≥ 2)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path

"""The PNG plots of an experiment `Report`: loss curves per tier, and same-seed differences to the baseline.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, so importing or
calling this never changes a caller's matplotlib state). Every figure is one row of panels, one
per tier, each line a mean over seeds with its 95% CI as a band where there are n >= 2 values.

Scales are set so the differences that matter show: the y-range of a panel is taken from the
multi-seed lines (n >= 2) and their bands only, so a single-seed line (an ablation, an anecdote)
never stretches it (it is drawn, clipped at the edge if it falls outside). `val_loss.png` has a
second row zoomed on the last quarter of the run, and draws the reference lines (unigram, bigram;
the untrained model as the step-0 point). With a pre-registered analysis, `primary_diff.png` has one
panel per primary comparison: the mean paired difference per evaluation, its 95% band, 0 and ±delta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetero_testnet.experiments.format import tier_name
from hetero_testnet.experiments.report import ConfigResult, Report
from hetero_testnet.experiments.run_result import WIDEST_METRIC, RunResult
from hetero_testnet.experiments.stats import MeanCI, mean_ci

DPI = 110
PANEL_SIZE_IN = (6.0, 4.2)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """val_loss.png, train_loss.png and, when there is something to compare, val_loss_diff.png (and
    primary_diff.png for a pre-registered analysis)."""
    paths = [_write_curves(report, kind, out_dir / f"{kind}_loss.png") for kind in ("val", "train")]
    diff = _write_diff_plot(report, out_dir / "val_loss_diff.png")
    primary = write_primary_plot(report, out_dir / "primary_diff.png") if report.analysis else None
    cost = write_cost_plot(report, out_dir / "time_to_loss.png")
    return paths + [p for p in (diff, primary, cost) if p]


def write_cost_plot(report: Report, path: Path) -> Path | None:
    """Time-to-loss: each configuration's full-model validation loss (its widest model's for a
    configuration without tier 0) against wall-clock seconds and against training FLOPs, mean over
    seeds at each validation step (runs since issue 12 carry these in summary.json)."""
    configs = [c for c in report.configs if any(r.cost_curve for r in c.finished)]
    if not configs:
        return None
    fig, axes = _figure(2)
    for index, c in enumerate(configs):
        tier = min(c.tiers, default=0)
        steps = sorted({p["step"] for r in c.finished for p in r.cost_curve if p.get("wall_s") is not None})
        points = []
        for step in steps:
            at = [p for r in c.finished for p in r.cost_curve
                  if p["step"] == step and p.get("wall_s") is not None and f"tier{tier}" in p.get("val_loss", {})]
            if at:
                points.append((sum(p["wall_s"] for p in at) / len(at), sum(p["flops"] for p in at) / len(at),
                               sum(p["val_loss"][f"tier{tier}"] for p in at) / len(at)))
        for ax, x, unit in ((axes[0][0], 0, "wall-clock s since the coordinator started"),
                            (axes[0][1], 1, "training FLOPs")):
            ax.plot([p[x] for p in points], [p[2] for p in points], "-o", color=f"C{index % 10}", markersize=3,
                    label=f"{c.label} ({tier_name(tier, 'val')})")
            ax.set_xlabel(unit)
            ax.set_ylabel("validation loss (mean over seeds)")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, "time to loss: validation loss vs wall-clock and vs FLOPs", path)


def _write_curves(report: Report, kind: str, path: Path) -> Path:
    """Mean loss over seeds per configuration; `kind` val (per evaluation, plus a zoomed row) or
    train (per step)."""
    samples = sorted({r.val_num_samples for r in report.runs if r.val_num_samples is not None})
    tiers = sorted({t for c in report.configs for r in c.finished for t in _curves_of(r, kind)}) or [0]
    rows = 2 if kind == "val" else 1
    fig, grid = _figure(len(tiers), rows)
    last = max((s for c in report.configs for r in c.finished for cv in _curves_of(r, kind).values() for s in cv),
               default=0)
    for row in range(rows):
        start = 0 if row == 0 else (3 * last) // 4
        for ax, t in zip(grid[row], tiers):
            scale: list[float] = []
            drawn = [_draw_config(ax, c, i, kind, t, start, scale) for i, c in enumerate(report.configs)]
            if kind == "val":
                _draw_references(ax, report, t, scale, zoomed=row == 1)
            title = (f"Validation loss, {tier_name(t, 'val')}" + (f", steps ≥ {start} (zoom)" if row else "")
                     if kind == "val" else f"Train loss (own batches), {tier_name(t, 'train')}")
            ylabel = ("val loss" + (f" ({'/'.join(map(str, samples))} held-out seqs)" if samples else "")
                      if kind == "val" else "train loss (mean over tier's clients)")
            _label_axes(ax, title, ylabel)
            _set_ylim(ax, scale)
            if any(drawn):
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, f"{report.experiment.get('name', '')}: mean over seeds, band = 95% CI (n ≥ 2); y-range "
                      "from the multi-seed lines", path)


def _draw_config(ax: Any, c: ConfigResult, index: int, kind: str, tier: int, start: int = 0,
                 scale: list[float] | None = None) -> bool:
    """One configuration's mean curve and band on `ax` from step `start` on; False when none of its
    finished runs has one. A multi-seed line adds its values to `scale` (what sets the y-range)."""
    curves = [cv for cv in (_curves_of(r, kind).get(tier) for r in c.finished) if cv]
    if not curves:
        return False
    xs = [s for s in sorted({s for cv in curves for s in cv}) if s >= start]
    if not xs:
        return False
    stats = [mean_ci([cv.get(s) for cv in curves]) for s in xs]
    # eval step = steps completed; client_step step is 0-based -> plot train at step + 1
    xplot = xs if kind == "val" else [s + 1 for s in xs]
    _mean_with_band(ax, xplot, stats, index, c.sync, marker="o" if kind == "val" else None,
                    label=f"{c.label} ({c.sync}, n={len(curves)})", scale=scale)
    return True


def _draw_references(ax: Any, report: Report, tier: int, scale: list[float], *, zoomed: bool) -> None:
    """Unigram and bigram as horizontal lines, the untrained model as the step-0 point (full model,
    whole-run row). In the zoomed row a line far outside the multi-seed range is named, not drawn."""
    refs = report.references
    if not refs.available:
        return
    lo, hi = (min(scale), max(scale)) if scale else (None, None)
    outside = []
    for (label, value), style in zip([("unigram", refs.unigram), ("bigram", refs.bigram)], (":", "-.")):
        if zoomed and lo is not None and not lo - 0.5 * (hi - lo) <= value <= hi + 0.5 * (hi - lo):
            outside.append(f"{label} {value:.3f}")
            continue
        ax.axhline(value, color="grey", linestyle=style, linewidth=1.0, label=f"{label} {value:.3f}")
        scale.append(value)
    if not zoomed and tier == 0 and refs.untrained is not None:
        ax.plot([0], [refs.untrained], "kx", label=f"untrained {refs.untrained:.3f} (step 0)")
        scale.append(refs.untrained)
    if outside:
        ax.text(0.01, 0.01, "off scale: " + ", ".join(outside), transform=ax.transAxes, fontsize=7, color="grey")


def _write_diff_plot(report: Report, path: Path) -> Path | None:
    """Validation loss minus the baseline's on the same seed, at every evaluation step.

    The absolute curves of similar configurations overlap (a 0.05 difference on a 10 -> 7 curve);
    the same-seed difference is what the comparison is about, so it gets its own figure.
    """
    base_runs = {r.seed: r for r in report.config(report.baseline).finished if r.seed is not None}
    tiers = sorted({t for r in base_runs.values() for t in r.val_curve})
    others = [(i, c) for i, c in enumerate(report.configs) if c.label != report.baseline]
    if not tiers or not others:
        return None
    fig, grid = _figure(len(tiers))
    for ax, t in zip(grid[0], tiers):
        ax.axhline(0.0, color="black", linewidth=0.8)
        scale: list[float] = [0.0]
        for i, c in others:
            pairs = [(r.val_curve.get(t) or {}, base_runs[r.seed].val_curve.get(t) or {})
                     for r in c.finished if r.seed in base_runs]
            steps = sorted({s for mine, theirs in pairs for s in mine.keys() & theirs.keys()})
            if not steps:
                continue
            stats = [mean_ci([mine[s] - theirs[s] for mine, theirs in pairs if s in mine and s in theirs])
                     for s in steps]
            _mean_with_band(ax, steps, stats, i, c.sync, marker="o",
                            label=f"{c.label} ({c.sync}, pairs={max(st.n for st in stats)})", scale=scale)
        _label_axes(ax, f"Validation loss − `{report.baseline}` (same seed), {tier_name(t, 'val')}",
                    "Δ val loss (> 0: worse than baseline)")
        _set_ylim(ax, scale)
        ax.legend(fontsize=7)
    return _save(fig, f"{report.experiment.get('name', '')}: mean of same-seed differences, band = 95% CI "
                      "(pairs ≥ 2)", path)


# --------------------------------------------------------------------------- shared figure pieces

def _curves_of(run: RunResult, kind: str) -> dict[int, dict[int, float]]:
    return run.val_curve if kind == "val" else run.train_curve


def _figure(panels: int, rows: int = 1) -> tuple[Any, Sequence[Sequence[Any]]]:
    """A constrained-layout figure with `rows` rows of `panels` axes, on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE_IN[0] * panels, PANEL_SIZE_IN[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, panels, squeeze=False)


def _mean_with_band(ax: Any, xs: list[int], stats: list[MeanCI], index: int, sync: str, *, marker: str | None,
                    label: str, scale: list[float] | None = None) -> None:
    """The mean line (dashed for `sync: none`) in the configuration's colour, and its CI band where
    some point has one (n >= 2). Only a line with n >= 2 somewhere adds its values to `scale`."""
    color = f"C{index % 10}"
    means = [s.mean if s.mean is not None else math.nan for s in stats]
    ax.plot(xs, means, "--" if sync == "none" else "-", color=color, marker=marker, markersize=3, label=label)
    lo = [s.low if s.low is not None else math.nan for s in stats]
    hi = [s.high if s.high is not None else math.nan for s in stats]
    if any(not math.isnan(v) for v in lo):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        if scale is not None:
            scale += [v for v in (*means, *lo, *hi) if math.isfinite(v)]


def _set_ylim(ax: Any, scale: list[float]) -> None:
    """The y-range of the multi-seed values (and what else was put in `scale`), with a 10% margin;
    matplotlib's own range when nothing multi-seed was drawn."""
    if len(scale) < 2 or max(scale) == min(scale):
        return
    lo, hi = min(scale), max(scale)
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))


def _label_axes(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("steps completed")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig: Any, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def write_primary_plot(report: Report, path: Path) -> Path | None:
    """One panel per pre-registered comparison: mean paired difference (a − b) of the primary metric
    at every evaluation step, its 95% CI band, 0 and ±delta."""
    analysis = report.analysis
    if analysis is None or not analysis.comparisons:
        return None
    declared = analysis.analysis
    by_label = {c.label: c for c in report.configs}
    fig, grid = _figure(len(analysis.comparisons))
    for ax, comp in zip(grid[0], analysis.comparisons):
        ax.axhline(0.0, color="black", linewidth=0.8)
        for sign in (-1, 1):
            ax.axhline(sign * declared.delta, color="grey", linestyle="--", linewidth=0.8)
        runs_a = {r.seed: r for r in (by_label[comp.a].finished if comp.a in by_label else [])}
        runs_b = {r.seed: r for r in (by_label[comp.b].finished if comp.b in by_label else [])}
        pairs = [(_metric_curve(runs_a[s], declared.metric), _metric_curve(runs_b[s], declared.metric))
                 for s in sorted(runs_a.keys() & runs_b.keys())]
        steps = sorted({s for a, b in pairs for s in a.keys() & b.keys()})
        scale = [declared.delta, -declared.delta]
        if steps:
            stats = [mean_ci([a[s] - b[s] for a, b in pairs if s in a and s in b]) for s in steps]
            _mean_with_band(ax, steps, stats, 0, "allreduce", marker="o", label=f"{comp.a} − {comp.b} "
                            f"(pairs={max(st.n for st in stats)})", scale=scale)
        _label_axes(ax, f"{comp.comparison}: {comp.outcomes and ', '.join(comp.outcomes) or 'no outcome'}",
                    f"Δ {declared.metric} (a − b)")
        _set_ylim(ax, scale)
        ax.legend(fontsize=7)
    return _save(fig, f"{report.experiment.get('name', '')}: pre-registered comparisons, mean paired difference, "
                      f"band = 95% CI, dashed = ±delta {declared.delta:g}", path)


def _metric_curve(run: RunResult, metric: str) -> dict[int, float]:
    """A report metric's values per evaluation step (`val_loss_widest`: the run's widest tier)."""
    if metric == WIDEST_METRIC:
        return run.val_curve.get(run.widest_tier) or {}
    kind, tier = metric.split("_loss_tier")
    return _curves_of(run, kind).get(int(tier)) or {}

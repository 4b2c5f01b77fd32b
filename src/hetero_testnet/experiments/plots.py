"""The PNG plots of an experiment `Report`: loss curves per tier, and same-seed differences to the baseline.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, so importing or
calling this never changes a caller's matplotlib state). Every figure is one row of panels, one
per tier, each line a mean over seeds with its 95% CI as a band where there are n >= 2 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetero_testnet.experiments.format import tier_name
from hetero_testnet.experiments.report import ConfigResult, Report
from hetero_testnet.experiments.run_result import RunResult
from hetero_testnet.experiments.stats import MeanCI, mean_ci

DPI = 110
PANEL_SIZE_IN = (6.0, 4.2)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """val_loss.png, train_loss.png and, when there is something to compare, val_loss_diff.png."""
    paths = [_write_curves(report, kind, out_dir / f"{kind}_loss.png") for kind in ("val", "train")]
    diff = _write_diff_plot(report, out_dir / "val_loss_diff.png")
    return paths + ([diff] if diff else [])


def _write_curves(report: Report, kind: str, path: Path) -> Path:
    """Mean loss over seeds per configuration; `kind` val (per evaluation) or train (per step)."""
    samples = sorted({r.val_num_samples for r in report.runs if r.val_num_samples is not None})
    tiers = sorted({t for c in report.configs for r in c.finished for t in _curves_of(r, kind)}) or [0]
    fig, axes = _figure(len(tiers))
    for ax, t in zip(axes, tiers):
        drawn = False
        for i, c in enumerate(report.configs):
            drawn = _draw_config(ax, c, i, kind, t) or drawn
        title = (f"Validation loss, {tier_name(t, 'val')}" if kind == "val"
                 else f"Train loss (own batches), {tier_name(t, 'train')}")
        ylabel = ("val loss" + (f" ({'/'.join(map(str, samples))} held-out seqs)" if samples else "")
                  if kind == "val" else "train loss (mean over tier's clients)")
        _label_axes(ax, title, ylabel)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, f"{report.experiment.get('name', '')}: mean over seeds, band = 95% CI (n ≥ 2)", path)


def _draw_config(ax: Any, c: ConfigResult, index: int, kind: str, tier: int) -> bool:
    """One configuration's mean curve and band on `ax`; False when none of its finished runs has one."""
    curves = [cv for cv in (_curves_of(r, kind).get(tier) for r in c.finished) if cv]
    if not curves:
        return False
    xs = sorted({s for cv in curves for s in cv})
    stats = [mean_ci([cv.get(s) for cv in curves]) for s in xs]
    # eval step = steps completed; client_step step is 0-based -> plot train at step + 1
    xplot = xs if kind == "val" else [s + 1 for s in xs]
    _mean_with_band(ax, xplot, stats, index, c.sync, marker="o" if kind == "val" else None,
                    label=f"{c.label} ({c.sync}, n={len(curves)})")
    return True


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
    fig, axes = _figure(len(tiers))
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
            _mean_with_band(ax, steps, stats, i, c.sync, marker="o",
                            label=f"{c.label} ({c.sync}, pairs={max(st.n for st in stats)})")
        _label_axes(ax, f"Validation loss − `{report.baseline}` (same seed), {tier_name(t, 'val')}",
                    "Δ val loss (> 0: worse than baseline)")
        ax.legend(fontsize=7)
    return _save(fig, f"{report.experiment.get('name', '')}: mean of same-seed differences, band = 95% CI "
                      "(pairs ≥ 2)", path)


# --------------------------------------------------------------------------- shared figure pieces

def _curves_of(run: RunResult, kind: str) -> dict[int, dict[int, float]]:
    return run.val_curve if kind == "val" else run.train_curve


def _figure(panels: int) -> tuple[Any, Sequence[Any]]:
    """A constrained-layout figure with one row of `panels` axes, on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE_IN[0] * panels, PANEL_SIZE_IN[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _mean_with_band(ax: Any, xs: list[int], stats: list[MeanCI], index: int, sync: str, *, marker: str | None,
                    label: str) -> None:
    """The mean line (dashed for `sync: none`) in the configuration's colour, and its CI band where
    some point has one (n >= 2)."""
    color = f"C{index % 10}"
    ax.plot(xs, [s.mean if s.mean is not None else math.nan for s in stats], "--" if sync == "none" else "-",
            color=color, marker=marker, markersize=3, label=label)
    lo = [s.low if s.low is not None else math.nan for s in stats]
    hi = [s.high if s.high is not None else math.nan for s in stats]
    if any(not math.isnan(v) for v in lo):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def _label_axes(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("steps completed")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig: Any, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path

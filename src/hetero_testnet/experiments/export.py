"""Writing an experiment `Report` (report.py) to files: `results.csv`, `results.json`, and, through
render.py and plots.py, `results.md` and the plots.

The CSV has one row per configuration with fixed columns (`csv_columns`), so spreadsheets and
scripts can rely on them; the JSON has everything, per run too. Non-finite numbers never reach
JSON (they become null) and are written as `nan`/`inf` in the CSV.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetero_testnet.experiments.report import DIFF_METRICS, Report
from hetero_testnet.experiments.stats import ALPHA, json_number, significance_word


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """results.md, results.csv, results.json, val_loss.png, train_loss.png, val_loss_diff.png into out_dir."""
    from hetero_testnet.experiments.plots import write_plots
    from hetero_testnet.experiments.render import render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.csv", out_dir / "results.json"]
    header, rows = csv_rows(report)
    with open(paths[0], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    paths[1].write_text(json.dumps(to_json(report), indent=2) + "\n")
    plots = write_plots(report, out_dir)
    md = out_dir / "results.md"
    md.write_text(render_markdown(report, [p.name for p in plots]))
    return [md, *paths, *plots]


def csv_columns(tiers: Sequence[int]) -> list[str]:
    cols = ["config", "tiers", "sync", "helper_fractions", "n_seeds", "seeds", "runs_not_finished",
            "failed_attempts", "steps_completed_mean", "wall_time_s_mean", "wall_time_s_ci95",
            "train_tokens_per_sec_mean", "train_tokens_per_sec_ci95", "last_k"]
    for kind in ("train", "val"):
        for t in tiers:
            cols += [f"{kind}_loss_tier{t}_mean", f"{kind}_loss_tier{t}_ci95", f"{kind}_loss_tier{t}_n"]
    cols += ["val_num_samples", "val_step"]
    for m in DIFF_METRICS:
        cols += [f"{m}_diff_vs_baseline", f"{m}_diff_ci95_low", f"{m}_diff_ci95_high", f"{m}_diff_p_welch",
                 f"{m}_diff_p_holm", f"{m}_diff_significant", f"{m}_paired_n", f"{m}_paired_diff",
                 f"{m}_paired_p", f"{m}_paired_p_holm"]
    cols += ["nan_inf_count", "grad_norm_threshold", "grad_norm_explosions", "grad_norm_max",
             "clients_completed", "clients_crashed", "client_drops", "steps_discarded", "client_nonzero_exits",
             "baseline"]
    return cols


def csv_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    tiers = report.tiers
    header = csv_columns(tiers)
    rows = []
    for c in report.configs:
        row: dict[str, Any] = {
            "config": c.label, "tiers": ",".join(map(str, c.tiers)), "sync": c.sync,
            "helper_fractions": ",".join(f"{f:g}" for f in c.helper_fractions), "n_seeds": len(c.finished),
            "seeds": ",".join(str(r.seed) for r in c.finished), "runs_not_finished": c.runs_not_finished,
            "failed_attempts": c.failed_attempts, "last_k": report.last_k,
            "grad_norm_threshold": report.grad_norm_threshold, "baseline": report.baseline,
        }
        for key in ("steps_completed", "wall_time_s", "train_tokens_per_sec"):
            s = c.stat(key)
            row[f"{key}_mean"], row[f"{key}_ci95"] = _cell(s.mean), _cell(s.half_width)
        for kind in ("train", "val"):
            for t in tiers:
                s = c.stat(f"{kind}_loss_tier{t}")
                key = f"{kind}_loss_tier{t}"
                row[f"{key}_mean"], row[f"{key}_ci95"], row[f"{key}_n"] = _cell(s.mean), _cell(s.half_width), s.n
        samples = {r.val_num_samples for r in c.finished if r.val_num_samples is not None}
        vsteps = {r.val_step for r in c.finished if r.val_step is not None}
        row["val_num_samples"] = ",".join(map(str, sorted(samples)))
        row["val_step"] = ",".join(map(str, sorted(vsteps)))
        for m in DIFF_METRICS:
            comp = report.comparisons.get(m, {}).get(c.label)
            if comp is None:
                continue
            row[f"{m}_diff_vs_baseline"] = _cell(comp.diff)
            row[f"{m}_diff_ci95_low"], row[f"{m}_diff_ci95_high"] = _cell(comp.ci_low), _cell(comp.ci_high)
            row[f"{m}_diff_p_welch"] = _cell(comp.p)
            row[f"{m}_diff_p_holm"] = _cell(report.holm(m, c.label))
            row[f"{m}_diff_significant"] = significance_word(comp, report.holm(m, c.label))
            pair = report.paired[m][c.label]
            row[f"{m}_paired_n"], row[f"{m}_paired_diff"] = pair.n_x, _cell(pair.diff)
            row[f"{m}_paired_p"] = _cell(pair.p)
            row[f"{m}_paired_p_holm"] = _cell(report.paired_holm(m, c.label))
        h = c.health()
        row.update({k: _cell(v) for k, v in h.items()})
        rows.append([row.get(col, "") for col in header])
    return header, rows


def to_json(report: Report) -> dict[str, Any]:
    configs = []
    for c in report.configs:
        metrics = {key: c.stat(key).to_dict() for key in
                   ["steps_completed", "wall_time_s", "train_tokens_per_sec",
                    *(f"{k}_loss_tier{t}" for k in ("train", "val") for t in report.tiers)]}
        configs.append({"label": c.label, "tiers": c.tiers, "helper_fractions": c.helper_fractions, "sync": c.sync,
                        "planned_seeds": c.planned_seeds, "finished_seeds": [r.seed for r in c.finished],
                        "runs_not_finished": c.runs_not_finished, "failed_attempts": c.failed_attempts,
                        "metrics": metrics, "health": {k: json_number(v) if isinstance(v, float) else v
                                                       for k, v in c.health().items()}})
    comps = [{"metric": m, "config": label, "baseline": report.baseline, "role": "exploratory", **comp.to_dict(),
              **_decision(comp, report.holm(m, label))}
             for m, by_label in report.comparisons.items() for label, comp in by_label.items()]
    pairs = [{"metric": m, "config": label, "baseline": report.baseline, "role": "exploratory",
              "test": "paired t-test over common seeds",
              **{k: v for k, v in comp.to_dict().items() if k != "p_welch"}, "p": json_number(comp.p),
              **_decision(comp, report.paired_holm(m, label))}
             for m, by_label in report.paired.items() for label, comp in by_label.items()]
    return {"experiment": report.experiment,
            "settings": {"last_k": report.last_k, "grad_norm_threshold": report.grad_norm_threshold,
                         "baseline": report.baseline, "alpha": ALPHA, "confidence": 0.95,
                         "ci": "Student t over seeds (n-1 df)", "test": "Welch's t-test, Holm-adjusted per metric",
                         "significant": "Holm-adjusted p < alpha",
                         "analysis": "pre-registered (see analysis); every other test is exploratory"
                         if report.analysis else "none declared: every test is exploratory"},
            "references": report.references.to_dict(),
            "analysis": report.analysis.to_dict() if report.analysis else None,
            "configurations": configs, "comparisons": comps, "paired_comparisons": pairs,
            "runs": [r.to_dict() for r in report.runs]}


def _decision(comp: Any, p_holm: float | None) -> dict[str, Any]:
    """The Holm-adjusted decision, under the names results.md uses: `p_holm`, `significant` (Holm p <
    alpha; None when the test is n/a) and `significance` (yes / unadjusted only / no / n/a)."""
    return {"p_holm": json_number(p_holm), "significant": None if comp.p is None else bool(p_holm is not None
                                                                                           and p_holm < ALPHA),
            "significance": significance_word(comp, p_holm)}


def _cell(v: Any) -> Any:
    """CSV cell: '' for missing, 'nan' for non-finite, floats at full precision."""
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v

"""Experiment reports: per-configuration statistics, tables and plots from `events.jsonl`/`summary.json`.

Inputs are only the machine-readable files of each run (docs/events.md) and the experiment's
`experiment.json`/`runs.jsonl` written by `runner.py`; no log text is parsed. `run_result.load_run`
reads one run; this module groups the runs into configurations and computes the statistics
(`build_report`). `export.write_report` writes them to one directory: `results.md` (tables, via
render.py, and what they can and cannot tell, via conclusions.py), `results.csv` (one row per
configuration), `results.json` (everything, per run too), and through plots.py `val_loss.png`,
`train_loss.png` and `val_loss_diff.png` (same-seed differences against the baseline).

Definitions (the report repeats them, so a reader need not open this file):
- *run*: one (configuration, seed); *configuration*: a tier mix with its helper fractions and sync.
- *final train loss* of a client: the mean of its training losses (`client_step.loss`, its own
  batches) over the run's last K committed steps; of a tier: the mean over that tier's clients.
  A non-finite loss inside the window makes the value NaN (and is counted as NaN/Inf).
- *final val loss* of tier t: `eval.val_loss` at the last evaluated step, on the held-out sequences
  every run and tier share; tier 0 is the full model. Under `sync: none` there is no shared model:
  each client evaluates its own replica, and a tier's value is the mean over the replicas that
  evaluated it (the per-replica numbers are listed separately).
- loss statistics use finished runs only; health counts (NaN/Inf, gradient-norm explosions, client
  crashes, drops and discarded steps) use every run directory present, finished or not.
- *clients completed*: in a finished run, connected at the end and never killed; *crashed*: the
  rest. *nonzero exits*: client processes whose exit code was not 0, whether during training or
  after it (a process that aborts at shutdown after the last step still completed its training).
  *client drops*: `client_lost` events (a dropped client may rejoin and still complete);
  *steps discarded*: `step_discarded` events (a failed round, dropped whole and retried).
- *NaN/Inf count*: `client_step` records whose loss is null or not finite (a null loss of a client
  that trained no tokens that step is missing, not NaN), whose grad_norm is not finite or whose
  `nan_inf` flag is set, plus `eval` records whose val_loss is null or not finite.
- *gradient-norm explosion*: a committed step on which some client reported `grad_norm` (aggregated
  gradient, before clipping) above the threshold.
- *train tokens/s*: tokens of committed steps / their summed `step_wall_s`, leaving out the rounds
  that began right after a periodic validation (clients validate synchronously, so those rounds
  include it); *wall time*: the
  coordinator's `summary.wall_time_s` (start-up, validation and checkpoint included).
- statistics (stats.py): mean ± 95% CI half-width with Student's t over seeds; Welch's t-test
  against the baseline configuration, Holm-adjusted over the family of comparisons per metric.
- *pre-registered analysis* (prereg.py, analysis.py): what the experiment file declared before it ran
  (primary metric, comparisons, paired test, Holm, delta, TOST, verdict rules), computed exactly; every
  other test in the report is exploratory. *Reference lines* (references.py): unigram, bigram and
  untrained-model loss on the same validation tokens.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero_testnet.config import BUNDLED_CONFIGS_DIR
from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import RunDir, read_json_or_none, read_jsonl
from hetero_testnet.experiments.analysis import AnalysisResult, run_analysis
from hetero_testnet.experiments.prereg import analysis_from_dict
from hetero_testnet.experiments.references import References, experiment_references
from hetero_testnet.experiments.run_result import RunResult, load_run
from hetero_testnet.experiments.spec import DEFAULT_REPORT, MANIFEST_FILE, RUNS_LOG_FILE, load_report_notes
from hetero_testnet.experiments.stats import Comparison, MeanCI, holm, mean_ci, paired, welch

DIFF_METRICS = ("val_loss_tier0", "train_loss_tier0")
PRIMARY_METRIC = "val_loss_tier0"
"""Full-model validation loss: what configurations are judged on (the paired test and the conclusions)."""
_FAILED_DIR = re.compile(r"\.failed-\d+$|\.copying$")


# --------------------------------------------------------------------------- configurations

@dataclass
class ConfigResult:
    label: str
    tiers: list[int]
    helper_fractions: list[float]
    sync: str
    planned_seeds: list[int]
    runs: list[RunResult]
    failed_attempts: int = 0
    """Attempts in runs.jsonl that did not finish: ended unfinished, or cut off (the runner itself was
    killed, so no end was recorded) and started again. Their directories were moved aside."""

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.finished]

    @property
    def runs_not_finished(self) -> int:
        done = {r.seed for r in self.finished}
        return len([s for s in self.planned_seeds if s not in done]) if self.planned_seeds else \
            len(self.runs) - len(self.finished)

    def stat(self, key: str) -> MeanCI:
        return mean_ci([r.metric(key) for r in self.finished])

    def values(self, key: str) -> list[float | None]:
        return [r.metric(key) for r in self.finished]

    def by_seed(self, key: str) -> dict[int, float | None]:
        return {r.seed: r.metric(key) for r in self.finished if r.seed is not None}

    def health(self) -> dict[str, Any]:
        gmax = [r.grad_norm_max for r in self.runs if r.grad_norm_max is not None]
        return {"nan_inf_count": sum(r.nan_inf_count for r in self.runs),
                "grad_norm_explosions": sum(r.grad_norm_explosions for r in self.runs),
                "grad_norm_max": max(gmax) if gmax else None,
                "clients_completed": sum(r.clients_completed for r in self.runs),
                "clients_crashed": sum(r.clients_crashed for r in self.runs),
                "client_drops": sum(r.client_drops for r in self.runs),
                "steps_discarded": sum(r.steps_discarded for r in self.runs),
                "client_nonzero_exits": sum(r.client_nonzero_exits for r in self.runs)}


@dataclass
class Report:
    experiment: dict[str, Any]
    last_k: int
    grad_norm_threshold: float
    baseline: str | None
    configs: list[ConfigResult]
    comparisons: dict[str, dict[str, Comparison]]
    """metric -> label -> comparison against the baseline."""
    holm_p: dict[str, dict[str, float | None]]
    paired: dict[str, dict[str, Comparison]] = field(default_factory=dict)
    """metric -> label -> paired-by-seed comparison against the baseline (a secondary analysis)."""
    paired_holm_p: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """The experiment's own statements (`report.notes` of its YAML) for the conclusions."""
    references: References = field(default_factory=References)
    """Unigram, bigram and untrained-model validation loss on the runs' validation tokens."""
    analysis: AnalysisResult | None = None
    """The pre-registered analysis, computed; None when the experiment declared none."""

    def holm(self, metric: str, label: str) -> float | None:
        return self.holm_p.get(metric, {}).get(label)

    def paired_holm(self, metric: str, label: str) -> float | None:
        return self.paired_holm_p.get(metric, {}).get(label)

    def config(self, label: str) -> ConfigResult:
        """The configuration with this label (the baseline's label always exists)."""
        return next(c for c in self.configs if c.label == label)

    @property
    def tiers(self) -> list[int]:
        return sorted({0} | {t for c in self.configs for t in c.tiers})

    @property
    def runs(self) -> list[RunResult]:
        return [r for c in self.configs for r in c.runs]


def build_report(experiment_dir: Path, *, last_k: int | None = None, grad_norm_threshold: float | None = None,
                 baseline: str | None = None, references: bool = True) -> Report:
    """Load every run of an experiment directory and compute the statistics (and, unless
    `references` is False, the reference lines: references.py)."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise ConfigError(f"experiment directory {experiment_dir} does not exist",
                          hint="pass the directory `testnet experiment run` wrote, e.g. logs/tier-mix")
    manifest = read_json_or_none(experiment_dir / MANIFEST_FILE) or {}
    settings = manifest.get("report") or {}
    last_k = last_k or settings.get("last_k") or DEFAULT_REPORT.last_k
    threshold = grad_norm_threshold or settings.get("grad_norm_threshold") or DEFAULT_REPORT.grad_norm_threshold
    if last_k < 1 or threshold <= 0:
        raise ConfigError("--last-k must be >= 1 and --grad-norm-threshold > 0")
    planned = {r["name"]: r for r in manifest.get("runs", [])}
    runs = [load_run(d, last_k=last_k, grad_norm_threshold=threshold, meta=planned.get(d.name))
            for d in _run_dirs(experiment_dir)]
    if not runs:
        raise ConfigError(f"no runs in {experiment_dir} (no subdirectory with events.jsonl or summary.json)")
    configs = _group(manifest, runs, _failed_attempts(read_jsonl(experiment_dir / RUNS_LOG_FILE)))
    baseline = baseline or settings.get("baseline") or next(iter(configs))
    if baseline not in configs:
        raise ConfigError(f"baseline {baseline!r} is not a configuration of {experiment_dir}",
                          hint=f"configurations: {', '.join(configs)}")
    comparisons, holm_p, paired_comps, paired_holm = _compare(configs, baseline)
    experiment = {k: v for k, v in manifest.items() if k not in ("runs", "configurations", "analysis")}
    experiment.setdefault("name", experiment_dir.name)
    refs = experiment_references(experiment_dir, manifest) if references else \
        References(reason="reference lines not computed (--no-references)")
    analysis = None
    if isinstance(manifest.get("analysis"), dict):
        declared = analysis_from_dict(manifest["analysis"])
        analysis = run_analysis(declared, lambda label: configs[label].by_seed(declared.metric)
                                if label in configs else {},
                                lambda label, metric: configs[label].by_seed(metric) if label in configs else {})
        missing = sum(c.runs_not_finished for c in configs.values())
        if missing:  # a verdict is declared over the whole matrix: none before it is complete
            analysis.verdict_reason = f"{missing} planned run(s) not finished yet; would read: {analysis.verdict}"
            analysis.verdict = "pending"
    return Report(experiment, last_k, threshold, baseline, list(configs.values()), comparisons, holm_p,
                  paired_comps, paired_holm, _notes(manifest), refs, analysis)


def _run_dirs(experiment_dir: Path) -> list[Path]:
    """Subdirectories with events.jsonl or summary.json, except attempts moved aside (`<run>.failed-<n>`)
    and an interrupted copy of a reused run (`<run>.copying`, plan.py)."""
    return sorted(p for p in experiment_dir.iterdir()
                  if p.is_dir() and not _FAILED_DIR.search(p.name)
                  and (RunDir(p).events.exists() or RunDir(p).summary.exists()))


def _group(manifest: dict[str, Any], runs: list[RunResult], failed_attempts: dict[str, int]) -> dict[str, ConfigResult]:
    """Configurations in the manifest's order (then any found only among the runs), runs by seed."""
    configs: dict[str, ConfigResult] = {}
    for c in manifest.get("configurations", []):
        configs[c["label"]] = ConfigResult(c["label"], c["tiers"], c["helper_fractions"], c["sync"],
                                           list(c["seeds"]), [])
    for r in runs:
        if r.label not in configs:
            configs[r.label] = ConfigResult(r.label, r.tiers, r.helper_fractions, r.sync, [], [])
        configs[r.label].runs.append(r)
    for label, cfg in configs.items():
        cfg.runs.sort(key=lambda r: (r.seed is None, r.seed or 0, r.name))
        cfg.failed_attempts = failed_attempts.get(label, 0)
    return configs


_ByMetric = dict[str, dict[str, Comparison]]
_HolmByMetric = dict[str, dict[str, float | None]]


def _compare(configs: dict[str, ConfigResult], baseline: str) -> tuple[_ByMetric, _HolmByMetric, _ByMetric,
                                                                        _HolmByMetric]:
    """Per metric, every configuration against the baseline: Welch's test and the paired test, each
    Holm-adjusted over the configurations that have the metric."""
    comparisons: _ByMetric = {}
    holm_p: _HolmByMetric = {}
    paired_comps: _ByMetric = {}
    paired_holm: _HolmByMetric = {}
    base = configs[baseline]
    for metric in _diff_metrics(configs.values()):
        if base.stat(metric).n == 0:
            continue
        others = [c for c in configs.values() if c.label != baseline and c.stat(metric).n > 0]
        comps = {c.label: welch(c.values(metric), base.values(metric)) for c in others}
        comparisons[metric] = comps
        holm_p[metric] = dict(zip(comps, holm([c.p for c in comps.values()])))
        pairs = {c.label: paired(c.by_seed(metric), base.by_seed(metric)) for c in others}
        paired_comps[metric] = pairs
        paired_holm[metric] = dict(zip(pairs, holm([c.p for c in pairs.values()])))
    return comparisons, holm_p, paired_comps, paired_holm


def _notes(manifest: dict[str, Any]) -> tuple[str, ...]:
    """`report.notes` as experiment.json recorded them; for a manifest written before it recorded
    notes, those of its experiment file: the recorded `source`, else the bundled file of that name
    (configs/experiments/), since a results copy outlives the checkout that ran it."""
    settings = manifest.get("report") or {}
    if "notes" in settings:
        return tuple(settings["notes"])
    source = manifest.get("source")
    if not source:
        return ()
    for path in (Path(source), BUNDLED_CONFIGS_DIR / "experiments" / Path(source).name):
        if path.is_file():
            return load_report_notes(path)
    return ()


def _failed_attempts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Per label: attempts that ended unfinished, plus attempts superseded by a new start of the same
    run without an end of their own (the runner was killed mid-run). A last start with no end is
    not counted: that run may still be going."""
    failed: dict[str, int] = defaultdict(int)
    open_runs: set[str] = set()
    for rec in records:
        run, label = str(rec.get("run")), str(rec.get("label"))
        if rec.get("event") == "run_started":
            if run in open_runs:
                failed[label] += 1
            open_runs.add(run)
        elif rec.get("event") == "run_ended":
            open_runs.discard(run)
            if rec.get("status") != "finished":
                failed[label] += 1
    return failed


def _diff_metrics(configs) -> list[str]:
    keys = {f"{kind}_loss_tier{t}" for c in configs for r in c.finished
            for kind, table in (("val", r.val_loss_by_tier), ("train", r.train_loss_by_tier)) for t in table}
    return sorted(keys, key=lambda k: (not k.startswith("val"), k))

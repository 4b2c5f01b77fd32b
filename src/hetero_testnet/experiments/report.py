"""Experiment reports: per-configuration statistics, tables and plots from `events.jsonl`/`summary.json`.

Inputs are only the machine-readable files of each run (docs/events.md) and the experiment's
`experiment.json`/`runs.jsonl` written by `experiments.py`; no log text is parsed. This module
loads the runs and computes the statistics (`build_report`); `report_export.write_report` writes
them to one directory: `results.md` (tables and what they can and cannot tell, via report_render),
`results.csv` (one row per configuration), `results.json` (everything, per run too),
`val_loss.png`, `train_loss.png` and `val_loss_diff.png` (same-seed differences against the baseline).

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
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import RunDir
from hetero_testnet.events import read_events
from hetero_testnet.experiments.runner import MANIFEST_FILE, RUN_SPEC_FILE, RUNS_LOG_FILE, SUMMARY_FILE
from hetero_testnet.experiments.stats import Comparison, MeanCI, holm, json_number, mean_ci, paired, welch

DEFAULT_LAST_K = 8
DEFAULT_GRAD_NORM_THRESHOLD = 10.0
DIFF_METRICS = ("val_loss_tier0", "train_loss_tier0")
_FAILED_DIR = re.compile(r"\.failed-\d+$")


# --------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    """Everything the report needs from one run directory."""

    name: str
    label: str
    seed: int | None
    tiers: list[int]
    helper_fractions: list[float]
    sync: str
    status: str
    """finished | failed | interrupted (from summary.json), or partial (no summary.json: the run was
    killed, or is still running)."""
    reason: str
    steps_completed: int
    total_steps: int | None
    wall_time_s: float | None
    train_tokens_per_sec: float | None
    last_k: int
    train_window: tuple[int, int] | None
    """First and last step (0-based) of the final-train-loss window."""
    train_loss_by_client: dict[int, float]
    client_tiers: dict[int, int]
    train_loss_by_tier: dict[int, float]
    val_step: int | None
    """Steps completed when the final validation ran."""
    val_loss_by_tier: dict[int, float]
    val_by_replica: dict[str, float]
    """`client<k>_tier<t>` -> val loss (sync none only)."""
    val_num_samples: int | None
    nan_inf_count: int
    grad_norm_explosions: int
    grad_norm_max: float | None
    clients_total: int
    clients_completed: int
    clients_crashed: int
    client_drops: int
    """`client_lost` events (a client dropped or vanished; it may have rejoined and completed)."""
    steps_discarded: int
    """`step_discarded` events (a round dropped whole after a failure; the step was retried)."""
    client_nonzero_exits: int
    """Client processes that exited with a code other than 0 (summary.json), during or after training."""
    val_curve: dict[int, dict[int, float]] = field(default_factory=dict)
    train_curve: dict[int, dict[int, float]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def metric(self, key: str) -> float | None:
        """`val_loss_tier<t>`, `train_loss_tier<t>`, `steps_completed`, `wall_time_s`, `train_tokens_per_sec`."""
        if m := re.fullmatch(r"(val|train)_loss_tier(\d+)", key):
            table = self.val_loss_by_tier if m.group(1) == "val" else self.train_loss_by_tier
            return table.get(int(m.group(2)))
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "seed": self.seed, "tiers": self.tiers,
            "helper_fractions": self.helper_fractions, "sync": self.sync, "status": self.status,
            "reason": self.reason, "steps_completed": self.steps_completed, "total_steps": self.total_steps,
            "wall_time_s": json_number(self.wall_time_s),
            "train_tokens_per_sec": json_number(self.train_tokens_per_sec),
            "last_k": self.last_k, "train_window_steps": list(self.train_window) if self.train_window else None,
            "train_loss_by_client": {str(c): json_number(v) for c, v in self.train_loss_by_client.items()},
            "client_tiers": {str(c): t for c, t in self.client_tiers.items()},
            "train_loss_by_tier": {str(t): json_number(v) for t, v in self.train_loss_by_tier.items()},
            "val_step": self.val_step,
            "val_loss_by_tier": {str(t): json_number(v) for t, v in self.val_loss_by_tier.items()},
            "val_by_replica": {k: json_number(v) for k, v in self.val_by_replica.items()},
            "val_num_samples": self.val_num_samples, "nan_inf_count": self.nan_inf_count,
            "grad_norm_explosions": self.grad_norm_explosions, "grad_norm_max": json_number(self.grad_norm_max),
            "clients_total": self.clients_total, "clients_completed": self.clients_completed,
            "clients_crashed": self.clients_crashed, "client_drops": self.client_drops,
            "steps_discarded": self.steps_discarded, "client_nonzero_exits": self.client_nonzero_exits,
        }


def load_run(run_dir: Path, *, last_k: int = DEFAULT_LAST_K, grad_norm_threshold: float = DEFAULT_GRAD_NORM_THRESHOLD,
             meta: dict[str, Any] | None = None) -> RunResult:
    """Read one run directory. `meta` (from experiment.json) supplies label/seed/tiers/sync; otherwise
    they come from the `launch` event, experiment-run.json or the run's config.yaml."""
    events = read_events(RunDir(run_dir).events) if RunDir(run_dir).events.exists() else []
    summary = _read_json(run_dir / SUMMARY_FILE) or {}
    meta = dict(meta or _read_json(run_dir / RUN_SPEC_FILE) or {})
    launch = next((e for e in events if e.get("event") == "launch"), {})
    tiers = list(meta.get("tiers") or launch.get("tiers") or [])
    sync = meta.get("sync") or summary.get("sync") or launch.get("sync") or "allreduce"
    fractions = list(meta.get("helper_fractions") or launch.get("helper_fractions") or [0.0] * len(tiers))
    label = meta.get("label") or f"tiers-{'-'.join(map(str, tiers))}{'-none' if sync == 'none' else ''}"
    seed = meta.get("seed")
    if seed is None:
        seed = _config_seed(run_dir)

    client_tiers: dict[int, int] = {}
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    committed: dict[int, dict[str, Any]] = {}
    evals: dict[int, list[dict[str, Any]]] = defaultdict(list)
    lost: set[int] = set()
    drops = discarded = 0
    finished_event: dict[str, Any] = {}
    for e in events:
        kind, cid, step = e.get("event"), e.get("client_id"), e.get("step")
        if kind == "client_joined" and cid is not None:
            client_tiers[cid] = int(e["tier"])
        elif kind == "client_step" and cid is not None and step is not None:
            steps[(cid, step)] = e
            if e.get("tier") is not None:
                client_tiers.setdefault(cid, int(e["tier"]))
        elif kind == "step_committed" and step is not None:
            committed[step] = e
        elif kind == "eval" and step is not None:
            evals[step].append(e)
        elif kind == "client_lost" and cid is not None:
            lost.add(cid)
            drops += 1
        elif kind == "step_discarded":
            discarded += 1
        elif kind == "run_finished":
            finished_event = e

    # health, from the numbers
    nan_inf = 0
    exploded_steps: set[int] = set()
    gmax: float | None = None
    for (cid, step), e in steps.items():
        g, loss = e.get("grad_norm"), _train_loss(e)
        if (loss is not None and math.isnan(loss)) or (g is not None and not _finite(g)) or bool(e.get("nan_inf")):
            nan_inf += 1
        if isinstance(g, (int, float)):
            if g > grad_norm_threshold:
                exploded_steps.add(step)
            if math.isfinite(g):
                gmax = g if gmax is None else max(gmax, g)
    for records in evals.values():
        nan_inf += sum(1 for r in records if not _finite(r.get("val_loss")))

    # final train loss over the run's last K committed steps
    last_step = max(committed) if committed else max((s for _, s in steps), default=None)
    window = None
    by_client: dict[int, float] = {}
    if last_step is not None:
        window = (max(0, last_step - last_k + 1), last_step)
        per_client: dict[int, list[float]] = defaultdict(list)
        for (cid, step), e in steps.items():
            if window[0] <= step <= window[1] and (loss := _train_loss(e)) is not None:
                per_client[cid].append(loss)
        for cid, losses in sorted(per_client.items()):
            by_client[cid] = _mean_or_nan(losses)
    by_tier = _mean_by_tier(by_client, client_tiers)

    # curves
    train_curve: dict[int, dict[int, float]] = defaultdict(dict)
    per_step_tier: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for (cid, step), e in steps.items():
        if (loss := _train_loss(e)) is not None:
            per_step_tier[(client_tiers.get(cid, e.get("tier", 0)), step)].append(loss)
    for (tier, step), losses in sorted(per_step_tier.items()):
        train_curve[tier][step] = _mean_or_nan(losses)
    val_curve: dict[int, dict[int, float]] = defaultdict(dict)
    for step, records in sorted(evals.items()):
        per_tier: dict[int, list[Any]] = defaultdict(list)
        for r in records:
            per_tier[int(r["tier"])].append(r.get("val_loss"))
        for tier, values in per_tier.items():
            val_curve[tier][step] = _mean_or_nan(values)
    val_step = max(evals) if evals else None
    val_by_tier = {t: curve[val_step] for t, curve in sorted(val_curve.items()) if val_step in curve}
    val_by_replica = {}
    if sync == "none" and val_step is not None:
        for r in sorted(evals[val_step], key=lambda r: (r.get("client_id") or 0, r["tier"])):
            v = r.get("val_loss")
            val_by_replica[f"client{r.get('client_id')}_tier{r['tier']}"] = float(v) if v is not None else math.nan
    num_samples = summary.get("val_num_samples")
    if num_samples is None and val_step is not None:
        num_samples = evals[val_step][0].get("num_samples")

    # throughput and time
    # a client validates synchronously, so a round that began right after a validation request
    # (eval step k = k steps completed -> round k) includes it: leave those rounds out
    steady = [e for s, e in committed.items() if s not in evals] or list(committed.values())
    tokens = sum(e.get("tokens") or 0 for e in steady)
    step_wall = math.fsum(e.get("step_wall_s") or 0.0 for e in steady)
    tps = tokens / step_wall if step_wall > 0 else None
    wall = summary.get("wall_time_s")
    if wall is None and events:
        wall = events[-1]["ts"] - events[0]["ts"]

    # clients
    clients = summary.get("clients") or {}
    total = len(clients) if clients else len(client_tiers)
    completed = sum(1 for c in clients.values() if c.get("connected_at_end") and not c.get("kills")) \
        if summary.get("status") == "finished" else 0
    bad_exits = sum(1 for c in clients.values() if c.get("exit_code") not in (0, None))
    # summary.json is authoritative (the runner reruns a directory without one); without it: partial
    status = summary.get("status") or "partial"
    reason = summary.get("reason") or (
        f"no summary.json (last run_finished event: {finished_event.get('status')})" if finished_event
        else "no summary.json")
    return RunResult(
        name=run_dir.name, label=str(label), seed=seed, tiers=tiers, helper_fractions=fractions, sync=sync,
        status=status, reason=str(reason),
        steps_completed=int(summary.get("steps_completed", len(committed))),
        total_steps=summary.get("total_steps", launch.get("total_steps")),
        wall_time_s=wall, train_tokens_per_sec=tps, last_k=last_k, train_window=window,
        train_loss_by_client=by_client, client_tiers=client_tiers, train_loss_by_tier=by_tier,
        val_step=val_step, val_loss_by_tier=val_by_tier, val_by_replica=val_by_replica, val_num_samples=num_samples,
        nan_inf_count=nan_inf, grad_norm_explosions=len(exploded_steps), grad_norm_max=gmax,
        clients_total=total, clients_completed=completed, clients_crashed=total - completed,
        client_drops=drops, steps_discarded=discarded, client_nonzero_exits=bad_exits,
        val_curve=dict(val_curve), train_curve=dict(train_curve))


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
                 baseline: str | None = None) -> Report:
    """Load every run of an experiment directory and compute the statistics."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise ConfigError(f"experiment directory {experiment_dir} does not exist",
                          hint="pass the directory `testnet experiment run` wrote, e.g. logs/tier-mix")
    manifest = _read_json(experiment_dir / MANIFEST_FILE) or {}
    settings = manifest.get("report") or {}
    last_k = last_k or settings.get("last_k") or DEFAULT_LAST_K
    threshold = grad_norm_threshold or settings.get("grad_norm_threshold") or DEFAULT_GRAD_NORM_THRESHOLD
    if last_k < 1 or threshold <= 0:
        raise ConfigError("--last-k must be >= 1 and --grad-norm-threshold > 0")

    planned = {r["name"]: r for r in manifest.get("runs", [])}
    dirs = sorted(p for p in experiment_dir.iterdir()
                  if p.is_dir() and not _FAILED_DIR.search(p.name)
                  and (RunDir(p).events.exists() or (p / SUMMARY_FILE).exists()))
    runs = [load_run(d, last_k=last_k, grad_norm_threshold=threshold, meta=planned.get(d.name)) for d in dirs]
    if not runs:
        raise ConfigError(f"no runs in {experiment_dir} (no subdirectory with events.jsonl or summary.json)")

    failed_attempts = _failed_attempts(_read_jsonl(experiment_dir / RUNS_LOG_FILE))

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

    baseline = baseline or settings.get("baseline") or next(iter(configs))
    if baseline not in configs:
        raise ConfigError(f"baseline {baseline!r} is not a configuration of {experiment_dir}",
                          hint=f"configurations: {', '.join(configs)}")
    comparisons: dict[str, dict[str, Comparison]] = {}
    holm_p: dict[str, dict[str, float | None]] = {}
    paired_comps: dict[str, dict[str, Comparison]] = {}
    paired_holm: dict[str, dict[str, float | None]] = {}
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
    experiment = {k: v for k, v in manifest.items() if k not in ("runs", "configurations")}
    experiment.setdefault("name", experiment_dir.name)
    return Report(experiment, last_k, threshold, baseline, list(configs.values()), comparisons, holm_p,
                  paired_comps, paired_holm)


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


# --------------------------------------------------------------------------- helpers

def _mean_by_tier(by_client: dict[int, float], client_tiers: dict[int, int]) -> dict[int, float]:
    groups: dict[int, list[float]] = defaultdict(list)
    for cid, v in by_client.items():
        groups[client_tiers.get(cid, 0)].append(v)
    return {t: math.fsum(vs) / len(vs) for t, vs in sorted(groups.items())}


def _train_loss(e: dict[str, Any]) -> float | None:
    """A client_step's loss: the number; NaN when null or not finite although the client trained
    tokens (docs/events.md: null if not finite); None (missing) when it trained no tokens."""
    loss = e.get("loss")
    if _finite(loss):
        return float(loss)
    if loss is None and e.get("tokens") == 0:
        return None
    return math.nan


def _mean_or_nan(values: list[Any]) -> float:
    return math.fsum(values) / len(values) if values and all(_finite(v) for v in values) else math.nan


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _config_seed(run_dir: Path) -> int | None:
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    seed = raw.get("seed") if isinstance(raw, dict) else None
    return seed if isinstance(seed, int) else None

"""One run directory, read for a report: `load_run` folds its `events.jsonl` and `summary.json` into a `RunResult`.

Only machine-readable files are read (docs/events.md); no log text is parsed. The definitions of
every number (final train loss, NaN/Inf count, explosions, throughput, client outcome) are in the
docstring of report.py, which the report repeats for its readers. `load_run` is the sequence of
small steps below: fold the events once (`fold_events`), then derive the identity, health, final
train-loss window, curves, final validation, throughput and client outcome from that fold.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from hetero_testnet.events import Event, read_events
from hetero_testnet.rundir import RunDir, read_json_or_none
from hetero_testnet.experiments.spec import DEFAULT_REPORT, RUN_SPEC_FILE
from hetero_testnet.experiments.stats import json_number


WIDEST_METRIC = "val_loss_widest"
"""Validation loss of the widest model a configuration trained (tier min(tiers)): the model it delivers.
For a mix with a tier-0 client that is the full model; for an all-tier-2 mix it is the tier-2
submodel, since the neurons beyond it were never trained."""


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
    """finished | failed | interrupted (summary.json), or partial (no summary.json: killed, or running)."""
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
    utilisation: float | None = None
    """summary.json's `utilisation` (runs since issue 12; None for older runs)."""
    flops_trained: float | None = None
    capacity_by_client: dict[int, dict[str, Any]] = field(default_factory=dict)
    """client id -> its `profile` name, `idle_share`, `emulated_s`, `wait_s`, `bytes_sent_per_step` (summary.json)."""
    cost_curve: list[dict[str, Any]] = field(default_factory=list)
    """summary.json's `val_curve`: each validation with the wall time, tokens and FLOPs spent by then."""
    data_seed: int | None = None
    """summary.json's seed of the data order (None for runs from before seeds varied it)."""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def metric(self, key: str) -> float | None:
        """`val_loss_tier<t>`, `train_loss_tier<t>`, `val_loss_widest`, or any numeric field by name."""
        if key == WIDEST_METRIC:
            return self.val_loss_by_tier.get(self.widest_tier)
        if m := re.fullmatch(r"(val|train)_loss_tier(\d+)", key):
            table = self.val_loss_by_tier if m.group(1) == "val" else self.train_loss_by_tier
            return table.get(int(m.group(2)))
        return getattr(self, key)

    @property
    def widest_tier(self) -> int:
        """The widest (sub)model any client trained: the smallest tier of the mix (0 if unknown)."""
        return min(self.tiers, default=0)

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
            # only runs that measured capacity carry these, so older reports regenerate byte for byte
            **({"utilisation": json_number(self.utilisation), "flops_trained": json_number(self.flops_trained),
                "capacity_by_client": {str(c): v for c, v in self.capacity_by_client.items()}}
               if self.utilisation is not None else {}),
            **({"data_seed": self.data_seed} if self.data_seed is not None else {})}


def load_run(run_dir: Path, *, last_k: int = DEFAULT_REPORT.last_k,
             grad_norm_threshold: float = DEFAULT_REPORT.grad_norm_threshold,
             meta: dict[str, Any] | None = None) -> RunResult:
    """Read one run directory. `meta` (from experiment.json) supplies label/seed/tiers/sync; otherwise
    they come from the `launch` event, experiment-run.json or the run's config.yaml."""
    files = RunDir(Path(run_dir))
    events = read_events(files.events) if files.events.exists() else []
    summary = read_json_or_none(files.summary) or {}
    fold = fold_events(events)
    identity = _identity(files, dict(meta or read_json_or_none(files.path / RUN_SPEC_FILE) or {}), summary,
                         fold.launch)
    window, by_client = _final_train_loss(fold, last_k)
    val_curve = _val_curve(fold.evals)
    # summary.json is authoritative (the runner reruns a directory without one); without it: partial
    status = summary.get("status") or "partial"
    reason = summary.get("reason") or (
        f"no summary.json (last run_finished event: {fold.finished.get('status')})" if fold.finished
        else "no summary.json")
    return RunResult(
        name=files.name, **identity._asdict(), status=status, reason=str(reason),
        steps_completed=int(summary.get("steps_completed", len(fold.committed))),
        total_steps=summary.get("total_steps", fold.launch.get("total_steps")),
        wall_time_s=_wall_time_s(summary, events), train_tokens_per_sec=_train_tokens_per_sec(fold),
        last_k=last_k, train_window=window, train_loss_by_client=by_client, client_tiers=fold.client_tiers,
        train_loss_by_tier=_mean_by_tier(by_client, fold.client_tiers),
        **_final_validation(fold.evals, val_curve, identity.sync, summary)._asdict(),
        **_health(fold, grad_norm_threshold)._asdict(),
        **_client_outcome(summary, fold.client_tiers)._asdict(),
        client_drops=fold.client_drops, steps_discarded=fold.steps_discarded,
        val_curve=val_curve, train_curve=_train_curve(fold), **_capacity(summary), data_seed=summary.get("data_seed"))


# --------------------------------------------------------------------------- the fold

@dataclass
class RunEvents:
    """A run's events, keyed for the computations of `load_run`."""

    launch: dict[str, Any] = field(default_factory=dict)
    """The first `launch` event ({} without one)."""
    client_tiers: dict[int, int] = field(default_factory=dict)
    """client_id -> tier, in order of first appearance (`client_joined`, else its first `client_step`)."""
    steps: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    """(client_id, step) -> its `client_step` record."""
    committed: dict[int, dict[str, Any]] = field(default_factory=dict)
    """step -> its `step_committed` record."""
    evals: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """steps completed -> the `eval` records of that validation."""
    client_drops: int = 0
    steps_discarded: int = 0
    finished: dict[str, Any] = field(default_factory=dict)
    """The last `run_finished` event ({} without one)."""


def fold_events(events: list[dict[str, Any]]) -> RunEvents:
    """One pass over the events; records of unknown kinds, or without the keys they need, are skipped."""
    fold = RunEvents()
    for e in events:
        kind, cid, step = e.get("event"), e.get("client_id"), e.get("step")
        if kind == Event.LAUNCH and not fold.launch:
            fold.launch = e
        elif kind == Event.CLIENT_JOINED and cid is not None:
            fold.client_tiers[cid] = int(e["tier"])
        elif kind == Event.CLIENT_STEP and cid is not None and step is not None:
            fold.steps[(cid, step)] = e
            if e.get("tier") is not None:
                fold.client_tiers.setdefault(cid, int(e["tier"]))
        elif kind == Event.STEP_COMMITTED and step is not None:
            fold.committed[step] = e
        elif kind == Event.EVAL and step is not None:
            fold.evals.setdefault(step, []).append(e)
        elif kind == Event.CLIENT_LOST and cid is not None:
            fold.client_drops += 1
        elif kind == Event.STEP_DISCARDED:
            fold.steps_discarded += 1
        elif kind == Event.RUN_FINISHED:
            fold.finished = e
    return fold


# --------------------------------------------------------------------------- what is derived from it

class _Identity(NamedTuple):
    label: str
    seed: int | None
    tiers: list[int]
    helper_fractions: list[float]
    sync: str


def _identity(files: RunDir, meta: dict[str, Any], summary: dict[str, Any], launch: dict[str, Any]) -> _Identity:
    tiers = list(meta.get("tiers") or launch.get("tiers") or [])
    sync = meta.get("sync") or summary.get("sync") or launch.get("sync") or "allreduce"
    fractions = list(meta.get("helper_fractions") or launch.get("helper_fractions") or [0.0] * len(tiers))
    label = meta.get("label") or f"tiers-{'-'.join(map(str, tiers))}{'-none' if sync == 'none' else ''}"
    seed = meta.get("seed")
    if seed is None:
        seed = _config_seed(files.config)
    return _Identity(str(label), seed, tiers, fractions, sync)


class _Health(NamedTuple):
    nan_inf_count: int
    grad_norm_explosions: int
    grad_norm_max: float | None


def _health(fold: RunEvents, grad_norm_threshold: float) -> _Health:
    """NaN/Inf records, steps with a pre-clip grad norm above the threshold, and the largest finite norm."""
    nan_inf = 0
    exploded_steps: set[int] = set()
    gmax: float | None = None
    for (_, step), e in fold.steps.items():
        g, loss = e.get("grad_norm"), _train_loss(e)
        if (loss is not None and math.isnan(loss)) or (g is not None and not _finite(g)) or bool(e.get("nan_inf")):
            nan_inf += 1
        if isinstance(g, (int, float)):
            if g > grad_norm_threshold:
                exploded_steps.add(step)
            if math.isfinite(g):
                gmax = g if gmax is None else max(gmax, g)
    for records in fold.evals.values():
        nan_inf += sum(1 for r in records if not _finite(r.get("val_loss")))
    return _Health(nan_inf, len(exploded_steps), gmax)


def _final_train_loss(fold: RunEvents, last_k: int) -> tuple[tuple[int, int] | None, dict[int, float]]:
    """The window of the run's last K committed steps, and each client's mean training loss inside it."""
    last_step = max(fold.committed) if fold.committed else max((s for _, s in fold.steps), default=None)
    if last_step is None:
        return None, {}
    window = (max(0, last_step - last_k + 1), last_step)
    per_client: dict[int, list[float]] = defaultdict(list)
    for (cid, step), e in fold.steps.items():
        if window[0] <= step <= window[1] and (loss := _train_loss(e)) is not None:
            per_client[cid].append(loss)
    return window, {cid: _mean_or_nan(losses) for cid, losses in sorted(per_client.items())}


def _train_curve(fold: RunEvents) -> dict[int, dict[int, float]]:
    """tier -> step -> mean training loss of that tier's clients."""
    per_step_tier: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for (cid, step), e in fold.steps.items():
        if (loss := _train_loss(e)) is not None:
            per_step_tier[(fold.client_tiers.get(cid, e.get("tier", 0)), step)].append(loss)
    curve: dict[int, dict[int, float]] = defaultdict(dict)
    for (tier, step), losses in sorted(per_step_tier.items()):
        curve[tier][step] = _mean_or_nan(losses)
    return dict(curve)


def _val_curve(evals: dict[int, list[dict[str, Any]]]) -> dict[int, dict[int, float]]:
    """tier -> steps completed -> validation loss (the mean over replicas under `sync: none`)."""
    curve: dict[int, dict[int, float]] = defaultdict(dict)
    for step, records in sorted(evals.items()):
        per_tier: dict[int, list[Any]] = defaultdict(list)
        for r in records:
            per_tier[int(r["tier"])].append(r.get("val_loss"))
        for tier, values in per_tier.items():
            curve[tier][step] = _mean_or_nan(values)
    return dict(curve)


class _Validation(NamedTuple):
    val_step: int | None
    val_loss_by_tier: dict[int, float]
    val_by_replica: dict[str, float]
    val_num_samples: int | None


def _final_validation(evals: dict[int, list[dict[str, Any]]], val_curve: dict[int, dict[int, float]], sync: str,
                      summary: dict[str, Any]) -> _Validation:
    """The last validation: per tier, per replica (sync none only), and its number of sequences."""
    val_step = max(evals) if evals else None
    by_tier = {t: curve[val_step] for t, curve in sorted(val_curve.items()) if val_step in curve}
    by_replica = {}
    if sync == "none" and val_step is not None:
        for r in sorted(evals[val_step], key=lambda r: (r.get("client_id") or 0, r["tier"])):
            v = r.get("val_loss")
            by_replica[f"client{r.get('client_id')}_tier{r['tier']}"] = float(v) if v is not None else math.nan
    num_samples = summary.get("val_num_samples")
    if num_samples is None and val_step is not None:
        num_samples = evals[val_step][0].get("num_samples")
    return _Validation(val_step, by_tier, by_replica, num_samples)


def _train_tokens_per_sec(fold: RunEvents) -> float | None:
    # a client validates synchronously, so a round that began right after a validation request
    # (eval step k = k steps completed -> round k) includes it: leave those rounds out
    steady = [e for s, e in fold.committed.items() if s not in fold.evals] or list(fold.committed.values())
    tokens = sum(e.get("tokens") or 0 for e in steady)
    step_wall = math.fsum(e.get("step_wall_s") or 0.0 for e in steady)
    return tokens / step_wall if step_wall > 0 else None


def _wall_time_s(summary: dict[str, Any], events: list[dict[str, Any]]) -> float | None:
    """The coordinator's wall time; without a summary, first to last event."""
    wall = summary.get("wall_time_s")
    if wall is None and events:
        wall = events[-1]["ts"] - events[0]["ts"]
    return wall


class _ClientOutcome(NamedTuple):
    clients_total: int
    clients_completed: int
    clients_crashed: int
    client_nonzero_exits: int


def _capacity(summary: dict[str, Any]) -> dict[str, Any]:
    """Utilisation, FLOPs and each client's idle share and bytes, as summary.json has them (issue 12)."""
    clients = summary.get("clients") if isinstance(summary.get("clients"), dict) else {}
    by_client = {}
    for cid, c in clients.items():
        if isinstance(c, dict) and str(cid).isdigit() and "idle_share" in c:
            profile = c.get("profile") if isinstance(c.get("profile"), dict) else None
            by_client[int(cid)] = {"profile": profile.get("name") if profile else "local",
                                   "speed": profile.get("speed") if profile else 1.0,
                                   **{k: c.get(k) for k in ("idle_share", "emulated_s", "wait_s", "rounds",
                                                            "bytes_sent_per_step")}}
    curve = summary.get("val_curve") if isinstance(summary.get("val_curve"), list) else []
    return {"utilisation": summary.get("utilisation"), "flops_trained": summary.get("flops_trained"),
            "capacity_by_client": by_client, "cost_curve": [p for p in curve if isinstance(p, dict)]}


def _client_outcome(summary: dict[str, Any], client_tiers: dict[int, int]) -> _ClientOutcome:
    """Completed: in a finished run, connected at the end and never killed; crashed: the rest."""
    clients = summary.get("clients") or {}
    total = len(clients) if clients else len(client_tiers)
    completed = sum(1 for c in clients.values() if c.get("connected_at_end") and not c.get("kills")) \
        if summary.get("status") == "finished" else 0
    bad_exits = sum(1 for c in clients.values() if c.get("exit_code") not in (0, None))
    return _ClientOutcome(total, completed, total - completed, bad_exits)


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


def _config_seed(config_path: Path) -> int | None:
    try:
        raw = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    seed = raw.get("seed") if isinstance(raw, dict) else None
    return seed if isinstance(seed, int) else None

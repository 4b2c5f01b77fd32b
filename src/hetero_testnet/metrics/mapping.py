"""Which event becomes which metric: the one mapping W&B, TensorBoard and `export-metrics` share.

Every metric comes from `events.jsonl` (docs/events.md), never from anything else, so a live stream
and a replay of a finished run write the same scalars. Names are namespaced and carry units, as
torchtitan's (`loss/train_tier1`, `time/step_wall(s)`, `faults/kills`).

The x axis is optimizer steps completed: a `step_committed` for step s (0-based) is at s + 1, an
`eval` "after `step` steps" at `step`; fault counters are at the steps completed when they happened.
It never goes back, which W&B requires.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.events import Event

FAULT_EVENTS = {Event.FAULT_KILL: "faults/kills", Event.CLIENT_RESTARTED: "faults/restarts",
                Event.CLIENT_LOST: "faults/clients_lost", Event.STEP_DISCARDED: "faults/discarded_steps",
                Event.GENERATION_FAILED: "faults/generations_failed", Event.REPLICA_MISMATCH: "faults/replica_mismatches"}
"""Fault events, counted: each metric is the running count."""
CLIENT_FIELDS = {"loss": "loss", "step_time_s": "step_time(s)", "compute_time_s": "compute_time(s)",
                 "exchange_time_s": "exchange_time(s)", "apply_time_s": "apply_time(s)",
                 "tokens_per_sec": "tokens_per_sec", "rss_mb": "rss(MB)", "bytes_sent": "bytes_sent",
                 "bytes_received": "bytes_received"}
"""`client_step` fields, as `client{id}/<name>`."""


@dataclass(frozen=True)
class Scalar:
    tag: str
    value: float
    step: int
    """Optimizer steps completed (the x axis)."""
    ts: float | None = None
    """UNIX time of the event it came from."""


@dataclass
class MetricState:
    """What the mapping remembers between events: steps completed, fault counts, bytes so far."""

    steps_done: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    bytes_total: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """What the run is (from `launch` and `run_started`): W&B's run config."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _committed(e: dict[str, Any], state: MetricState) -> Iterator[Scalar]:
    state.steps_done = max(state.steps_done, int(e["step"]) + 1)
    x = state.steps_done
    for tier, loss in sorted((e.get("loss_by_tier") or {}).items()):
        if _number(loss) is not None:
            yield Scalar(f"loss/train_tier{tier}", float(loss), x)
    for key, tag in (("tokens_per_sec", "throughput/tokens_per_sec"), ("step_wall_s", "time/step_wall(s)"),
                     ("lr", "train/lr"), ("tokens", "throughput/tokens_per_step")):
        if _number(e.get(key)) is not None:
            yield Scalar(tag, float(e[key]), x)
    if isinstance(e.get("members"), list):
        yield Scalar("run/members", float(len(e["members"])), x)


def _client_step(e: dict[str, Any], state: MetricState) -> Iterator[Scalar]:
    x = max(state.steps_done, int(e["step"]) + 1)
    cid = e.get("client_id")
    for key, name in CLIENT_FIELDS.items():
        value = _number(e.get(key))
        if value is not None:
            yield Scalar(f"client{cid}/{name}", value, x)
            if key.startswith("bytes_"):
                state.bytes_total[key] = state.bytes_total.get(key, 0.0) + value
                yield Scalar(f"network/{key}_total", state.bytes_total[key], x)
    if _number(e.get("grad_norm")) is not None:
        yield Scalar("train/grad_norm", float(e["grad_norm"]), x)


def scalars(e: dict[str, Any], state: MetricState) -> list[Scalar]:
    """The scalars one event gives (often none), updating `state`; each carries the event's time."""
    ts = e.get("ts") if isinstance(e.get("ts"), (int, float)) else None
    return [Scalar(s.tag, s.value, s.step, ts) for s in _scalars(e, state)]


def _scalars(e: dict[str, Any], state: MetricState) -> list[Scalar]:
    kind = e.get("event")
    if kind == Event.STEP_COMMITTED and isinstance(e.get("step"), int):
        return list(_committed(e, state))
    if kind == Event.CLIENT_STEP and isinstance(e.get("step"), int):
        return list(_client_step(e, state))
    if kind == Event.EVAL and _number(e.get("val_loss")) is not None and isinstance(e.get("step"), int):
        return [Scalar(f"loss/val_tier{e.get('tier', 0)}", float(e["val_loss"]), int(e["step"]))]
    if kind in FAULT_EVENTS:
        tag = FAULT_EVENTS[kind]
        state.faults[tag] = state.faults.get(tag, 0) + 1
        return [Scalar(tag, float(state.faults[tag]), state.steps_done)]
    if kind in (Event.LAUNCH, Event.RUN_STARTED):
        state.config.update({k: v for k, v in e.items() if k not in ("ts", "role", "client_id", "step", "event")})
    return []


def all_scalars(events: Iterable[dict[str, Any]]) -> tuple[list[Scalar], MetricState]:
    """Every scalar of a whole event stream (a finished run), in order."""
    state = MetricState()
    out: list[Scalar] = []
    for e in events:
        out.extend(scalars(e, state))
    return out, state

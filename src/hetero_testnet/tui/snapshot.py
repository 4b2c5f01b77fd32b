"""`RunSnapshot`: everything the dashboard shows, folded from the event stream and nothing else.

The dashboard (`tui.py`) and `testnet watch` never ask a process anything: they fold the events of
`logs/<name>/events.jsonl` (see docs/events.md) into one `RunSnapshot`, one event at a time, and render
that. So a live run, a followed run and a recorded file show the same thing, and every warning on screen
is also in the logs. The fold is pure data (no Rich, no clock): `now` is only ever passed in by the view.

Vocabulary: `client_id` is the stable identity that survives restarts; `tier` is the MatFormer tier
(FFN width = full width >> tier); `step` counts committed optimizer steps.

Client states are *approximations*, because the coordinator reports phases per run, not per client:

- `client_joined` -> waiting (connected, not yet in a generation);
- `generation` -> its members are exchanging (group init and state transfer), other live clients waiting;
- `state` RoundTrain and `client_step` -> training (the coordinator cannot tell compute from all-reduce
  inside a round, so "training" covers both);
- `step_discarded` / `generation_failed` -> the generation's live members wait for the next generation;
- `client_lost` / `fault_kill` -> dead; `client_restarted` -> restarting (until it joins again);
- `run_finished` -> live clients are done (a restart the launcher still makes after it only counts).

`client_step` arrives one step late (after the client applied the committed update), so the per-client
columns lag the header's step counter by one step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

FEED_MAX = 200          # event-panel lines kept (the panel shows the newest that fit)
RATE_WINDOW_STEPS = 10  # committed steps averaged for the header's tokens/s

# Event-panel levels, in increasing severity.
INFO, JOIN, WARN, ERROR = "info", "join", "warn", "error"


@dataclass
class ClientRow:
    """One row of the clients table."""

    client_id: int
    tier: int | None = None
    ffn_width: int | None = None
    full_width: int | None = None
    """Full FFN width (tier 0), derived as `ffn_width << tier` (the events do not carry it)."""
    helper_fraction: float | None = None
    helper_neurons: int | None = None
    state: str = "waiting"
    last_loss: float | None = None
    step_time_s: float | None = None
    tokens_per_sec: float | None = None
    rss_mb: float | None = None
    restarts: int = 0
    kills: int = 0
    joins: int = 0
    last_step: int | None = None

    @property
    def width_pct(self) -> float | None:
        if self.ffn_width is None or not self.full_width:
            return None
        return 100.0 * self.ffn_width / self.full_width


@dataclass
class FeedItem:
    """One line of the event panel: when, how bad, what."""

    ts: float
    level: str
    text: str


@dataclass
class RunSnapshot:
    """The whole dashboard state. Build it with `build_snapshot(events)` or `apply_event` one by one."""

    name: str | None = None
    run_id: str | None = None
    state: str = "Launching"
    state_since: float | None = None
    paused: bool = False
    """A pause was requested (`pause` event) and not yet undone; state `Paused` means it is holding."""
    status: str | None = None
    """`run_finished` status (finished, failed, interrupted); None while the run is going."""
    finish_reason: str | None = None
    epoch: int = 0
    generation: int | None = None
    members: list[int] = field(default_factory=list)
    steps_done: int = 0
    total_steps: int | None = None
    start_ts: float | None = None
    last_ts: float | None = None
    finished_ts: float | None = None
    first_commit_origin_ts: float | None = None
    """ts of the first committed step minus its wall time: where the measured stepping began."""
    first_commit_step: int | None = None
    last_commit_ts: float | None = None
    train_wall_s: float = 0.0
    tokens_trained: int = 0
    recent_steps: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW_STEPS))
    clients: dict[int, ClientRow] = field(default_factory=dict)
    loss_by_tier: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """tier -> [(step, mean train loss of that tier's clients)], from `step_committed`."""
    val_loss: dict[int, tuple[int, float]] = field(default_factory=dict)
    """tier -> (step, val loss), the latest `eval` per tier."""
    feed: deque[FeedItem] = field(default_factory=lambda: deque(maxlen=FEED_MAX))
    problems: list[FeedItem] = field(default_factory=list)
    """Every warning and error (not capped), printed again after the dashboard closes."""
    discarded_steps: int = 0
    events_seen: int = 0
    eval_lines: dict[int, tuple[FeedItem, dict[int, float]]] = field(default_factory=dict)
    """step -> (its one feed line, tier -> val loss): the evals of one step share a line."""

    # ------------------------------------------------------------ derived values
    def elapsed_s(self, now: float) -> float:
        """Run time so far; frozen at `run_finished` for a finished run."""
        if self.start_ts is None:
            return 0.0
        end = self.finished_ts if self.finished_ts is not None else now
        return max(0.0, end - self.start_ts)

    def state_age_s(self, now: float) -> float:
        if self.state_since is None:
            return 0.0
        end = self.finished_ts if self.finished_ts is not None else now
        return max(0.0, end - self.state_since)

    def seconds_per_step(self) -> float | None:
        """Mean wall time per committed step since the first commit (includes re-forms and discards)."""
        if self.first_commit_origin_ts is None or self.last_commit_ts is None or self.first_commit_step is None:
            return None
        done = self.steps_done - self.first_commit_step
        if done <= 0:
            return None
        return (self.last_commit_ts - self.first_commit_origin_ts) / done

    def eta_s(self) -> float | None:
        rate = self.seconds_per_step()
        if rate is None or self.total_steps is None:
            return None
        if self.status is not None:
            return 0.0
        return max(0.0, (self.total_steps - self.steps_done) * rate)

    def tokens_per_sec(self) -> float | None:
        """Global training throughput over the last few committed steps (tokens / step wall time)."""
        wall = sum(w for _, w in self.recent_steps)
        if wall <= 0:
            return None
        return sum(t for t, _ in self.recent_steps) / wall

    def efficiency(self, now: float) -> float | None:
        """Share of the wall time spent in committed steps (sum of step_wall_s / elapsed)."""
        elapsed = self.elapsed_s(now)
        if elapsed <= 0 or self.steps_done == 0:
            return None
        return min(1.0, self.train_wall_s / elapsed)

    def latest_loss(self, tier: int) -> float | None:
        points = self.loss_by_tier.get(tier)
        return points[-1][1] if points else None

    def alive_clients(self) -> int:
        return sum(1 for c in self.clients.values() if c.state not in ("dead", "restarting"))

    def status_line(self) -> str:
        """One line for the terminal after the dashboard closes."""
        name = self.name or self.run_id or "run"
        state = self.status or f"stopped in state {self.state}"
        parts = [f"run {name} {state}" + (f": {self.finish_reason}" if self.finish_reason else "")]
        total = self.total_steps if self.total_steps is not None else "?"
        parts.append(f"{self.steps_done}/{total} steps")
        losses = " ".join(f"t{t}={self.latest_loss(t):.4f}" for t in sorted(self.loss_by_tier)
                          if self.latest_loss(t) is not None)
        if losses:
            parts.append(f"train loss {losses}")
        if self.val_loss:
            parts.append("val loss " + " ".join(f"t{t}={v:.4f}" for t, (_, v) in sorted(self.val_loss.items())))
        if self.problems:
            parts.append(f"{len(self.problems)} warning(s)/error(s)")
        return " | ".join(parts)

    # ------------------------------------------------------------ folding
    def client(self, client_id: int) -> ClientRow:
        row = self.clients.get(client_id)
        if row is None:
            row = self.clients[client_id] = ClientRow(client_id)
        return row

    def _say(self, ts: float, level: str, text: str) -> None:
        item = FeedItem(ts, level, text)
        self.feed.append(item)
        if level in (WARN, ERROR):
            self.problems.append(item)

    def _set_members_state(self, ids: Iterable[int], state: str) -> None:
        for cid in ids:
            row = self.clients.get(cid)
            if row is not None and row.state not in ("dead", "restarting"):
                row.state = state


def build_snapshot(events: Iterable[dict[str, Any]], *, name: str | None = None) -> RunSnapshot:
    """Fold a sequence of events (e.g. `read_events(path)`) into a fresh snapshot."""
    snap = RunSnapshot(name=name)
    for event in events:
        apply_event(snap, event)
    return snap


def apply_event(snap: RunSnapshot, e: dict[str, Any]) -> None:
    """Fold one event into `snap`. Unknown events and missing keys are tolerated (older/newer writers)."""
    kind = e.get("event")
    ts = _num(e.get("ts")) or snap.last_ts or 0.0
    cid = e.get("client_id")
    snap.events_seen += 1
    snap.last_ts = ts
    if snap.start_ts is None:
        snap.start_ts = ts
    snap.run_id = e.get("run_id") or snap.run_id
    handler = _HANDLERS.get(kind)
    if handler is not None:
        handler(snap, e, ts, cid)


# ---------------------------------------------------------------- per-event handlers

def _on_launch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    # A new launch in the same directory (a --resume) restarts the clock but keeps the loss history.
    snap.name = e.get("name") or snap.name
    snap.start_ts, snap.finished_ts, snap.status, snap.finish_reason = ts, None, None, None
    snap.state, snap.state_since, snap.paused = "Launching", ts, False
    snap.first_commit_origin_ts = snap.first_commit_step = snap.last_commit_ts = None
    snap.train_wall_s = 0.0
    snap.clients.clear()
    snap.total_steps = e.get("total_steps", snap.total_steps)
    tiers = e.get("tiers") or []
    snap._say(ts, INFO, f"launch: {e.get('num_clients', len(tiers))} clients, tiers "
                        f"{','.join(str(t) for t in tiers)}")


def _on_run_started(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.total_steps = e.get("total_steps", snap.total_steps)
    if e.get("step"):
        snap.steps_done = e["step"]
    resumed = e.get("resumed_from")
    snap._say(ts, INFO, "coordinator started" + (f", resumed from {resumed}" if resumed else ""))


def _on_state(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    new = e.get("new") or snap.state
    snap.state, snap.state_since = new, ts
    snap.epoch = e.get("epoch", snap.epoch)
    if new == "RoundTrain":
        snap._set_members_state(snap.members, "training")


def _on_client_joined(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is None:
        return
    row = snap.client(cid)
    row.tier = e.get("tier", row.tier)
    row.ffn_width = e.get("ffn_width", row.ffn_width)
    if row.tier is not None and row.ffn_width is not None:
        row.full_width = row.ffn_width << row.tier
    row.helper_fraction = e.get("helper_fraction", row.helper_fraction)
    row.state = "waiting"
    row.joins += 1
    again = " again" if row.joins > 1 else ""
    snap._say(ts, JOIN, f"client {cid} joined{again}, tier {row.tier}")


def _on_client_lost(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        snap.client(cid).state = "dead"
    snap._say(ts, WARN, f"client {cid} lost: {e.get('reason', '?')}")


def _on_fault_kill(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        row = snap.client(cid)
        row.state, row.kills = "dead", row.kills + 1
    snap._say(ts, WARN, f"fault: {e.get('signal', 'killed')} client {cid}")


def _on_client_restarted(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        row = snap.client(cid)
        row.restarts += 1
        if snap.status is None:  # the launcher may restart a killed client while the run shuts down
            row.state = "restarting"
    snap._say(ts, INFO, f"client {cid} restarted")


def _on_client_rejected(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap._say(ts, WARN, f"rejected {e.get('peer', '?')}: {e.get('reason', '?')}")


def _on_protocol_error(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap._say(ts, WARN, f"protocol error from {e.get('peer', '?')}: {e.get('reason', '?')}")


def _on_generation(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.generation = e.get("generation", snap.generation)
    snap.members = list(e.get("members") or [])
    for row in snap.clients.values():
        if row.state not in ("dead", "restarting"):
            row.state = "exchanging" if row.client_id in snap.members else "waiting"
    source = e.get("state_source")
    via = f" (state from {source})" if source is not None else ""
    snap._say(ts, INFO, f"generation {snap.generation}: {','.join(map(str, snap.members))}{via}")


def _on_generation_failed(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap._set_members_state(snap.members, "waiting")
    snap._say(ts, WARN, f"generation {e.get('generation', '?')} failed: {e.get('reason', '?')}")


def _on_step_committed(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    step = e.get("step")
    if step is None:
        return
    wall = _num(e.get("step_wall_s")) or 0.0
    snap.steps_done = step + 1
    snap.total_steps = e.get("total_steps", snap.total_steps)
    snap.epoch = e.get("epoch", snap.epoch)
    snap.generation = e.get("generation", snap.generation)
    if e.get("members"):
        snap.members = list(e["members"])
    if snap.first_commit_origin_ts is None:
        snap.first_commit_origin_ts, snap.first_commit_step = ts - wall, step
    snap.last_commit_ts = ts
    snap.train_wall_s += wall
    tokens = int(e.get("tokens") or 0)
    snap.tokens_trained += tokens
    snap.recent_steps.append((tokens, wall))
    for tier, loss in (e.get("loss_by_tier") or {}).items():
        value = _num(loss)
        if value is not None:
            points = snap.loss_by_tier.setdefault(int(tier), [])
            if points and points[-1][0] >= step:  # a resumed run re-commits steps: keep the newest
                while points and points[-1][0] >= step:
                    points.pop()
            points.append((step, value))


def _on_client_step(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is None:
        return
    row = snap.client(cid)
    if row.state not in ("dead", "restarting"):
        row.state = "training"
    row.tier = e.get("tier", row.tier)
    if e.get("ffn_width") is not None:
        row.ffn_width = e["ffn_width"]
        if row.tier is not None:
            row.full_width = row.ffn_width << row.tier
    row.helper_neurons = e.get("helper_neurons", row.helper_neurons)
    row.last_loss = _num(e.get("loss"))
    row.step_time_s = _num(e.get("step_time_s"))
    row.tokens_per_sec = _num(e.get("tokens_per_sec"))
    row.rss_mb = _num(e.get("rss_mb"), row.rss_mb)
    row.last_step = e.get("step")
    if e.get("nan_inf"):
        snap._say(ts, WARN, f"client {cid}: non-finite loss/gradient at step {e.get('step')}")


def _on_step_discarded(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.discarded_steps += 1
    snap._set_members_state(snap.members, "waiting")
    snap._say(ts, WARN, f"step {e.get('step')} discarded: {e.get('reason', '?')}")


def _on_replica_mismatch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    sums = e.get("checksums") or {}
    detail = ", ".join(f"{c}={str(s)[:8]}" for c, s in sorted(sums.items()))
    snap._say(ts, ERROR, f"replicas differ after step {e.get('step')}: {detail}")


def _on_eval(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    tier, loss = e.get("tier"), _num(e.get("val_loss"))
    if tier is None or loss is None:
        return
    step = int(e.get("step") or 0)
    snap.val_loss[int(tier)] = (step, loss)
    line = snap.eval_lines.get(step)
    if line is None or not any(item is line[0] for item in snap.feed):
        snap._say(ts, INFO, "")
        line = snap.eval_lines[step] = (snap.feed[-1], {})
        for old in sorted(snap.eval_lines)[:-4]:  # evals of a step arrive close together
            del snap.eval_lines[old]
    line[1][int(tier)] = loss
    line[0].text = f"val loss @{step}: " + " ".join(f"t{t} {v:.3f}" for t, v in sorted(line[1].items()))


def _on_checkpoint_saved(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap._say(ts, INFO, f"checkpoint at step {e.get('step')}: {e.get('path', '?')}")


def _on_epoch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.epoch = e.get("epoch", snap.epoch)
    snap._say(ts, INFO, f"epoch {snap.epoch}")


def _on_pause(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.paused = e.get("event") == "pause"
    what = "pause requested (holds at the next step boundary)" if snap.paused else "resumed"
    snap._say(ts, INFO, what)


def _on_run_finished(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.status = e.get("status") or "finished"
    snap.finish_reason = e.get("reason")
    snap.finished_ts = ts
    snap.paused = False
    snap.steps_done = e.get("steps_completed", snap.steps_done)
    snap.total_steps = e.get("total_steps", snap.total_steps)
    snap._set_members_state(list(snap.clients), "done")
    level = {"finished": INFO, "interrupted": WARN}.get(snap.status, ERROR)
    snap._say(ts, level, f"run {snap.status}: {snap.finish_reason or ''}".rstrip(": "))
    if e.get("replicas_identical") is False:
        snap._say(ts, ERROR, "replicas were not bit-identical at the end")


_HANDLERS = {
    "launch": _on_launch,
    "run_started": _on_run_started,
    "state": _on_state,
    "client_joined": _on_client_joined,
    "client_lost": _on_client_lost,
    "fault_kill": _on_fault_kill,
    "client_restarted": _on_client_restarted,
    "client_rejected": _on_client_rejected,
    "protocol_error": _on_protocol_error,
    "generation": _on_generation,
    "generation_failed": _on_generation_failed,
    "step_committed": _on_step_committed,
    "client_step": _on_client_step,
    "step_discarded": _on_step_discarded,
    "replica_mismatch": _on_replica_mismatch,
    "eval": _on_eval,
    "checkpoint_saved": _on_checkpoint_saved,
    "epoch": _on_epoch,
    "pause": _on_pause,
    "resume": _on_pause,
    "run_finished": _on_run_finished,
}


def _num(value: Any, default: float | None = None) -> float | None:
    """A finite float, or `default` (JSON may carry null, NaN or a string)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if f == f and f not in (float("inf"), float("-inf")) else default

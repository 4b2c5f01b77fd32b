"""`RunSnapshot`: everything the dashboard shows, and nothing it could not get from the event stream.

The dashboard (live.py, render.py) and `testnet watch` never ask a process anything: fold.py folds the
events of `logs/<name>/events.jsonl` (see docs/events.md) into one `RunSnapshot`, one event at a time,
and render.py draws that. So a live run, a followed run and a recorded file show the same thing, and
every warning on screen is also in the logs. A snapshot is pure data (no Rich, no clock): `now` is
only ever passed in by the view.

Vocabulary: `client_id` is the stable identity that survives restarts; `tier` is the MatFormer tier
(FFN width = full width >> tier); `step` counts committed optimizer steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hetero_testnet.events import RunState

FEED_MAX = 200          # event-panel lines kept (the panel shows the newest that fit)
RATE_WINDOW_STEPS = 10  # committed steps averaged for the header's tokens/s

# Event-panel levels, in increasing severity.
INFO, JOIN, WARN, ERROR = "info", "join", "warn", "error"


class ClientState(StrEnum):
    """A client's row state: an approximation from run-level events (the rules: fold.py)."""

    WAITING = "waiting"
    EXCHANGING = "exchanging"
    TRAINING = "training"
    DEAD = "dead"
    RESTARTING = "restarting"
    DONE = "done"

    @property
    def is_gone(self) -> bool:
        """Dead or restarting: not a live member, so run-level events do not move it."""
        return self in (ClientState.DEAD, ClientState.RESTARTING)


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
    state: ClientState = ClientState.WAITING
    last_loss: float | None = None
    step_time_s: float | None = None
    tokens_per_sec: float | None = None
    rss_mb: float | None = None
    sent_mb_per_step: float | None = None
    """MB this client sent per step in its last committed round (`client_step.bytes_sent / inner_steps`)."""
    restarts: int = 0
    kills: int = 0
    joins: int = 0
    last_step: int | None = None
    busy_s: float = 0.0
    """Its compute over the rounds seen (measured + the emulated hold of its device profile)."""
    round_s: float = 0.0
    """Those rounds' time as it lived them: compute + hold + waiting for the slowest + exchange."""

    @property
    def idle_pct(self) -> float | None:
        """Share of its round time not spent computing (waiting for the slowest, exchanging)."""
        return 100.0 * (1.0 - self.busy_s / self.round_s) if self.round_s > 0 else None

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
    """The whole dashboard state. Build it with `fold.build_snapshot(events)` or `fold.apply_event` one by one."""

    name: str | None = None
    run_id: str | None = None
    state: str = RunState.LAUNCHING
    """A `RunState` value (kept as the event's string, so a newer coordinator's state still shows)."""
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
        return sum(1 for c in self.clients.values() if not c.state.is_gone)

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

    # ------------------------------------------------------------ used by the fold
    def client(self, client_id: int) -> ClientRow:
        row = self.clients.get(client_id)
        if row is None:
            row = self.clients[client_id] = ClientRow(client_id)
        return row

    def say(self, ts: float, level: str, text: str) -> None:
        """Add a feed line; warnings and errors are also kept in `problems`."""
        item = FeedItem(ts, level, text)
        self.feed.append(item)
        if level in (WARN, ERROR):
            self.problems.append(item)

    def set_members_state(self, ids: Iterable[int], state: ClientState) -> None:
        """Move the rows of `ids` that are not gone (dead, restarting) to `state`."""
        for cid in ids:
            row = self.clients.get(cid)
            if row is not None and not row.state.is_gone:
                row.state = state

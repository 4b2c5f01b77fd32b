"""Headless progress: one plain line per committed step, plus warnings, from the event stream.

What `testnet start --headless` (or a stdout that is not a terminal) prints instead of the dashboard.
It folds the same `events.jsonl` records the dashboard does, so the two never disagree.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from hetero_testnet.events import Event
from hetero_testnet.tui.format import fmt_duration

WARNINGS = (Event.CLIENT_LOST, Event.STEP_DISCARDED, Event.FAULT_KILL, Event.CLIENT_RESTARTED,
            Event.REPLICA_MISMATCH, Event.CLIENT_REJECTED, Event.GENERATION)
"""Events printed as `<event> client <id>: <detail>` (a generation only after the first)."""


class HeadlessProgress:
    """Called with every event (the launcher's `on_event`); prints the lines worth a human's eye."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.t0: float | None = None
        self.first_step: int | None = None

    def __call__(self, e: dict[str, Any]) -> None:
        line = self.line(e)
        if line:
            print(line, file=self.stream, flush=True)

    def line(self, e: dict[str, Any]) -> str | None:
        """The line for one event, or None for events not shown."""
        kind = e.get("event")
        if kind == Event.STEP_COMMITTED:
            return self._step_line(e)
        if kind in WARNINGS:
            detail = e.get("reason") or e.get("members") or e.get("pid") or ""
            who = f" client {e['client_id']}" if e.get("client_id") is not None else ""
            return f"{kind}{who}: {detail}" if kind != Event.GENERATION or e.get("generation", 0) > 0 else None
        if kind == Event.EVAL:
            return f"val loss (step {e['step']}, tier {e['tier']}, {e['num_samples']} seqs): {e['val_loss']:.4f}"
        if kind == Event.RUN_FINISHED:
            return f"run {e['status']}: {e['reason']}"
        return None

    def _step_line(self, e: dict[str, Any]) -> str:
        step, total = e["step"] + int(e.get("inner_steps") or 1), e.get("total_steps") or 0  # a diloco round: H
        now = e["ts"]
        if self.t0 is None:
            self.t0, self.first_step = now - e.get("step_wall_s", 0.0), e["step"]
        done = step - self.first_step
        rate = (now - self.t0) / done if done else 0.0
        eta = max(0.0, (total - step) * rate)
        losses = " ".join(f"t{t}={v:.4f}" for t, v in e.get("loss_by_tier", {}).items())
        return (f"step {step}/{total} | train loss {losses} | {e.get('tokens_per_sec', 0):,.0f} tok/s | "
                f"ETA {fmt_duration(eta)}")

"""What each member's capacity costs the run: per-round timings, batch shares and utilisation.

The coordinator hands this ledger what it sees of every round (`Coordinator.train_round`):

    plan      the split's weights (`run/shares.py`); a re-planned split is one `shares` event
    ready     a member's `ComputeDone`: its compute (natural + emulated hold) and when it was ready
    go        the moment `Go` was sent: each member waited `go - ready` for the slowest
    committed the round's `Reduced`: exchange times and tokens; totals and FLOPs advance

Definitions (summary.json, `client_step`, docs/events.md):
- `compute_s`: a member's compute over its committed rounds, measured (what its core did);
  `emulated_s`: the hold its device profile added (`run/throttle.py`); busy = compute + emulated.
- `wait_s`: time between its `ComputeDone` and the round's `Go` (waiting for the slowest member).
- `exchange_s`: its exchange time after `Go` (the link's emulated delay included).
- `idle_share`: 1 - busy / (the wall time of the rounds it was in): waiting and exchanging both count
  as idle compute. `utilisation` (run): sum of busy / sum over rounds of (members x round wall).
- FLOPs: training FLOPs per token of each member's tier (`model/flops.py`, head included) times the
  tokens it trained, summed over committed rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hetero_testnet.config import ModelConfig
from hetero_testnet.events import Event, EventWriter
from hetero_testnet.model.flops import tier_cost
from hetero_testnet.run import protocol as P
from hetero_testnet.run.membership import Member
from hetero_testnet.run.rounds import RoundPlan
from hetero_testnet.run.shares import SharePlanner

log = logging.getLogger("hetero_testnet")


@dataclass
class MemberTimes:
    """One member's totals over its committed rounds (all incarnations)."""

    rounds: int = 0
    compute_s: float = 0.0
    emulated_s: float = 0.0
    wait_s: float = 0.0
    exchange_s: float = 0.0
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        busy = self.compute_s + self.emulated_s
        return {"rounds": self.rounds, "compute_s": round(self.compute_s, 3), "emulated_s": round(self.emulated_s, 3),
                "wait_s": round(self.wait_s, 3), "exchange_s": round(self.exchange_s, 3),
                "idle_share": round(1.0 - busy / self.wall_s, 4) if self.wall_s > 0 else None}


class CapacityLedger:
    """Per-round timings of the members, the batch split, utilisation and FLOPs (module docstring)."""

    def __init__(self, events: EventWriter, model: ModelConfig, shares: SharePlanner,
                 started: float | None = None) -> None:
        self.events = events
        self.started = time.time() if started is None else started
        self.progress: dict[int, dict[str, float]] = {}
        """step (steps completed) -> wall_s since the start, tokens and FLOPs trained by then."""
        self.model = model
        self.shares = shares
        self.times: dict[int, MemberTimes] = {}
        self.flops_trained = 0
        self.client_rounds_wall_s = 0.0
        """Sum over committed rounds of members x round wall (utilisation's denominator)."""
        self._ready: dict[int, tuple[float, float, float]] = {}
        """This round: client id -> (ready after s, compute incl. hold, hold)."""
        self._wait: dict[int, float] = {}
        self._sequences: dict[int, int] = {}
        """This round: client id -> sequences it was given."""
        self._flops_per_token: dict[int, int] = {}

    # ------------------------------------------------------------------ one round
    def weights(self, member_ids: Sequence[int], step: int) -> tuple[dict[int, float] | None, bool]:
        """The split's weights for this round (None: equal shares) and whether it was re-planned now."""
        return self.shares.weights(member_ids, step)

    def start_round(self, plan: RoundPlan, replanned: bool) -> None:
        """The round's plan is out; a re-planned proportional split is one `shares` event with the
        counts and the rates behind them."""
        self._ready, self._wait = {}, {}
        self._sequences = {c: sum(r.count for r in w.all_ranges()) for c, w in plan.work.items()}
        if replanned:
            rates = {str(c): round(self.shares.rates[c], 3) for c in sorted(plan.work) if c in self.shares.rates}
            self.events.emit(Event.SHARES, step=plan.step, mode=self.shares.mode,
                             counts={str(c): w.main.count for c, w in sorted(plan.work.items())}, rates=rates)

    def ready(self, member: Member, message: P.ComputeDone, ready_after_s: float) -> None:
        """A member's `ComputeDone`; its throughput feeds the shares (the hold included: the device it
        emulates is what the split must follow)."""
        self._ready[member.client_id] = (ready_after_s, message.compute_time_s, message.throttle_s)
        self.shares.observe(member.client_id, self._sequences.get(member.client_id, 0), message.compute_time_s)

    def go(self, go_after_s: float) -> None:
        """`Go` was sent `go_after_s` into the round: each member waited since it was ready."""
        self._wait = {c: max(0.0, go_after_s - ready) for c, (ready, _, _) in self._ready.items()}

    def wait_s(self, client_id: int) -> float | None:
        """How long `client_id` waited for the slowest member this round (None before `Go`)."""
        wait = self._wait.get(client_id)
        return None if wait is None else round(wait, 6)

    def committed(self, reduced: Mapping[int, P.Reduced], tiers: Mapping[int, int], round_wall_s: float, *,
                  steps_done: int, tokens_trained: int) -> int:
        """Add a committed round to the totals (the run has `steps_done` steps and `tokens_trained`
        tokens after it); returns the FLOPs it trained."""
        flops = 0
        for c, r in reduced.items():
            t = self.times.setdefault(c, MemberTimes())
            _, compute_incl, hold = self._ready.get(c, (0.0, r.compute_time_s + r.throttle_s, r.throttle_s))
            t.rounds += 1
            t.compute_s += compute_incl - hold
            t.emulated_s += hold
            t.wait_s += self._wait.get(c, 0.0)
            t.exchange_s += r.exchange_time_s
            t.wall_s += round_wall_s
            flops += r.tokens * self.flops_per_token(tiers[c])
        self.client_rounds_wall_s += len(reduced) * round_wall_s
        self.flops_trained += flops
        self.progress[steps_done] = {"wall_s": round(time.time() - self.started, 3), "tokens": tokens_trained,
                                     "flops": self.flops_trained}
        return flops

    def flops_per_token(self, tier: int) -> int:
        if tier not in self._flops_per_token:
            self._flops_per_token[tier] = tier_cost(self.model, tier).train_flops_per_token
        return self._flops_per_token[tier]

    # ------------------------------------------------------------------ the run
    @property
    def utilisation(self) -> float | None:
        busy = sum(t.compute_s + t.emulated_s for t in self.times.values())
        return round(busy / self.client_rounds_wall_s, 4) if self.client_rounds_wall_s > 0 else None

    def member_summary(self, client_id: int) -> dict[str, Any]:
        return self.times.get(client_id, MemberTimes()).to_dict()

    def val_curve(self, evals: Mapping[int, Sequence[Mapping[str, Any]]], key: Callable[[Mapping[str, Any]], str]
                  ) -> list[dict[str, Any]]:
        """Time-to-loss: each validation (step -> results) with the wall time, tokens and FLOPs the
        run had spent by then; `key` names a result's loss (`schedule.val_loss_key`)."""
        curve = []
        for step in sorted(evals):
            at = self.progress.get(step, {"wall_s": None, "tokens": 0, "flops": 0} if step == 0 else None)
            if at is None or not evals[step]:
                continue
            curve.append({"step": step, **at, "val_loss": {key(r): r["val_loss"] for r in evals[step]}})
        return curve

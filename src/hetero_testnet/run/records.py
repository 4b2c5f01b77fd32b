"""What members report after a step, in any run state: checksums, validation results, checkpoints.

These messages (`Applied`, `EvalResult`, `Saved`) arrive whenever a member gets to them, so the
coordinator hands every message to `StepRecords.record` first, whatever it is waiting for. A step's
witness metrics (from its `Reduced`) are parked here until the member reports the step applied;
then they become its `client_step` event, together with the parameter checksum.

Failure semantics: with a shared model (every `--sync` but none) every member must hold the same
parameters after every step (round); two different checksums for one step raise `RunAborted` at
once (the run fails, and the summary says `replicas_identical: false`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from hetero_testnet.config import shares_model
from hetero_testnet.errors import RunAborted
from hetero_testnet.events import Event, EventWriter
from hetero_testnet.run import protocol as P
from hetero_testnet.run.membership import Member
from hetero_testnet.run.startup import checked_phases
from hetero_testnet.run.step_metrics import witness_line, witness_metrics
from hetero_testnet.run.summary import RunTotals

log = logging.getLogger("hetero_testnet")


class StepRecords:
    def __init__(self, events: EventWriter, totals: RunTotals, *, sync: str) -> None:
        self.events = events
        self.totals = totals
        self.sync = sync
        self.applied: defaultdict[int, dict[int, str]] = defaultdict(dict)
        """step -> client id -> parameter checksum after applying it."""
        self.eval_results: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        """step -> validation results (one per member and tier), each with its client id."""
        self.pending_metrics: dict[tuple[int, int], dict[str, Any]] = {}
        """(step, client id) -> `client_step` fields, waiting for the member's `Applied`."""

    def witness(self, member: Member, r: P.Reduced, *, epoch: int, lr: float, wait_s: float | None = None) -> None:
        """A member's `Reduced` for the current step: its `client_reduced` event, the reference's
        witness log line, and its `client_step` fields parked until it reports the step applied
        (`wait_s`: how long it waited at the Ready->Go barrier for the slowest member)."""
        self.events.emit(Event.CLIENT_REDUCED, client_id=member.client_id, step=r.step, log=False, loss=r.loss,
                         compute_time_s=round(r.compute_time_s, 6), exchange_time_s=round(r.exchange_time_s, 6))
        log.info("%s", witness_line(member.client_id, member.tier, r))
        if r.nan_inf:
            member.nan_inf += 1
        self.pending_metrics[(r.step, member.client_id)] = {
            **witness_metrics(r, tier=member.tier, epoch=epoch, lr=lr), "wait_s": wait_s}

    def forget_step(self, step: int) -> None:
        """A discarded step is never applied: drop its parked metrics."""
        for key in [k for k in self.pending_metrics if k[0] == step]:
            del self.pending_metrics[key]

    def rewind(self, step: int) -> None:
        """The run went back to `step` (a recovery): what was recorded for it and later steps is from
        an abandoned lineage; the replayed steps get fresh checksums."""
        for table in (self.applied, self.eval_results):
            for s in [s for s in table if s >= step]:
                del table[s]
        for key in [k for k in self.pending_metrics if k[0] >= step]:
            del self.pending_metrics[key]

    def record(self, member: Member, message: P.Message) -> bool:
        """Record a background message; returns True when it was one. Raises RunAborted when the
        replicas diverged."""
        if isinstance(message, P.Applied):
            self.applied[message.step][member.client_id] = message.checksum
            metrics = self.pending_metrics.pop((message.step, member.client_id), {})
            member.bytes_sent += metrics.get("bytes_sent", 0)
            member.bytes_received += metrics.get("bytes_received", 0)
            self.events.emit(Event.CLIENT_STEP, client_id=member.client_id, step=message.step, log=False,
                             checksum=message.checksum, apply_time_s=message.apply_time_s, **metrics)
            self._verify_replicas(message.step)
            return True
        if isinstance(message, P.EvalResult):
            for result in message.results:
                result = {**result, "client_id": member.client_id}
                self.eval_results[message.step].append(result)
                self.events.emit(Event.EVAL, step=message.step, **result)
            return True
        if isinstance(message, P.Ready):
            rss = message.rss_mb if 0.0 <= message.rss_mb < 2**30 else None
            self.events.emit(Event.CLIENT_READY, client_id=member.client_id, log=False,
                             setup_s=checked_phases(message.setup_s), rss_mb=None if rss is None else round(rss, 1))
            return True
        if isinstance(message, P.Saved):
            self.totals.saved_steps.add(message.step)
            self.events.emit(Event.CHECKPOINT_SAVED, client_id=member.client_id, step=message.step,
                             path=message.path, checksum=message.checksum)
            return True
        return False

    def _verify_replicas(self, step: int) -> None:
        if not shares_model(self.sync):
            return
        sums = self.applied[step]
        if len(set(sums.values())) > 1:
            self.totals.replicas_identical = False
            detail = ", ".join(f"client {c}={s[:12]}" for c, s in sorted(sums.items()))
            self.events.emit(Event.REPLICA_MISMATCH, level=logging.ERROR, step=step, checksums=sums)
            raise RunAborted(f"replicas diverged after step {step}: {detail}")

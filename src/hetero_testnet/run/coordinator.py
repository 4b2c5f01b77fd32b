"""The coordinator: the run's control plane. It never touches a tensor.

It owns the run state machine (the reference's WaitingForMembers -> Warmup -> (RoundTrain ->
RoundWitness)* -> Cooldown -> Finished), generations, the step counter and LR, per-round data
assignment, and the commit of every step. It is event-driven: a round closes as soon as every
member has reported, and the configured times are deadlines for stragglers. Around it: `inbox`
(connections, every wait), `membership` (who is in), `schedule` and `rounds` (pure decisions),
`records` (what members report after a step), `summary` (`RunTotals` -> summary.json), and
`serving` (the process: listening, signals, the end).

Failure semantics (torchft's voted commit):
- A step is applied by every member or by none. A member that disconnects, reports a failed
  collective, or misses the round deadline makes the coordinator send `Discard` to the others;
  the data index does not advance, so the same samples are assigned again. After
  MAX_CONSECUTIVE_DISCARDS discards of one step in a row the run fails.
- A round is Ready->Go (`readygo`): `Go` starts the collectives once every member reported
  `ComputeDone`, each under a short timeout derived from their measured cost.
- After a discard the survivors form a new generation (fresh store prefix); clients abandon a
  formation the moment a newer generation is announced. Below `min_clients`
  the run waits for members up to `waiting_for_members_timeout`, then fails with a reason.
- A client that joins (or rejoins) mid-run enters at the next step boundary: the new generation
  names a member that holds the current state as broadcast source. When no member holds it (all
  holders died at once) the run rewinds to the newest recovery checkpoint (`recovery`) and replays.
- Every member reports a parameter checksum after applying each step (each round under diloco,
  `rounds`); with a shared model (all but `--sync none`) two different ones stop the run at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetero_testnet.config import RunConfig, shares_model
from hetero_testnet.errors import RunAborted
from hetero_testnet.events import Event, EventWriter, RunState
from hetero_testnet.model.optim import step_lr
from hetero_testnet.run import protocol as P
from hetero_testnet.run.capacity import CapacityLedger
from hetero_testnet.run.inbox import Inbox
from hetero_testnet.run.membership import Member, Membership
from hetero_testnet.run.plan import CoordinatorOptions
from hetero_testnet.run.readygo import (FORM_TIMEOUT_S, REPLY_MARGIN_S, ExchangeTimeouts, accept_compute_done,
                                       round_failure)
from hetero_testnet.run.recovery import Recovery, RecoveryPoint
from hetero_testnet.run.records import StepRecords
from hetero_testnet.run.rounds import RoundPlanner
from hetero_testnet.run.shares import SharePlanner
from hetero_testnet.run.schedule import due_after_commit, plan_validation, val_loss_key, validation_tiers
from hetero_testnet.run.step_metrics import loss_by_tier
from hetero_testnet.run.summary import RunTotals
from hetero_testnet.rundir import RunDir

log = logging.getLogger("hetero_testnet")

COOLDOWN_FLOOR_S = 10.0
"""The cooldown waits at least this long (plus a round's deadline) for final checksums, evals and the save."""
MAX_CONSECUTIVE_DISCARDS = 5
"""The run fails when one step is discarded this many times in a row (retries are bounded)."""


class Coordinator:
    """One run's state machine; `run/serving.py` runs it in its process (listening, signals, the end)."""

    def __init__(self, config: RunConfig, options: CoordinatorOptions) -> None:
        self.cfg = config
        self.opts = options
        self.timing = config.timing
        self.files = RunDir(options.run_dir)
        self.min_clients = options.min_clients or self.timing.min_clients
        self.init_min_clients = max(self.min_clients, self.timing.init_min_clients if options.min_clients is None
                                    else options.min_clients)
        self.events = EventWriter(self.files.events, run_id=config.run_id, role="coordinator")
        self.state = RunState.UNINITIALIZED
        self.epoch = 0
        self.epoch_started = time.time()
        self.totals = RunTotals(step=options.start_step, data_index=options.start_data_index,
                                tokens_seen=options.start_data_index * config.model.max_seq_len)
        self.generation_members: list[int] = []
        self.reduced: dict[int, P.Reduced] = {}
        self.records = StepRecords(self.events, self.totals, sync=options.sync)
        self.membership = Membership(token=options.token, config=config, sync=options.sync, events=self.events,
                                     counters=self.totals.counters)
        self.rounds = RoundPlanner.for_run(config, options.sync, start_step=options.start_step)
        self.inbox = Inbox(membership=self.membership, records=self.records, events=self.events, admit=self._admit,
                           on_lost=lambda member, reason: self.membership.mark_lost(member, reason,
                                                                                    step=self.totals.step))
        self.consecutive_discards = 0
        self.exchange_timeouts = ExchangeTimeouts(self.timing.max_round_train_time)
        self.capacity = CapacityLedger(self.events, config.model, SharePlanner(options.shares, options.replan_every),
                                       self.totals.started)
        self.recovery = Recovery(self.files, options.auto_checkpoint_every, RecoveryPoint(
            options.start_step, str(options.resume_checkpoint or "initial"), options.start_data_index,
            self.totals.tokens_seen, 0))
        self.round_plan: Any = None
        self.paused = False
        self.store: Any = None
        self.store_host, self.store_port = "", 0
        """The TCPStore every generation's process group meets at (started by `serving.serve`)."""

    # ------------------------------------------------------------------ plumbing
    def set_state(self, new: RunState) -> None:
        if new == self.state:
            return
        log.info("applying state epoch %d step %d (%s -> %s)", self.epoch, self.totals.step, self.state, new)
        self.events.emit(Event.STATE, step=self.totals.step, log=False, epoch=self.epoch, old=self.state, new=new)
        self.state = new

    def _admit(self, hello: P.Message, writer: asyncio.StreamWriter, peer: Any) -> Member | None:
        # Until a step is committed, every client holds the start state (seed or resumed checkpoint).
        member = self.membership.admit(hello, writer, peer, step=self.totals.step, run_state=self.state,
                                       holds_current_state=self.totals.step == self.opts.start_step,
                                       on_replaced=lambda old: self.membership.mark_lost(
                                           old, "replaced by a new connection with the same client id",
                                           step=self.totals.step))
        if member is None:
            return None
        writer.write(P.encode(P.Welcome(
            run_id=self.cfg.run_id, client_id=member.client_id, config=self.cfg.to_dict(),
            store_host=self.store_host, store_port=self.store_port, backend=self.opts.backend,
            sync=self.opts.sync,
            initial_checkpoint=str(self.opts.resume_checkpoint) if self.opts.resume_checkpoint else None,
            fault=self.opts.fault)))
        return member

    @property
    def members(self) -> dict[int, Member]:
        return self.membership.members

    # ------------------------------------------------------------------ phases
    async def wait_for_members(self) -> None:
        """WaitingForMembers: the first time, every expected client (a launched run) or enough plus the
        extra time; later, `min_clients`. Raises RunAborted after `waiting_for_members_timeout` with too few."""
        self.set_state(RunState.WAITING_FOR_MEMBERS)
        first = self.totals.generation < 0
        await self.inbox.wait_for_members(need=self.init_min_clients if first else self.min_clients,
                                          expected=self.opts.expected_clients if first else 0, first=first,
                                          timeout_s=self.timing.waiting_for_members_timeout,
                                          extra_time_s=self.timing.waiting_for_members_extra_time,
                                          setup_s=self.timing.warmup_time)

    async def form_generation(self) -> None:
        """Warmup: a process group of every live member, retried with the survivors until one forms."""
        self.set_state(RunState.WARMUP)
        step = self.totals.step  # no step is committed while a group forms
        while True:
            members = sorted(self.membership.ready(), key=lambda m: m.client_id)
            if len(members) < self.min_clients:
                await self.wait_for_members()
                continue
            timeout_s = self._announce_generation(members)
            step = self.totals.step  # a rewind moves it
            gathered = await self.inbox.gather(members, self._group_ready,
                                               time.monotonic() + timeout_s + 1.0 + REPLY_MARGIN_S, step=step)
            if gathered.failure:
                self.membership.broken = gathered.failure
            for m in gathered.late:
                self.membership.drop(m, f"did not join generation {self.totals.generation} in time", step=step)
            if self.membership.broken or len(gathered.replies) < len(members):
                self.events.emit(Event.GENERATION_FAILED, level=logging.WARNING, step=step,
                                 generation=self.totals.generation, reason=self.membership.broken or "timeout")
                continue
            sums = {c: r.checksum for c, r in gathered.replies.items()}
            if shares_model(self.opts.sync) and len(set(sums.values())) > 1:
                raise RunAborted(f"replicas differ after forming generation {self.totals.generation}: {sums}")
            for m in members:
                m.state_step = step
            return

    def _announce_generation(self, members: list[Member]) -> float:
        """Start generation g+1: tell each member its rank and who broadcasts the current state (or
        that all load a recovery checkpoint); returns the formation timeout."""
        self.totals.generation += 1
        self.membership.broken = None
        ids = [m.client_id for m in members]
        holders = [rank for rank, m in enumerate(members) if m.state_step == self.totals.step]
        restore = None if holders else self._rewind()
        step = self.totals.step
        source = holders[0] if holders and len(holders) < len(members) else None
        timeout_s = FORM_TIMEOUT_S  # every member is set up (`Ready`): it starts forming at once
        for rank, m in enumerate(members):
            m.in_generation = True
            m.send(P.Generation(generation=self.totals.generation, rank=rank, world_size=len(members), members=ids,
                                step=step, state_source_rank=source, timeout_s=timeout_s, restore=restore))
        self.generation_members = ids
        self.events.emit(Event.GENERATION, step=step, generation=self.totals.generation, members=ids,
                         state_source=ids[source] if source is not None else None, restore=restore,
                         timeout_s=timeout_s)
        return timeout_s

    def _rewind(self) -> str:
        """Nobody holds the current state: go back to the newest recovery point (`recovery`)."""
        point = self.recovery.rewind(self.totals, self.events)
        self.epoch = point.epoch
        self.records.rewind(point.step)
        self.rounds = RoundPlanner.for_run(self.cfg, self.opts.sync, start_step=point.step)
        return point.path

    def _group_ready(self, member: Member, message: Any) -> bool | str:
        if isinstance(message, P.GroupReady) and message.generation == self.totals.generation:
            return True
        if isinstance(message, P.RoundFailed) and message.generation == self.totals.generation:
            return f"client {member.client_id}: {message.reason}"
        return False

    async def train_round(self) -> bool:
        """RoundTrain: one round, Ready->Go (`readygo`). True if committed, False if discarded (the
        caller re-forms the group)."""
        self.set_state(RunState.ROUND_TRAIN)
        step, generation = self.totals.step, self.totals.generation
        members = [self.members[c] for c in self.generation_members]
        batch = self.timing.global_batch_size(self.totals.tokens_seen)
        weights, replanned = self.capacity.weights(self.generation_members, step)
        plan = self.rounds.plan(self.generation_members, step, self.timing.total_steps, batch, self.totals.data_index,
                                weights)
        self.capacity.start_round(plan, replanned)
        self.round_plan, self.reduced = plan, {}
        lr = step_lr(step, self.cfg.lr_schedule)
        deadline_s = self.timing.max_round_train_time * plan.inner_steps  # the config's is per step (diloco: H)
        t0 = time.monotonic()
        for m in members:
            m.send(plan.message(m.client_id, epoch=self.epoch, generation=generation))
        ready = await self.inbox.gather(members, accept_compute_done(self.events, step, generation, t0,
                                                                     self.capacity.ready),
                                        t0 + deadline_s, step=step)
        failure = round_failure(ready, self.membership, step, f"round deadline ({deadline_s:.0f} s)")
        if failure is None:
            go = P.Go(step=step, generation=generation, exchange_timeout_s=self.exchange_timeouts.timeout_s)
            for m in members:
                m.send(go)
            self.capacity.go(time.monotonic() - t0)
            gathered = await self.inbox.gather(members, lambda m, message: self._reduced(m, message, step, lr),
                                               time.monotonic() + self.exchange_timeouts.reply_deadline_s, step=step)
            self.reduced = gathered.replies
            failure = round_failure(gathered, self.membership, step,
                                    f"exchange deadline ({go.exchange_timeout_s:g} s timeout)")
        if failure is None and any(r.grad_norm is None or not math.isfinite(r.grad_norm)
                                   for r in self.reduced.values()):
            self.totals.counters["nan_inf_steps"] += 1
            failure = f"non-finite gradient at step {step}"
        if failure is not None:
            self.discard(failure, time.monotonic() - t0)
            return False
        self.exchange_timeouts.observe(self.reduced)
        self.commit(lr, batch, plan.inner_steps, time.monotonic() - t0)
        return True

    def _reduced(self, member: Member, message: Any, step: int, lr: float) -> bool | str:
        """A member's `Reduced` for this step (recorded as its witness), or its failure."""
        if isinstance(message, P.Reduced) and message.step == step:
            self.records.witness(member, message, epoch=self.epoch, lr=lr, wait_s=self.capacity.wait_s(member.client_id))
            return True
        if isinstance(message, P.RoundFailed) and message.generation == self.totals.generation:
            return f"client {member.client_id} failed step {step}: {message.reason}"
        return False

    def discard(self, reason: str, elapsed: float) -> None:
        """Tell the generation to drop the step; raises RunAborted after too many in a row."""
        step = self.totals.step
        self.totals.counters["discarded_steps"] += 1
        self.consecutive_discards += 1
        self.totals.lost_time_s += elapsed
        self.events.emit(Event.STEP_DISCARDED, level=logging.WARNING, step=step, reason=reason,
                         generation=self.totals.generation)
        for c in self.generation_members:
            m = self.members[c]
            if m.alive:
                m.send(P.Discard(step=step, reason=reason))
                m.in_generation = False
        self.records.forget_step(step)
        if self.consecutive_discards >= MAX_CONSECUTIVE_DISCARDS:
            raise RunAborted(f"step {step} was discarded {MAX_CONSECUTIVE_DISCARDS} times in a row; "
                             f"last reason: {reason}")

    def commit(self, lr: float, batch: int, inner_steps: int, elapsed: float) -> None:
        """RoundWitness: every member applies the round (`inner_steps` steps); step and data index advance."""
        self.set_state(RunState.ROUND_WITNESS)
        self.consecutive_discards = 0
        totals, step = self.totals, self.totals.step
        for c in self.generation_members:
            m = self.members[c]
            m.send(P.Commit(step=step, lr=lr))
            m.state_step = step + inner_steps
            m.steps_trained += inner_steps
            m.last_loss = self.reduced[c].loss
        tokens = sum(r.tokens for r in self.reduced.values())
        totals.tokens_trained += tokens
        totals.tokens_seen += inner_steps * batch * self.cfg.model.max_seq_len
        totals.train_time_s += elapsed
        tiers = {c: self.members[c].tier for c in self.reduced}
        flops = self.capacity.committed(self.reduced, tiers, elapsed, steps_done=step + inner_steps,
                                        tokens_trained=totals.tokens_trained)
        self.events.emit(Event.STEP_COMMITTED, step=step, epoch=self.epoch, generation=totals.generation, lr=lr,
                         loss_by_tier=loss_by_tier(self.reduced, tiers), tokens=tokens, step_wall_s=round(elapsed, 6),
                         tokens_per_sec=round(tokens / elapsed, 1) if elapsed > 0 else 0.0, inner_steps=inner_steps,
                         members=self.generation_members, total_steps=self.timing.total_steps, log=False,
                         sample_start=totals.data_index, sample_count=inner_steps * batch,
                         samples={str(c): [[r.start, r.count] for r in w.all_ranges()]
                                  for c, w in self.round_plan.work.items()},
                         exchange_timeout_s=self.exchange_timeouts.timeout_s, flops=flops,
                         flops_trained=self.capacity.flops_trained, coordinator_cpu_s=round(time.process_time(), 3))
        totals.step += inner_steps
        totals.data_index += inner_steps * batch
        self.rounds.committed(step)

    def request_eval(self) -> int:
        """Ask the current generation to validate; returns how many results to expect."""
        members = [self.members[c] for c in self.generation_members if self.members[c].alive]
        tiers = validation_tiers(self.cfg.model.intermediate_size, self.cfg.data.eval_tiers,
                                 (m.tier for m in self.members.values()))
        plan = plan_validation(members, self.opts.sync, tiers)
        for m, mine in plan:
            m.send(P.Evaluate(step=self.totals.step, tiers=mine))
        return sum(len(mine) for _, mine in plan)

    def request_checkpoint(self, path: Path, *, background: bool = False) -> None:
        """One member saves the current state to `path` (round-robin by step); it is a recovery point."""
        t = self.totals
        source = self.members[self.generation_members[t.step % len(self.generation_members) if background else 0]]
        point = RecoveryPoint(t.step, str(path), t.data_index, t.tokens_seen, self.epoch)
        source.send(P.SaveCheckpoint(step=t.step, path=str(path), meta=point.meta(self.cfg.run_id, self.cfg.seed),
                                     background=background))
        self.recovery.register(point, t.saved_steps)

    async def drain_until(self, predicate: Callable[[], bool], deadline: float) -> None:
        """Process background messages (evals, saves, checksums) until predicate() or the deadline."""
        while not predicate():
            if await self.inbox.next_message(deadline) is None:
                return

    async def cooldown(self) -> None:
        """Cooldown: the last checksums, a final validation and the final checkpoint, within a deadline."""
        self.set_state(RunState.COOLDOWN)
        final_step, last_round = self.totals.step, self.rounds.last_committed
        deadline = (time.monotonic() + max(self.timing.cooldown_time, COOLDOWN_FLOOR_S)
                    + self.timing.max_round_train_time)
        expected_sums = len([c for c in self.generation_members if self.members[c].alive])
        await self.drain_until(lambda: len(self.records.applied[last_round]) >= expected_sums, deadline)
        n = self.request_eval()
        self.request_checkpoint(self.files.checkpoint)
        await self.drain_until(lambda: (len(self.records.eval_results[final_step]) >= n
                                        and final_step in self.totals.saved_steps), deadline)
        for r in self.records.eval_results[final_step]:
            self.totals.val_losses[val_loss_key(r, self.opts.sync)] = r["val_loss"]

    # ------------------------------------------------------------------ the run
    async def run(self) -> tuple[str, str]:
        """Every phase in order, to the end; returns (status, reason). Raises RunAborted on failure."""
        t = self.totals
        self.events.emit(Event.RUN_STARTED, step=t.step, config_source=str(self.cfg.source),
                         name=self.files.name, intermediate_size=self.cfg.model.intermediate_size,
                         total_steps=self.timing.total_steps, sync=self.opts.sync,
                         expected_clients=self.opts.expected_clients, min_clients=self.min_clients,
                         resumed_from=str(self.opts.resume_checkpoint) if self.opts.resume_checkpoint else None)
        await self.wait_for_members()
        while t.step < self.timing.total_steps:
            if not self.generation_members or self.membership.broken or self._membership_changed():
                await self.form_generation()
            committed = await self.train_round()
            if not committed:
                self.generation_members = []
                continue
            self._after_commit()
            if self.paused:
                await self.hold_paused()
        await self.cooldown()
        lost = "" if t.step in t.saved_steps else "; no member was left to validate and save the final model"
        return "finished", f"completed {t.step} of {self.timing.total_steps} steps{lost}"

    async def hold_paused(self) -> None:
        """Wait at a step boundary until resumed (SIGUSR1 toggles), still serving background messages."""
        previous = self.state
        self.set_state(RunState.PAUSED)
        while self.paused:
            await self.inbox.next_message(time.monotonic() + 0.2)
        self.set_state(previous)

    def _membership_changed(self) -> bool:
        ready = sorted(m.client_id for m in self.membership.ready())
        return ready != sorted(self.generation_members)

    def _after_commit(self) -> None:
        step = self.totals.step
        due = due_after_commit(step, self.timing.total_steps, self.cfg.data.eval_every, self.opts.checkpoint_every,
                               previous=self.rounds.last_committed)
        if due.validate:
            self.request_eval()
        if due.checkpoint:
            self.request_checkpoint(self.files.step_checkpoint(step))
        elif self.recovery.due(step) and step < self.timing.total_steps:
            self.request_checkpoint(self.recovery.auto_path(step), background=True)
        if time.time() - self.epoch_started >= self.timing.epoch_time:
            self.epoch += 1
            self.epoch_started = time.time()
            self.events.emit(Event.EPOCH, step=step, epoch=self.epoch)

"""The coordinator: the run's control plane. It never touches a tensor.

It owns the run state machine (the reference's WaitingForMembers -> Warmup -> (RoundTrain ->
RoundWitness)* -> Cooldown -> Finished), membership and generations, the step counter and LR,
per-round data assignment, and the commit of every step. It is event-driven: a round closes as
soon as every member has reported, and the configured times are deadlines for stragglers.

Failure semantics (torchft's voted commit):
- A step is applied by every member or by none. A member that disconnects, reports a failed
  collective, or misses the round deadline makes the coordinator send `Discard` to the others;
  the data index does not advance, so the same samples are assigned again.
- After a discard the survivors form a new generation (fresh store prefix). Below `min_clients`
  the run waits for members up to `waiting_for_members_timeout`, then fails with a reason.
- A client that joins (or rejoins) mid-run enters at the next step boundary: the new generation
  names a member that holds the current state as broadcast source.
- Every member reports a parameter checksum after applying each step; under `--sync allreduce`
  two different checksums stop the run at once (status failed, reason names the step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hetero_testnet.run import protocol as P
from hetero_testnet.run.assignment import assign_samples
from hetero_testnet.config import RunConfig
from hetero_testnet.errors import ConfigError, HeteroTestnetError, ProtocolError, RunAborted
from hetero_testnet.events import EventWriter
from hetero_testnet.run.membership import Member, Membership
from hetero_testnet.model.optim import lr_at
from hetero_testnet.run.schedule import due_after_commit, plan_validation, val_loss_key, validation_tiers
from hetero_testnet.run.summary import build_summary, write_json_atomic
from hetero_testnet.run.step_metrics import loss_by_tier, witness_line, witness_metrics

log = logging.getLogger("hetero_testnet")

PING_INTERVAL_S = 2.0
HANG_TIMEOUT_S = 5.0
"""A member silent this long (no heartbeat) is hung, e.g. SIGSTOPped, and is dropped."""
JOINED = P.Ping(state="joined")
"""Queued (never sent) when a client is admitted, so waits re-check membership at once."""
READY_FILE = "coordinator.json"
SUMMARY_FILE = "summary.json"


@dataclass
class CoordinatorOptions:
    run_dir: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 20000
    expected_clients: int = 0
    """Start as soon as this many clients joined (0 = init_min_clients, plus the extra time)."""
    sync: str = "allreduce"
    backend: str = "gloo"
    min_clients: int | None = None
    checkpoint_every: int = 0
    resume_checkpoint: Path | None = None
    start_step: int = 0
    start_data_index: int = 0
    fault: dict[str, Any] = field(default_factory=dict)
    listen_fd: int | None = None
    """An already listening socket inherited from the launcher (so clients can start at once)."""


class Coordinator:
    def __init__(self, config: RunConfig, options: CoordinatorOptions) -> None:
        self.cfg = config
        self.opts = options
        self.t = config.timing
        self.min_clients = options.min_clients or self.t.min_clients
        self.init_min_clients = max(self.min_clients, self.t.init_min_clients if options.min_clients is None
                                    else options.min_clients)
        self.events = EventWriter(options.run_dir / "events.jsonl", run_id=config.run_id, role="coordinator")
        self.queue: asyncio.Queue[tuple[Member | None, P.Message | None]] = asyncio.Queue()
        self.state = "Uninitialized"
        self.state_since = time.time()
        self.epoch = 0
        self.epoch_started = time.time()
        self.step = options.start_step
        self.data_index = options.start_data_index
        self.tokens_seen = options.start_data_index * config.model.max_seq_len
        self.generation = -1
        self.generation_members: list[int] = []
        self.generation_broken: str | None = None
        self.reduced: dict[int, P.Reduced] = {}
        self.applied: dict[int, dict[int, str]] = defaultdict(dict)
        self.pending_metrics: dict[tuple[int, int], dict[str, Any]] = {}
        self.eval_results: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.saved: dict[int, P.Saved] = {}
        self.val_losses: dict[str, float] = {}
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.membership = Membership(token=options.token, intermediate_size=config.model.intermediate_size,
                                     events=self.events, counters=self.counters)
        self.started = time.time()
        self.train_time_s = 0.0
        self.tokens_trained = 0
        self.replicas_identical = True
        self.lost_time_s = 0.0
        self.consecutive_discards = 0
        self.stop_reason: str | None = None
        self.paused = False

    # ------------------------------------------------------------------ plumbing
    def set_state(self, new: str) -> None:
        if new == self.state:
            return
        log.info("applying state epoch %d step %d (%s -> %s)", self.epoch, self.step, self.state, new)
        self.events.emit("state", step=self.step, log=False, epoch=self.epoch, old=self.state, new=new)
        self.state, self.state_since = new, time.time()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        member: Member | None = None
        try:
            hello = await asyncio.wait_for(P.read_message(reader), timeout=10.0)
            member = self._admit(hello, writer, peer)
            if member is None:
                await writer.drain()
                writer.close()
                return
            while True:
                message = await P.read_message(reader)
                member.last_seen = time.monotonic()
                if not isinstance(message, P.Heartbeat):
                    await self.queue.put((member, message))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError) as e:
            if member is None:
                log.info("connection from %s closed before hello: %s", peer, type(e).__name__)
        except ProtocolError as e:
            self.events.emit("protocol_error", level=logging.WARNING, peer=str(peer), reason=str(e))
        except asyncio.CancelledError:
            return  # the loop is shutting down; the member is reported by the run's end
        finally:
            if member is not None:
                await self.queue.put((member, None))
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a dead transport
                pass

    def _admit(self, hello: P.Message, writer: asyncio.StreamWriter, peer: Any) -> Member | None:
        closed = f"the run is in state {self.state}" if self.state in ("Cooldown", "Finished") else None
        # Until a step is committed, every client holds the start state (seed or resumed checkpoint).
        member = self.membership.admit(hello, writer, peer, step=self.step, closed_reason=closed,
                                       holds_current_state=self.step == self.opts.start_step,
                                       on_replaced=lambda old: self._mark_lost(old, "replaced by a new connection "
                                                                                "with the same client id"))
        if member is None:
            return None
        writer.write(P.encode(P.Welcome(
            run_id=self.cfg.run_id, client_id=member.client_id, config=self.cfg.to_dict(), seed=self.cfg.seed,
            store_host=self.store_host, store_port=self.store_port, backend=self.opts.backend,
            sync=self.opts.sync,
            initial_checkpoint=str(self.opts.resume_checkpoint) if self.opts.resume_checkpoint else None,
            fault=self.opts.fault)))
        self.queue.put_nowait((member, JOINED))
        return member

    def _mark_lost(self, member: Member, reason: str) -> None:
        if self.membership.mark_lost(member, reason, step=self.step):
            self.generation_broken = self.generation_broken or f"client {member.client_id} lost: {reason}"

    def _drop(self, member: Member, reason: str) -> None:
        """Remove a live but unresponsive client; it may rejoin when it wakes up."""
        member.send(P.Dropped(reason=reason))
        self.membership.counters["clients_dropped"] += 1
        self._mark_lost(member, f"dropped: {reason}")

    @property
    def members(self) -> dict[int, Member]:
        return self.membership.members

    def alive_members(self) -> list[Member]:
        return self.membership.alive()

    def _handle_background(self, member: Member, message: P.Message) -> bool:
        """Messages that may arrive in any state. Returns True when handled."""
        if isinstance(message, P.Applied):
            self.applied[message.step][member.client_id] = message.checksum
            metrics = self.pending_metrics.pop((message.step, member.client_id), {})
            self.events.emit("client_step", client_id=member.client_id, step=message.step, log=False,
                             checksum=message.checksum, apply_time_s=message.apply_time_s, **metrics)
            self._verify_replicas(message.step)
            return True
        if isinstance(message, P.EvalResult):
            for r in message.results:
                r = {**r, "client_id": member.client_id}
                self.eval_results[message.step].append(r)
                self.events.emit("eval", step=message.step, **r)
            return True
        if isinstance(message, P.Saved):
            self.saved[message.step] = message
            self.events.emit("checkpoint_saved", client_id=member.client_id, step=message.step,
                             path=message.path, checksum=message.checksum)
            return True
        return False

    def _verify_replicas(self, step: int) -> None:
        if self.opts.sync != "allreduce":
            return
        sums = self.applied[step]
        if len(set(sums.values())) > 1:
            self.replicas_identical = False
            detail = ", ".join(f"client {c}={s[:12]}" for c, s in sorted(sums.items()))
            self.events.emit("replica_mismatch", level=logging.ERROR, step=step, checksums=sums)
            raise RunAborted(f"replicas diverged after step {step}: {detail}")

    async def next_message(self, deadline: float) -> tuple[Member, P.Message] | None:
        """Next message from a live member before `deadline` (monotonic), else None.

        Background messages (checksums, evals, saves) are recorded here and returned too, so every
        wait re-checks its condition after each of them; callers ignore what they do not wait for.
        Disconnects mark the member lost and are not returned.
        """
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            try:
                member, message = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
            if self.stop_reason:
                raise RunAborted(self.stop_reason, status="interrupted")
            if member is None:
                continue
            if message is None:
                if member.alive and self.members.get(member.client_id) is member:
                    self._mark_lost(member, "connection closed")
                continue
            if not member.alive:
                continue
            if message is not JOINED:
                self._handle_background(member, message)
            return member, message

    # ------------------------------------------------------------------ phases
    async def wait_for_members(self) -> None:
        self.set_state("WaitingForMembers")
        first = self.generation < 0
        need = self.init_min_clients if first else self.min_clients
        expected = self.opts.expected_clients if first else 0
        deadline = time.monotonic() + self.t.waiting_for_members_timeout
        enough_since: float | None = None
        while True:
            alive = len(self.alive_members())
            if alive >= max(need, expected) and (expected or not first):
                return
            if alive >= need:
                enough_since = enough_since or time.monotonic()
                if time.monotonic() - enough_since >= self.t.waiting_for_members_extra_time:
                    return
            elif enough_since is not None:
                enough_since = None
            wait_until = min(deadline, (enough_since + self.t.waiting_for_members_extra_time)
                             if enough_since else deadline)
            item = await self.next_message(wait_until)
            if item is None and time.monotonic() >= deadline:
                raise RunAborted(f"only {alive} of the {need} clients needed (min_clients) were connected "
                                 f"after waiting {self.t.waiting_for_members_timeout:.0f} s")

    async def form_generation(self) -> None:
        self.set_state("Warmup")
        while True:
            members = sorted(self.alive_members(), key=lambda m: m.client_id)
            if len(members) < self.min_clients:
                await self.wait_for_members()
                continue
            self.generation += 1
            self.generation_broken = None
            ids = [m.client_id for m in members]
            holders = [r for r, m in enumerate(members) if m.state_step == self.step]
            if not holders:
                raise RunAborted(f"no connected client holds the state of step {self.step}")
            needs_state = len(holders) < len(members)
            source = holders[0] if needs_state else None
            timeout_s = self.t.max_round_train_time
            for rank, m in enumerate(members):
                m.in_generation = True
                m.send(P.Generation(generation=self.generation, rank=rank, world_size=len(members), members=ids,
                                    step=self.step, state_source_rank=source, timeout_s=timeout_s))
            self.generation_members = ids
            self.events.emit("generation", step=self.step, generation=self.generation, members=ids,
                             state_source=ids[source] if source is not None else None)
            ready: dict[int, P.GroupReady] = {}
            deadline = time.monotonic() + self.t.warmup_time + timeout_s
            while len(ready) < len(members) and not self.generation_broken:
                hung = self._hung([m for m in members if m.client_id not in ready])
                if hung:
                    self.generation_broken = self._drop_hung(hung)
                    break
                item = await self.next_message(min(deadline, time.monotonic() + 1.0))
                if item is None and time.monotonic() < deadline:
                    continue
                if item is None:
                    late = [m for m in members if m.client_id not in ready]
                    for m in late:
                        self._drop(m, f"did not join generation {self.generation} in time")
                    break
                member, message = item
                if isinstance(message, P.GroupReady) and message.generation == self.generation:
                    ready[member.client_id] = message
                elif isinstance(message, P.RoundFailed) and message.generation == self.generation:
                    self.generation_broken = f"client {member.client_id}: {message.reason}"
            if self.generation_broken or len(ready) < len(members):
                self.events.emit("generation_failed", level=logging.WARNING, step=self.step,
                                 generation=self.generation,
                                 reason=self.generation_broken or "timeout")
                continue
            sums = {c: r.checksum for c, r in ready.items()}
            if self.opts.sync == "allreduce" and len(set(sums.values())) > 1:
                raise RunAborted(f"replicas differ after forming generation {self.generation}: {sums}")
            for m in members:
                m.state_step = self.step
            return

    def current_batch_size(self) -> int:
        return self.t.global_batch_size(self.tokens_seen)

    async def train_round(self) -> bool:
        """One step. True if committed, False if discarded (the caller re-forms the group)."""
        self.set_state("RoundTrain")
        members = [self.members[c] for c in self.generation_members]
        batch = self.current_batch_size()
        ranges = assign_samples(self.generation_members, batch, self.data_index, seed=self.cfg.seed,
                                step=self.step)
        lr = lr_at(self.step, self.cfg.lr_schedule)
        t0 = time.monotonic()
        for m in members:
            r = ranges[m.client_id]
            m.send(P.Round(step=self.step, epoch=self.epoch, generation=self.generation, lr=lr,
                           sample_start=r.start, sample_count=r.count))
        self.reduced = {}
        deadline = t0 + self.t.max_round_train_time
        failure: str | None = None
        while len(self.reduced) < len(members):
            if self.generation_broken:
                failure = self.generation_broken
                break
            hung = self._hung([m for m in members if m.client_id not in self.reduced])
            if hung:
                failure = self._drop_hung(hung)
                break
            item = await self.next_message(min(deadline, time.monotonic() + 1.0))
            if item is None:
                if time.monotonic() < deadline:
                    continue
                late = [m for m in members if m.client_id not in self.reduced and m.alive]
                failure = f"round deadline ({self.t.max_round_train_time:.0f} s) missed by client(s) " + \
                          ", ".join(str(m.client_id) for m in late)
                for m in late:
                    self._drop(m, f"missed the round deadline at step {self.step}")
                break
            member, message = item
            if isinstance(message, P.Reduced) and message.step == self.step:
                self.reduced[member.client_id] = message
                self.events.emit("client_reduced", client_id=member.client_id, step=self.step, log=False,
                                 loss=message.loss, compute_time_s=round(message.compute_time_s, 6),
                                 exchange_time_s=round(message.exchange_time_s, 6))
                self._log_witness(member, message, lr)
            elif isinstance(message, P.RoundFailed) and message.generation == self.generation:
                failure = f"client {member.client_id} failed step {self.step}: {message.reason}"
                break
        if failure is None:
            if any(r.grad_norm is None or not math.isfinite(r.grad_norm) for r in self.reduced.values()):
                self.counters["nan_inf_steps"] += 1
                failure = f"non-finite gradient at step {self.step}"
        if failure is not None:
            self.discard(failure, time.monotonic() - t0)
            return False
        self.commit(lr, batch, time.monotonic() - t0)
        return True

    def _hung(self, members: list[Member]) -> list[Member]:
        return self.membership.hung(members, HANG_TIMEOUT_S)

    def _drop_hung(self, hung: list[Member]) -> str:
        """Drop silent members; the others may be blocked in a collective with them, not hung."""
        for m in hung:
            self._drop(m, f"no heartbeat for {HANG_TIMEOUT_S:.0f} s at step {self.step}")
        return "client(s) " + ", ".join(str(m.client_id) for m in hung) + " stopped responding"

    def _log_witness(self, member: Member, r: P.Reduced, lr: float) -> None:
        log.info("%s", witness_line(member.client_id, member.tier, r))
        if r.nan_inf:
            member.nan_inf += 1
        self.pending_metrics[(r.step, member.client_id)] = witness_metrics(r, tier=member.tier, epoch=self.epoch,
                                                                           lr=lr)

    def discard(self, reason: str, elapsed: float) -> None:
        self.counters["discarded_steps"] += 1
        self.consecutive_discards += 1
        self.lost_time_s += elapsed
        self.events.emit("step_discarded", level=logging.WARNING, step=self.step, reason=reason,
                         generation=self.generation)
        for c in self.generation_members:
            m = self.members[c]
            if m.alive:
                m.send(P.Discard(step=self.step, reason=reason))
                m.in_generation = False
        for key in [k for k in self.pending_metrics if k[0] == self.step]:
            del self.pending_metrics[key]
        if self.consecutive_discards >= 5:
            raise RunAborted(f"step {self.step} was discarded 5 times in a row; last reason: {reason}")

    def commit(self, lr: float, batch: int, elapsed: float) -> None:
        self.set_state("RoundWitness")
        self.consecutive_discards = 0
        step = self.step
        for c in self.generation_members:
            m = self.members[c]
            m.send(P.Commit(step=step, lr=lr))
            m.state_step = step + 1
            m.steps_trained += 1
            m.last_loss = self.reduced[c].loss
        tokens = sum(r.tokens for r in self.reduced.values())
        self.tokens_trained += tokens
        self.tokens_seen += batch * self.cfg.model.max_seq_len
        self.train_time_s += elapsed
        tiers = {c: self.members[c].tier for c in self.reduced}
        self.events.emit("step_committed", step=step, epoch=self.epoch, generation=self.generation, lr=lr,
                         loss_by_tier=loss_by_tier(self.reduced, tiers), tokens=tokens, step_wall_s=round(elapsed, 6),
                         tokens_per_sec=round(tokens / elapsed, 1) if elapsed > 0 else 0.0,
                         members=self.generation_members, total_steps=self.t.total_steps, log=False)
        self.step += 1
        self.data_index += batch

    def request_eval(self) -> int:
        """Ask the current generation to validate; returns how many results to expect."""
        members = [self.members[c] for c in self.generation_members if self.members[c].alive]
        tiers = validation_tiers(self.cfg.model.intermediate_size, self.cfg.data.eval_tiers,
                                 (m.tier for m in self.members.values()))
        plan = plan_validation(members, self.opts.sync, tiers)
        for m, mine in plan:
            m.send(P.Evaluate(step=self.step, tiers=mine))
        return sum(len(mine) for _, mine in plan)

    def request_checkpoint(self, path: Path) -> None:
        source = self.members[self.generation_members[0]]
        meta = {"step": self.step, "data_index": self.data_index, "epoch": self.epoch,
                "tokens_seen": self.tokens_seen, "run_id": self.cfg.run_id, "seed": self.cfg.seed}
        source.send(P.SaveCheckpoint(step=self.step, path=str(path), meta=meta))

    async def drain_until(self, predicate, deadline: float) -> None:
        """Process background messages (evals, saves, checksums) until predicate() or the deadline."""
        while not predicate():
            if await self.next_message(deadline) is None:
                return

    async def cooldown(self) -> None:
        self.set_state("Cooldown")
        final_step = self.step
        deadline = time.monotonic() + max(self.t.cooldown_time, 10.0) + self.t.max_round_train_time
        expected_sums = len([c for c in self.generation_members if self.members[c].alive])
        await self.drain_until(lambda: len(self.applied[final_step - 1]) >= expected_sums, deadline)
        n = self.request_eval()
        self.request_checkpoint(self.opts.run_dir / "checkpoint")
        await self.drain_until(lambda: len(self.eval_results[final_step]) >= n and final_step in self.saved,
                               deadline)
        for r in self.eval_results[final_step]:
            self.val_losses[val_loss_key(r, self.opts.sync)] = r["val_loss"]

    # ------------------------------------------------------------------ the run
    async def run(self) -> tuple[str, str]:
        """Returns (status, reason)."""
        self.events.emit("run_started", step=self.step, config_source=str(self.cfg.source),
                         name=self.opts.run_dir.name, intermediate_size=self.cfg.model.intermediate_size,
                         total_steps=self.t.total_steps, sync=self.opts.sync,
                         expected_clients=self.opts.expected_clients, min_clients=self.min_clients,
                         resumed_from=str(self.opts.resume_checkpoint) if self.opts.resume_checkpoint else None)
        await self.wait_for_members()
        while self.step < self.t.total_steps:
            if not self.generation_members or self.generation_broken or self._membership_changed():
                await self.form_generation()
            committed = await self.train_round()
            if not committed:
                self.generation_members = []
                continue
            self._after_commit()
            if self.paused:
                await self.hold_paused()
        await self.cooldown()
        return "finished", f"completed {self.step} of {self.t.total_steps} steps"

    async def hold_paused(self) -> None:
        """Wait at a step boundary until resumed (SIGUSR1 toggles), still serving background messages."""
        previous = self.state
        self.set_state("Paused")
        while self.paused:
            await self.next_message(time.monotonic() + 0.2)
        self.set_state(previous)

    def _membership_changed(self) -> bool:
        alive = sorted(m.client_id for m in self.alive_members())
        return alive != sorted(self.generation_members)

    def _after_commit(self) -> None:
        due = due_after_commit(self.step, self.t.total_steps, self.cfg.data.eval_every, self.opts.checkpoint_every)
        if due.validate:
            self.request_eval()
        if due.checkpoint:
            self.request_checkpoint(self.opts.run_dir / "checkpoints" / f"step-{self.step:06d}")
        if time.time() - self.epoch_started >= self.t.epoch_time:
            self.epoch += 1
            self.epoch_started = time.time()
            self.events.emit("epoch", step=self.step, epoch=self.epoch)

    # ------------------------------------------------------------------ lifecycle
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            if self.opts.listen_fd is not None:
                server = await asyncio.start_server(self.handle_connection,
                                                    sock=socket.socket(fileno=self.opts.listen_fd))
            else:
                server = await asyncio.start_server(self.handle_connection, self.opts.host, self.opts.port,
                                                    reuse_address=True)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.opts.host}:{self.opts.port}: {e.strerror or e}",
                              hint="pick another --server-port, or 0 for any free port") from e
        port = server.sockets[0].getsockname()[1]
        self.store_host = self.opts.host if self.opts.host not in ("0.0.0.0", "::") else socket.gethostname()
        self.store = dist.TCPStore(self.opts.host, 0, is_master=True, wait_for_workers=False, use_libuv=True)
        self.store_port = self.store.port
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._toggle_pause)
        write_json_atomic(self.opts.run_dir / READY_FILE, {"host": self.opts.host, "port": port,
                                                            "store_port": self.store_port, "pid": os.getpid()})
        log.info("listening on %s:%d (store port %d)", self.opts.host, port, self.store_port)
        pinger = asyncio.create_task(self._ping_loop())
        status, reason = "failed", "unknown"
        try:
            status, reason = await self.run()
        except RunAborted as e:
            status, reason = e.status, str(e)
        except asyncio.CancelledError:
            status, reason = "interrupted", self.stop_reason or "cancelled"
        except HeteroTestnetError as e:
            status, reason = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a coordinator bug must still end the run cleanly
            log.exception("internal error")
            status, reason = "failed", f"internal coordinator error: {type(e).__name__}: {e}"
        finally:
            pinger.cancel()
            self.set_state("Finished")
            summary = build_summary(self, status, reason)
            write_json_atomic(self.opts.run_dir / SUMMARY_FILE, summary)
            self.events.emit("run_finished", step=self.step, status=status, reason=reason,
                             steps_completed=self.step, total_steps=self.t.total_steps,
                             replicas_identical=summary["replicas_identical"], final_val_loss=self.val_losses,
                             level=logging.INFO if status == "finished" else logging.ERROR)
            for m in self.alive_members():
                m.send(P.Shutdown(reason=reason, status=status))
            await asyncio.sleep(0)
            for m in self.alive_members():
                try:
                    await asyncio.wait_for(m.writer.drain(), 2.0)
                    m.writer.close()
                except Exception:  # noqa: BLE001
                    pass
            server.close()
        return {"finished": 0, "interrupted": 130}.get(status, 1)

    def _request_stop(self, sig: int) -> None:
        self.stop_reason = f"stopped by signal {signal.Signals(sig).name}"
        self.queue.put_nowait((None, None))

    def _toggle_pause(self) -> None:
        self.paused = not self.paused
        self.events.emit("pause" if self.paused else "resume", step=self.step)
        self.queue.put_nowait((None, None))

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            for m in self.alive_members():
                m.send(P.Ping(state=self.state))


def run_coordinator(config: RunConfig, options: CoordinatorOptions) -> int:
    return asyncio.run(Coordinator(config, options).serve())

"""A client process: trains its share of every step at its MatFormer tier and follows orders.

The client holds the full-shape model, its optimizer state and nothing else of the run: the
coordinator decides membership, data, LR and whether each step is applied. Per step:

    Round    -> the `--sync` mode's stepper (`exchange/stepper.py`) trains the assigned samples at this
                tier (one inner step, or H under diloco) and exchanges: under allreduce the exact
                masked average over the group, global norm and clip (`exchange/reducer.py`)
             -> Reduced (metrics, bytes on the wire); the update waits in the stepper
    Commit   -> the stepper applies it (MaskedAdamW under allreduce; elements nobody computed stay
                untouched) -> Applied(checksum)
    Discard  -> nothing was applied (the stepper undoes what its mode needs); wait for the next generation

Under allreduce gradients live in the reducer's flat buffer (`p.grad` are views of it), so the
exchange copies nothing.

Ready->Go: after its compute the client sends `ComputeDone` and waits for `Go` before the first
collective of the round (the gate `GradientExchange.arm_gate` runs); `Go` carries the timeout every
collective of the round runs under. Waits on a forming group or on `Go` keep reading the control
connection, so the coordinator can always redirect the client (`run/client_waits.py`).

Failure semantics: a failed collective is reported as `RoundFailed` and the client waits for a
new `Generation`. A formation is abandoned when the coordinator announces another generation (or
drops the client) or at its timeout (then `RoundFailed`); a `Discard` instead of `Go` drops the
round before any collective. A `Dropped` message (it missed a deadline, e.g. it was stopped) makes it
reconnect and rejoin; its state is refreshed by broadcast. A silent or vanished coordinator
(no message, not even a ping, within `coordinator_timeout_s`) ends the client with exit code 1;
a formation thread stuck past its hard deadline (`client_waits.StuckWatchdog`) ends it with
`EXIT_STUCK` (75, the launcher restarts it). `Generation.restore` makes it load a recovery checkpoint first.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import torch

from hetero_testnet.run import protocol as P
from hetero_testnet.config import RunConfig, parse_run_config
from hetero_testnet.config.devices import DeviceProfile
from hetero_testnet.data.shards import open_split
from hetero_testnet.errors import ConfigError, PeerLostError, RunFailedError
from hetero_testnet.events import format_kv
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.exchange.group import FORM_GRACE_S, GradientExchange
from hetero_testnet.exchange.modes import build_stepper
from hetero_testnet.exchange.stepper import build_round_work
from hetero_testnet.model.checkpoint import load_checkpoint, parameter_checksum, save_checkpoint
from hetero_testnet.model.matformer import ffn_width
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.train import evaluate_tiers
from hetero_testnet.run.client_options import ClientOptions, PendingUpdate
from hetero_testnet.run.client_waits import (BackgroundSaver, RoundCancelled, StuckWatchdog, await_go,
                                             wait_for_formation)
from hetero_testnet.run.connection import Connection
from hetero_testnet.run.startup import StartupClock, rss_mb
from hetero_testnet.run.testhooks import DeathHooks
from hetero_testnet.run.throttle import ComputeThrottle

log = logging.getLogger("hetero_testnet")
HEARTBEAT_INTERVAL_S = 1.0


class Client:
    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.conn: Connection | None = None
        self.client_id: int | None = opts.client_id
        self.exchange: GradientExchange | None = None
        self.pending: PendingUpdate | None = None
        self.applied_step = 0
        self.deferred: P.Message | None = None
        """A message a wait read but did not consume: the main loop handles it next."""
        self.hooks = DeathHooks.from_env()
        self.saver = BackgroundSaver()
        self.throttle = ComputeThrottle(opts.profile)

    # ------------------------------------------------------------------ setup
    def connect(self) -> P.Welcome:
        o = self.opts
        self.conn = Connection.connect(o.coordinator_host, o.coordinator_port, o.connect_timeout_s)
        self.conn.send(P.Hello(token=o.token, client_id=self.client_id, tier=o.tier,
                               helper_fraction=o.helper_fraction, helper_rotation_interval=o.helper_rotation_interval,
                               pid=os.getpid(), host=socket.gethostname(), device=o.device, threads=o.threads,
                               profile=o.profile.to_dict() if o.profile != DeviceProfile() else {}))
        reply = self.conn.recv(o.connect_timeout_s)
        if isinstance(reply, P.Reject):
            raise ConfigError(f"coordinator refused this client: {reply.reason}")
        if not isinstance(reply, P.Welcome):
            raise PeerLostError(f"unexpected first reply {reply.type}")
        return reply

    def setup(self, welcome: P.Welcome, clock: StartupClock | None = None) -> None:
        self.client_id = self.hooks.client_id = welcome.client_id
        self.welcome = welcome
        self.cfg: RunConfig = parse_run_config(welcome.config, base_dir=Path.cwd())
        if self.opts.data_dir is not None:
            self.cfg = self.cfg.with_data_dir(self.opts.data_dir)
        m = self.cfg.model
        self.width = ffn_width(m.intermediate_size, self.opts.tier)
        self.device = torch.device(self.opts.device)
        self.train_data = open_split(self.cfg.data, "train", m.max_seq_len, m.vocab_size, self.cfg.data_order_seed)
        self.val_data = open_split(self.cfg.data, "val", m.max_seq_len, m.vocab_size)
        clock = clock or StartupClock()
        clock.mark("data")
        self.model = build_model(m, self.cfg.seed).to(self.device)
        ckpt = load_checkpoint(Path(welcome.initial_checkpoint)) if welcome.initial_checkpoint else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model_state)
            self.applied_step = int(ckpt.meta.get("step", 0))
        clock.mark("model")
        if self.exchange is None:
            self.exchange = GradientExchange(welcome.store_host, welcome.store_port, welcome.backend,
                                             self.opts.connect_timeout_s)
            self.exchange.phase_hook = self.hooks.at
            self.watchdog = StuckWatchdog(self.exchange.abandoned)
        self.stepper = self._build_stepper()
        if ckpt is not None and ckpt.optimizer_state is not None:
            self.stepper.load_optimizer_state(ckpt.optimizer_state)
        clock.mark("exchange")
        log.info("joined run %s as client %d: tier %d, ffn width %d, %d threads", welcome.run_id,
                 self.client_id, self.opts.tier, self.width, torch.get_num_threads())

    def _build_stepper(self):
        o, w = self.opts, self.welcome
        return build_stepper(w.sync, self.model, self.cfg, self.exchange, self._link(w), tier=o.tier,
                             helper_fraction=o.helper_fraction, rotation_interval=o.helper_rotation_interval)

    def _link(self, welcome: P.Welcome) -> NetworkFaults:
        """The run's network faults (`Welcome.fault`; ProtocolError if malformed) then this client's own link."""
        return NetworkFaults.from_wire(welcome.fault).combined(NetworkFaults.from_profile(self.opts.profile))

    # ------------------------------------------------------------------ the loop
    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(HEARTBEAT_INTERVAL_S):
            if self.exchange is not None:
                self.watchdog.check()
            conn = self.conn
            try:
                if conn is not None:
                    conn.send(P.Heartbeat())
            except PeerLostError:
                pass  # the main loop notices and decides (rejoin or exit)

    def run(self) -> int:
        clock = StartupClock()
        welcome = self.connect()
        clock.mark("connect")
        self._stopping = threading.Event()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            self.setup(welcome, clock)  # building the model can take seconds: heartbeats already flow
            self.conn.send(P.Ready(setup_s=clock.phases(), rss_mb=rss_mb()))  # it can form a group at once
            return self._loop()
        finally:
            self._stopping.set()

    def _loop(self) -> int:
        while True:
            try:
                message, self.deferred = self.deferred or self.conn.recv(self.opts.coordinator_timeout_s), None
                if isinstance(message, P.Shutdown):
                    log.info("shutdown: status=%s reason=%s", message.status, message.reason)
                    self._close()
                    return 0
                if isinstance(message, P.Dropped):
                    log.warning("dropped by the coordinator (%s); rejoining", message.reason)
                    self._rejoin()
                elif not isinstance(message, P.Ping):
                    self.handle(message)
            except PeerLostError as e:
                if self._was_dropped():
                    continue
                log.error("coordinator lost: %s; exiting", e)
                self._close()
                return 1

    def _was_dropped(self) -> bool:
        """After a broken connection: did the coordinator drop us (then rejoin) or vanish?

        A client that was stopped (SIGSTOP) past a deadline finds a `Dropped` message queued before
        the close; it reconnects and rejoins at the next step boundary. Anything else is loss.
        """
        try:
            while True:
                message = self.conn.recv(1.0)
                if isinstance(message, P.Dropped):
                    log.warning("dropped by the coordinator (%s); rejoining", message.reason)
                    self._rejoin()
                    return True
        except PeerLostError:
            return False

    def _rejoin(self) -> None:
        self._close()
        self.welcome = welcome = self.connect()
        self.stepper.sync.faults = self._link(welcome)
        self.conn.send(P.Ready())

    def _close(self) -> None:
        """Leave the process group and the coordinator connection (both safe to repeat)."""
        if self.exchange is not None:
            self.exchange.destroy()
        if self.conn is not None:
            self.conn.close()

    def handle(self, message: P.Message) -> None:
        if isinstance(message, P.Generation):
            self.on_generation(message)
        elif isinstance(message, P.Round):
            self.on_round(message)
        elif isinstance(message, P.Commit):
            self.on_commit(message)
        elif isinstance(message, P.Discard):
            log.warning("step %d discarded: %s", message.step, message.reason)
            self.pending = None
            self.stepper.discard()
        elif isinstance(message, P.Evaluate):
            self.on_evaluate(message)
        elif isinstance(message, P.SaveCheckpoint):
            self.on_save(message)
        else:
            log.warning("ignoring unexpected %s message", message.type)

    def on_generation(self, g: P.Generation) -> None:
        """Form generation g (the state broadcast included) in a thread; abandon it when the
        coordinator moves on (another message arrives) or at its timeout (`RoundFailed`)."""
        if g.restore is not None:
            self.restore(g.restore)
        is_source = g.rank == g.state_source_rank
        flat = self._state_buffer(is_source) if g.state_source_rank is not None else None
        formation = self.exchange.start_forming(g.generation, g.rank, g.world_size, g.timeout_s,
                                                broadcast=None if flat is None else (flat, g.state_source_rank))
        self.deferred = wait_for_formation(self.conn, formation.done, time.monotonic() + g.timeout_s + FORM_GRACE_S)
        if self.deferred is not None or not formation.done.is_set():
            self.exchange.abandon(formation)
            if self.deferred is None:
                self.conn.send(P.RoundFailed(step=g.step, generation=g.generation,
                                             reason=f"forming generation {g.generation} did not end in time"))
            return
        try:
            form_s = self.exchange.adopt(formation)
        except PeerLostError as e:
            self.conn.send(P.RoundFailed(step=g.step, generation=g.generation, reason=str(e)))
            return
        if flat is not None:
            if not is_source:
                self.stepper.load_state(flat, behind=self.applied_step != g.step)
            self.applied_step = g.step
        log.info("generation %d: rank %d of %d, members %s%s (%.3f s)", g.generation, g.rank, g.world_size,
                 g.members, "" if g.state_source_rank is None else f", state from rank {g.state_source_rank}",
                 form_s)
        self.conn.send(P.GroupReady(generation=g.generation, step=g.step,
                                    checksum=self.stepper.shared_checksum()))

    def _state_buffer(self, is_source: bool) -> torch.Tensor:
        """The flat float32 buffer of the stepper's state (parameters and optimizer state under
        allreduce) for the broadcast to joiners: a copy on the source, empty elsewhere."""
        tensors = self.stepper.state_tensors()
        if is_source:
            return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        return torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=self.device)

    def restore(self, source: str) -> None:
        """Load a recovery checkpoint ("initial": the run's starting state) into a fresh stepper."""
        path = self.welcome.initial_checkpoint if source == "initial" else source
        ckpt = load_checkpoint(Path(path)) if path else None
        with torch.no_grad():
            self.model.load_state_dict(ckpt.model_state if ckpt is not None
                                       else build_model(self.cfg.model, self.cfg.seed).state_dict())
        self.stepper = self._build_stepper()
        if ckpt is not None and ckpt.optimizer_state is not None:
            self.stepper.load_optimizer_state(ckpt.optimizer_state)
        self.pending = None
        self.applied_step = int(ckpt.meta.get("step", 0)) if ckpt is not None else 0
        log.info("restored the state of step %d from %s", self.applied_step, path or "the seed")

    def on_round(self, r: P.Round) -> None:
        ranges = [(r.sample_start, r.sample_count)] + [(int(a), int(b)) for a, b in r.extra_ranges]
        work = build_round_work(r.step, ranges, r.inner_steps,
                                lambda start, count: self.train_data.batch(start, count).to(self.device),
                                self.stepper.neurons)
        self.pending = None
        self.round_throttle_s = 0.0  # set by the gate (`_ready`); a round without one was not held
        self.hooks.at("compute")
        t0 = time.perf_counter()
        self.exchange.arm_gate(lambda: self._ready(r, t0))
        try:
            out = self.stepper.run_round(work)
            self.exchange.pass_gate()  # a round without a collective passes the gate too
        except PeerLostError as e:  # nothing was applied; the stepper undid what its mode must undo
            self.exchange.arm_gate(None)
            self.stepper.discard()
            if isinstance(e, RoundCancelled):
                self._cancelled(r, e.message)
                return
            log.warning("step %d: exchange failed: %s", r.step, e)
            self.conn.send(P.RoundFailed(step=r.step, generation=r.generation, reason=str(e)))
            return
        finite_loss = P.sanitize_float(out.loss)
        nan_inf = (out.tokens > 0 and finite_loss is None) or not math.isfinite(out.grad_norm)
        self.pending = PendingUpdate(step=r.step, inner_steps=r.inner_steps)
        log.info(format_kv("client_loss", {"client_id": self.client_id, "epoch": r.epoch, "step": r.step,
                                           "matformer_tier": self.opts.tier, "trained_batches": out.sequences,
                                           "loss": "nan" if finite_loss is None else f"{out.loss:.4f}"}))
        self.conn.send(P.Reduced(step=r.step, generation=r.generation, loss=finite_loss, tokens=out.tokens,
                                 trained_batches=out.sequences, ffn_width=self.width,
                                 helper_neurons=out.helper_neurons, compute_time_s=out.compute_time_s,
                                 exchange_time_s=out.exchange_time_s, grad_norm=P.sanitize_float(out.grad_norm),
                                 nan_inf=nan_inf, rss_mb=rss_mb(),
                                 bytes_sent=out.bytes_sent, bytes_received=out.bytes_received,
                                 inner_steps=r.inner_steps, collective_time_s=self.exchange.collective_time_s,
                                 throttle_s=self.round_throttle_s))

    def _ready(self, r: P.Round, t0: float) -> None:
        """The round's gate: hold the round as a slower device would (`run/throttle.py`), report the
        compute done, wait for `Go`, take its collective timeout."""
        self.round_throttle_s = self.throttle.hold(time.perf_counter() - t0)
        self.conn.send(P.ComputeDone(step=r.step, generation=r.generation, compute_time_s=time.perf_counter() - t0,
                                     throttle_s=self.round_throttle_s))
        go = await_go(self.conn, r.step, self.opts.coordinator_timeout_s)
        self.exchange.op_timeout_s = go.exchange_timeout_s
        self.hooks.at("exchange")

    def _cancelled(self, r: P.Round, message: P.Message) -> None:
        """The coordinator sent `message` instead of `Go`: a Discard of this round is consumed here
        (the stepper already dropped it), anything else is handled by the main loop next."""
        if isinstance(message, P.Discard) and message.step == r.step:
            log.warning("step %d discarded before its exchange: %s", r.step, message.reason)
        else:
            self.deferred = message

    def on_commit(self, c: P.Commit) -> None:
        if self.pending is None or self.pending.step != c.step:
            raise RunFailedError(f"commit for step {c.step} without a reduced gradient")
        t0 = time.perf_counter()
        self.stepper.commit(c.lr)
        self.applied_step = c.step + self.pending.inner_steps
        self.pending = None
        checksum = parameter_checksum(self.model)
        self.conn.send(P.Applied(step=c.step, checksum=checksum, apply_time_s=time.perf_counter() - t0))

    def on_evaluate(self, e: P.Evaluate) -> None:
        results = evaluate_tiers(self.model, self.val_data, self.cfg, list(e.tiers), e.step)
        for r in results:
            r["client_id"] = self.client_id
            log.info(format_kv("val_loss", {"step": e.step, "matformer_tier": r["tier"], "val_loss": r["val_loss"]}))
        self.conn.send(P.EvalResult(step=e.step, results=results))

    def on_save(self, s: P.SaveCheckpoint) -> None:
        if s.background:
            self.saver.save(Path(s.path), self.model, self.stepper.checkpoint_optimizer(), dict(s.meta),
                            lambda checksum: self._send_quietly(P.Saved(step=s.step, path=s.path, checksum=checksum)))
            return
        save_checkpoint(Path(s.path), self.model, self.stepper.checkpoint_optimizer(), dict(s.meta))
        self.conn.send(P.Saved(step=s.step, path=s.path, checksum=parameter_checksum(self.model)))

    def _send_quietly(self, message: P.Message) -> None:
        """Send from a background thread; a lost connection is the main loop's business."""
        try:
            self.conn.send(message)
        except PeerLostError:
            pass


def run_client(opts: ClientOptions) -> int:
    torch.set_num_threads(max(1, opts.threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return Client(opts).run()

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

Failure semantics: a failed collective is reported as `RoundFailed` and the client waits for a
new `Generation`. A `Dropped` message (it missed a deadline, e.g. it was stopped) makes it
reconnect and rejoin; its state is refreshed by broadcast. A silent or vanished coordinator
(no message, not even a ping, within `coordinator_timeout_s`) ends the client with exit code 1.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from hetero_testnet.run import protocol as P
from hetero_testnet.config import RunConfig, parse_run_config
from hetero_testnet.data.shards import open_split
from hetero_testnet.errors import ConfigError, PeerLostError, RunFailedError
from hetero_testnet.events import format_kv
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.exchange.group import GradientExchange
from hetero_testnet.exchange.modes import build_stepper
from hetero_testnet.exchange.stepper import build_round_work
from hetero_testnet.model.checkpoint import load_checkpoint, parameter_checksum, save_checkpoint
from hetero_testnet.model.matformer import build_neuron_set, ffn_width
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.train import evaluate

log = logging.getLogger("hetero_testnet")
HEARTBEAT_INTERVAL_S = 1.0


@dataclass
class ClientOptions:
    coordinator_host: str
    coordinator_port: int
    token: str
    tier: int = 0
    client_id: int | None = None
    helper_fraction: float = 0.0
    helper_rotation_interval: int = 16
    threads: int = 1
    device: str = "cpu"
    data_dir: Path | None = None
    """Override the config's data location (a client on another machine)."""
    coordinator_timeout_s: float = 15.0
    connect_timeout_s: float = 20.0


@dataclass(frozen=True)
class PendingUpdate:
    """A reduced round waiting for the coordinator's Commit (or Discard): the update is in the stepper."""

    step: int
    inner_steps: int = 1
    """Steps the round covers: the state after its commit is that of step `step + inner_steps`."""


class Client:
    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.conn: P.Connection | None = None
        self.client_id: int | None = opts.client_id
        self.exchange: GradientExchange | None = None
        self.pending: PendingUpdate | None = None
        self.applied_step = 0

    # ------------------------------------------------------------------ setup
    def connect(self) -> P.Welcome:
        o = self.opts
        self.conn = P.Connection.connect(o.coordinator_host, o.coordinator_port, o.connect_timeout_s)
        self.conn.send(P.Hello(token=o.token, client_id=self.client_id, tier=o.tier,
                               helper_fraction=o.helper_fraction, helper_rotation_interval=o.helper_rotation_interval,
                               pid=os.getpid(), host=socket.gethostname(), device=o.device, threads=o.threads))
        reply = self.conn.recv(o.connect_timeout_s)
        if isinstance(reply, P.Reject):
            raise ConfigError(f"coordinator refused this client: {reply.reason}")
        if not isinstance(reply, P.Welcome):
            raise PeerLostError(f"unexpected first reply {reply.type}")
        return reply

    def setup(self, welcome: P.Welcome) -> None:
        self.client_id = welcome.client_id
        self.cfg: RunConfig = parse_run_config(welcome.config, base_dir=Path.cwd())
        if self.opts.data_dir is not None:
            self.cfg = self.cfg.with_data_dir(self.opts.data_dir)
        m = self.cfg.model
        self.width = ffn_width(m.intermediate_size, self.opts.tier)
        self.device = torch.device(self.opts.device)
        self.train_data = open_split(self.cfg.data, "train", m.max_seq_len, m.vocab_size)
        self.val_data = open_split(self.cfg.data, "val", m.max_seq_len, m.vocab_size)
        self.model = build_model(m, self.cfg.seed).to(self.device)
        ckpt = load_checkpoint(Path(welcome.initial_checkpoint)) if welcome.initial_checkpoint else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model_state)
            self.applied_step = int(ckpt.meta.get("step", 0))
        if self.exchange is None:
            self.exchange = GradientExchange(welcome.store_host, welcome.store_port, welcome.backend,
                                             self.opts.connect_timeout_s)
        o = self.opts
        self.stepper = build_stepper(welcome.sync, self.model, self.cfg, self.exchange,
                                     NetworkFaults.from_wire(welcome.fault), tier=o.tier,
                                     helper_fraction=o.helper_fraction, rotation_interval=o.helper_rotation_interval)
        if ckpt is not None and ckpt.optimizer_state is not None:
            self.stepper.load_optimizer_state(ckpt.optimizer_state)
        log.info("joined run %s as client %d: tier %d, ffn width %d, %d threads", welcome.run_id,
                 self.client_id, self.opts.tier, self.width, torch.get_num_threads())

    # ------------------------------------------------------------------ the loop
    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(HEARTBEAT_INTERVAL_S):
            conn = self.conn
            try:
                if conn is not None:
                    conn.send(P.Heartbeat())
            except PeerLostError:
                pass  # the main loop notices and decides (rejoin or exit)

    def run(self) -> int:
        welcome = self.connect()
        self._stopping = threading.Event()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            self.setup(welcome)  # building the model can take seconds: heartbeats already flow
            return self._loop()
        finally:
            self._stopping.set()

    def _loop(self) -> int:
        while True:
            try:
                message = self.conn.recv(self.opts.coordinator_timeout_s)
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
        welcome = self.connect()
        self.stepper.sync.faults = NetworkFaults.from_wire(welcome.fault)

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
        try:
            form_s = self.exchange.form(g.generation, g.rank, g.world_size, g.timeout_s)
            if g.state_source_rank is not None:
                self.sync_state(g.state_source_rank, g.rank == g.state_source_rank,
                                behind=self.applied_step != g.step)
                self.applied_step = g.step
        except PeerLostError as e:
            self.conn.send(P.RoundFailed(step=g.step, generation=g.generation, reason=str(e)))
            return
        log.info("generation %d: rank %d of %d, members %s%s (%.3f s)", g.generation, g.rank, g.world_size,
                 g.members, "" if g.state_source_rank is None else f", state from rank {g.state_source_rank}",
                 form_s)
        self.conn.send(P.GroupReady(generation=g.generation, step=g.step,
                                    checksum=self.stepper.shared_checksum()))

    def sync_state(self, src_rank: int, is_source: bool, *, behind: bool) -> None:
        """Broadcast the stepper's state (parameters and optimizer state under allreduce) from
        `src_rank` in one flat buffer; `behind`: this client did not hold the current state."""
        tensors = self.stepper.state_tensors()
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors]) if is_source else \
            torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=self.device)
        self.exchange.broadcast(flat, src_rank)
        if not is_source:
            self.stepper.load_state(flat, behind=behind)

    def on_round(self, r: P.Round) -> None:
        ranges = [(r.sample_start, r.sample_count)] + [(int(a), int(b)) for a, b in r.extra_ranges]
        work = build_round_work(r.step, ranges, r.inner_steps,
                                lambda start, count: self.train_data.batch(start, count).to(self.device),
                                self.stepper.neurons)
        self.pending = None
        try:
            out = self.stepper.run_round(work)
        except PeerLostError as e:  # nothing was applied; the stepper undid what its mode must undo
            self.stepper.discard()
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
                                 nan_inf=nan_inf, rss_mb=psutil.Process().memory_info().rss / 2**20,
                                 bytes_sent=out.bytes_sent, bytes_received=out.bytes_received,
                                 inner_steps=r.inner_steps))

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
        results = []
        m = self.cfg.model
        for tier in e.tiers:
            neurons = build_neuron_set(m, tier, 0.0, 1, self.cfg.seed, e.step)
            t0 = time.perf_counter()
            val = evaluate(self.model, self.val_data, neurons, self.cfg.data.val_samples,
                           batch_size=max(1, min(8, self.cfg.data.val_samples)))
            results.append({"tier": tier, "ffn_width": neurons.prefix_width, "val_loss": val,
                            "num_samples": self.cfg.data.val_samples, "client_id": self.client_id,
                            "eval_time_s": round(time.perf_counter() - t0, 3)})
            log.info(format_kv("val_loss", {"step": e.step, "matformer_tier": tier, "val_loss": val}))
        self.conn.send(P.EvalResult(step=e.step, results=results))

    def on_save(self, s: P.SaveCheckpoint) -> None:
        save_checkpoint(Path(s.path), self.model, self.stepper.checkpoint_optimizer(), dict(s.meta))
        self.conn.send(P.Saved(step=s.step, path=s.path, checksum=parameter_checksum(self.model)))


def run_client(opts: ClientOptions) -> int:
    torch.set_num_threads(max(1, opts.threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return Client(opts).run()

"""Steppers: what one client does with one round, for each `--sync` mode, from the batches to the commit.

A round is what one `Round` message asks: train on the assigned samples, exchange, wait for the
coordinator's vote, then apply (`commit`) or drop (`discard`) the update. The strategy
(`strategies.py`) is only the collective; the stepper owns the rest of a mode's step: the local
optimizer state, what is exchanged, how the update is applied, what a discard must undo, and what a
joiner receives by broadcast. The client process (`run/client.py`) drives a stepper and never
branches on the mode.

- allreduce, none: forward/backward, `MaskedGradientReducer.reduce`; commit = the optimizer step;
  nothing to undo on a discard; a joiner gets the parameters and the optimizer state.
- demo (`demo_stepper.py`): local clip, momentum, encode, all_gather, decode; commit = sign-SGD; a
  discard restores the momentum; a joiner gets the parameters (its momentum starts at zero).
- diloco (`diloco_stepper.py`): H inner steps, the pseudo-gradient all-reduce; commit = the Nesterov
  outer step; a discard keeps the local progress; a joiner gets theta_global and the outer momentum.

Vocabulary: a round has one or more *inner steps* (1 except under diloco), each an `InnerBatch` at
schedule position `step` (its LR is `step_lr(step)`); a `RangeWork` is the inner steps of one
assigned sample range; a `RoundWork` is the main range plus, under a diloco retry, the ranges of
lost members (`extra_ranges`).

Failure contract of `run_round`: it raises `PeerLostError` when a peer is lost during the exchange;
nothing has been applied, and the stepper has already undone what the mode must undo (the caller
reports the round failed). Every stepper leaves the model's parameters bit-identical on every
replica after `commit`, and `shared_checksum` is the checksum replicas compare.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hetero_testnet.config import RunConfig
from hetero_testnet.exchange.aggregation import layout_for_model
from hetero_testnet.exchange.reducer import MaskedGradientReducer
from hetero_testnet.exchange.strategies import SyncStrategy
from hetero_testnet.model.checkpoint import parameter_checksum
from hetero_testnet.model.matformer import NeuronSet, build_neuron_masks, build_neuron_set
from hetero_testnet.model.nanogpt import NanoGPT
from hetero_testnet.model.optim import build_optimizer
from hetero_testnet.model.train import forward_backward


@dataclass(frozen=True)
class InnerBatch:
    step: int
    """Schedule position: the inner step's LR is `step_lr(step)`, its helpers are drawn for `step`."""
    tokens: torch.Tensor | None
    """(B, T+1) int64 samples on the model's device; None when this inner step trains nothing."""
    neurons: NeuronSet


@dataclass(frozen=True)
class RangeWork:
    """The inner steps of one assigned sample range [start, start + count)."""

    start: int
    count: int
    batches: tuple[InnerBatch, ...]


@dataclass(frozen=True)
class RoundWork:
    step: int
    """The round's first step."""
    units: tuple[RangeWork, ...]
    """The main range first, then any extra ranges (diloco retries)."""

    @property
    def batches(self) -> list[InnerBatch]:
        return [b for u in self.units for b in u.batches]


@dataclass(frozen=True)
class RoundResult:
    """What a round did, for `Reduced`: metrics only, the update waits inside the stepper."""

    loss: float
    """Mean train loss over the round's tokens (NaN when it trained nothing)."""
    tokens: int
    sequences: int
    helper_neurons: int
    grad_norm: float
    """allreduce/none: of the averaged gradient; demo: this client's local gradient; diloco: of the
    averaged pseudo-gradient. NaN/inf: the round diverged (also when anything else was not finite)."""
    compute_time_s: float
    exchange_time_s: float
    bytes_sent: int
    bytes_received: int


def split_range(start: int, count: int, parts: int) -> list[tuple[int, int]]:
    """[start, start + count) cut into `parts` contiguous pieces, the first `count % parts` one longer."""
    base, extra = divmod(count, parts)
    pieces, cursor = [], start
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        pieces.append((cursor, n))
        cursor += n
    return pieces


def build_round_work(step: int, ranges: Sequence[tuple[int, int]], inner_steps: int,
                     load: Callable[[int, int], torch.Tensor],
                     neurons: Callable[[int], NeuronSet]) -> RoundWork:
    """The round's inner steps: each range cut into `inner_steps` pieces, piece j at step `step + j`.

    `load(start, count)` returns the samples on the model's device; `neurons(step)` the client's
    neuron set at that step (`Stepper.neurons`).
    """
    units = []
    for start, count in ranges:
        batches = tuple(InnerBatch(step + j, load(s, n) if n > 0 else None, neurons(step + j))
                        for j, (s, n) in enumerate(split_range(start, count, inner_steps)))
        units.append(RangeWork(start, count, batches))
    return RoundWork(step, tuple(units))


class Stepper(ABC):
    """One client's training and exchange for one `--sync` mode (module docstring)."""

    name: ClassVar[str]

    def __init__(self, model: NanoGPT, cfg: RunConfig, sync: SyncStrategy, *, tier: int = 0,
                 helper_fraction: float = 0.0, rotation_interval: int = 16) -> None:
        self.model = model
        self.cfg = cfg
        self.sync = sync
        self.tier, self.helper_fraction, self.rotation_interval = tier, helper_fraction, rotation_interval
        m = cfg.model
        self.layout = layout_for_model(model, m.num_hidden_layers, m.intermediate_size)

    def neurons(self, step: int) -> NeuronSet:
        """The FFN neurons this client computes at `step`: its tier's prefix plus helpers."""
        return build_neuron_set(self.cfg.model, self.tier, self.helper_fraction, self.rotation_interval,
                                self.cfg.seed, step)

    def neuron_masks(self, neurons: NeuronSet) -> torch.Tensor:
        m = self.cfg.model
        return build_neuron_masks(neurons, m.intermediate_size, m.num_hidden_layers)

    @abstractmethod
    def run_round(self, work: RoundWork) -> RoundResult:
        """Train and exchange; the update then waits for `commit` or `discard` (failure contract above)."""

    @abstractmethod
    def commit(self, lr: float) -> None:
        """Apply the pending update (every replica does the same, bit for bit)."""

    def discard(self) -> None:
        """The coordinator dropped the round: forget the pending update (and undo what the mode needs)."""

    @abstractmethod
    def state_tensors(self) -> list[torch.Tensor]:
        """The state a joiner needs, in a fixed order (the broadcast source sends these)."""

    @abstractmethod
    def load_state(self, flat: torch.Tensor, *, behind: bool) -> None:
        """Take the broadcast `state_tensors` (flat float32). `behind`: this client did not hold the
        current state (a joiner); local state the source cannot give it (momentum) starts fresh."""

    def checkpoint_optimizer(self) -> Any:
        """An object whose `state_dict()` goes to `optimizer.safetensors`, or None for no file."""
        return None

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        """Resume from a checkpoint's `optimizer.safetensors`."""

    def shared_checksum(self) -> str:
        """The checksum of the state every replica shares (the parameters, except mid-round in diloco)."""
        return parameter_checksum(self.model)

    # ------------------------------------------------------------------ shared helpers
    def _params(self) -> list[torch.Tensor]:
        return [p.data for _, p in self.model.named_parameters()]

    def _copy_params(self, flat: torch.Tensor, offset: int = 0) -> int:
        """Copy the parameters from `flat` at `offset`; returns the offset after them."""
        with torch.no_grad():
            for _, p in self.model.named_parameters():
                p.data.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        return offset


def forward_into(model: NanoGPT, batch: InnerBatch, micro_batch_size: int,
             reducer: MaskedGradientReducer) -> tuple[float, int]:
    """forward/backward of one inner step into the reducer's buffer; (nan, 0) and a zero buffer when it
    trains nothing."""
    if batch.tokens is None:
        reducer.zero_grad()
        return float("nan"), 0
    return forward_backward(model, batch.tokens, batch.neurons, micro_batch_size)


class AllReduceStepper(Stepper):
    """`allreduce` and `none`: one inner step, the reducer's exact masked average, then the optimizer."""

    name = "allreduce"

    def __init__(self, model: NanoGPT, cfg: RunConfig, sync: SyncStrategy, **client: Any) -> None:
        super().__init__(model, cfg, sync, **client)
        self.optimizer = build_optimizer(list(model.named_parameters()), cfg.optimizer)
        self.reducer = MaskedGradientReducer.for_model(model, self.layout, sync,
                                                       max_grad_norm=cfg.optimizer.clip_grad_norm)
        self.pending: dict[str, torch.Tensor | None] | None = None

    def run_round(self, work: RoundWork) -> RoundResult:
        (batch,) = work.batches  # one inner step per round
        masks = self.neuron_masks(batch.neurons)
        t0 = time.perf_counter()
        loss, tokens = forward_into(self.model, batch, self.cfg.micro_batch_size, self.reducer)
        t1 = time.perf_counter()
        self.pending = None
        reduced = self.reducer.reduce(masks, tokens)  # PeerLostError: the buffer is garbage, nothing pending
        self.pending = reduced.update_masks
        count = 0 if batch.tokens is None else int(batch.tokens.shape[0])
        return RoundResult(loss=loss, tokens=tokens, sequences=count, helper_neurons=batch.neurons.num_helpers,
                           grad_norm=reduced.grad_norm, compute_time_s=t1 - t0,
                           exchange_time_s=reduced.exchange_time_s, bytes_sent=reduced.bytes_sent,
                           bytes_received=reduced.bytes_received)

    def commit(self, lr: float) -> None:
        if self.pending is None:
            raise RuntimeError("commit without a reduced gradient")
        self.optimizer.step(lr, self.pending)
        self.pending = None

    def discard(self) -> None:
        self.pending = None

    def state_tensors(self) -> list[torch.Tensor]:
        opt = self.optimizer.state_dict()
        return self._params() + [opt[k] for k in sorted(opt)]

    def load_state(self, flat: torch.Tensor, *, behind: bool) -> None:
        offset = self._copy_params(flat)
        opt = self.optimizer.state_dict()
        new_opt = {}
        for k in sorted(opt):
            t = opt[k]
            new_opt[k] = flat[offset: offset + t.numel()].view_as(t).to(t.dtype).clone()
            offset += t.numel()
        self.optimizer.load_state_dict(new_opt)

    def checkpoint_optimizer(self) -> Any:
        return self.optimizer

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(flat)

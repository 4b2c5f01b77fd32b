"""`--sync diloco`: DiLoCo (Douillard et al., arXiv:2311.08105) with OpenDiLoCo's outer optimizer,
exact across tiers.

One round of one client (`inner_steps` = H):

    H inner steps            forward/backward at its tier, local clip, `optimizer` (AdamW or SGD) at
                             step_lr(step + j), only its neurons; no exchange
    pseudo-gradient          delta = theta_global - theta_local (exactly 0 where it trained nothing)
    exchange                 `MaskedGradientReducer.reduce`: T * delta plus counts, one all-reduce,
                             the exact masked average (T = its tokens over the round, the counts of a
                             neuron = T if it computed that neuron in any inner step)
    commit                   masked Nesterov outer step on theta_global (torch's SGD(nesterov=True),
                             dampening 0): m = mu m + g; theta -= outer_lr (g + mu m); the
                             parameters become theta_global, bit-identical on every replica

Outer step and state: theta_global and the outer momentum are the shared state (broadcast to a
joiner, compared by checksum after every round); the inner optimizer state is each client's own,
kept across rounds (OpenDiLoCo), fresh for a joiner. Elements no client computed in the round keep
theta and momentum bit-identical.

Failure: a round that fails in the exchange or is discarded keeps its local progress (the
parameters stay theta_local). When the coordinator repeats the round with the same main range
(it does so for survivors, `run/rounds.py`), only the ranges not yet trained are trained (the lost
members' `extra_ranges`) and the exchange is redone. Any other repeat (another range, or a round
that was not finite) starts again from theta_global, with the inner optimizer state the round
started with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hetero_testnet.config import RunConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.exchange.reducer import MaskedGradientReducer
from hetero_testnet.exchange.stepper import InnerBatch, RoundResult, RoundWork, Stepper, forward_into
from hetero_testnet.exchange.strategies import DiLoCoSync, SingleProcess
from hetero_testnet.model.checkpoint import tensors_checksum
from hetero_testnet.model.nanogpt import NanoGPT
from hetero_testnet.model.optim import build_optimizer, step_lr

MOMENTUM_KEY = "outer_momentum"
"""Checkpoint key suffix of the outer momentum: `<param>.outer_momentum`."""


@dataclass
class _Progress:
    """The current round's local progress; while it exists the parameters hold theta_local."""

    step: int
    masks: torch.Tensor
    """(L, I) bool: every neuron computed in any inner step of the round."""
    trained: set[tuple[int, int]] = field(default_factory=set)
    """(start, count) of the sample ranges already trained."""
    tokens: int = 0
    loss_sum: float = 0.0
    sequences: int = 0
    helpers: int = 0
    finite: bool = True


class _OuterState:
    """What a checkpoint keeps of diloco: the outer momentum (theta_global is the model itself)."""

    def __init__(self, momentum: dict[str, torch.Tensor]) -> None:
        self.momentum = momentum

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{MOMENTUM_KEY}": m for name, m in self.momentum.items()}


class DiLoCoStepper(Stepper):
    """`diloco`: H local steps, one exact masked average of the pseudo-gradients, Nesterov (module docstring)."""

    name = "diloco"

    def __init__(self, model: NanoGPT, cfg: RunConfig, sync: DiLoCoSync, **client: Any) -> None:
        super().__init__(model, cfg, sync, **client)
        self.settings = cfg.sync.diloco
        self.inner = build_optimizer(list(model.named_parameters()), cfg.optimizer)
        self.outer = MaskedGradientReducer.for_model(model, self.layout, sync, max_grad_norm=0.0)
        self.local = MaskedGradientReducer(self.layout, SingleProcess(), max_grad_norm=cfg.optimizer.clip_grad_norm,
                                           buffer=self.outer.buffer)
        sync.configure(grad_numel=self.layout.grad_numel, bf16=self.settings.bf16)
        self.deltas = self.outer.grad_views()
        self.theta = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.momentum = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        self.progress: _Progress | None = None
        self.inner_at_start: dict[str, torch.Tensor] = {}
        """The inner optimizer state when the current round started (restored if it starts again)."""
        self.pending: dict[str, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ the round
    def run_round(self, work: RoundWork) -> RoundResult:
        t0 = time.perf_counter()
        progress = self._prepare(work)
        for unit in work.units:
            if (unit.start, unit.count) in progress.trained:
                continue  # kept from a failed attempt of this round: only the exchange is redone
            for batch in unit.batches:
                self._inner_step(batch, progress)
            progress.trained.add((unit.start, unit.count))
        t1 = time.perf_counter()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.deltas[name].copy_(self.theta[name]).sub_(p.data)  # theta_global - theta_local
        self.pending = None
        reduced = self.outer.reduce(progress.masks, progress.tokens)  # PeerLostError: progress is kept
        self.pending = reduced.update_masks
        return RoundResult(loss=progress.loss_sum / progress.tokens if progress.tokens else float("nan"),
                           tokens=progress.tokens, sequences=progress.sequences, helper_neurons=progress.helpers,
                           grad_norm=reduced.grad_norm if progress.finite else float("nan"),
                           compute_time_s=t1 - t0, exchange_time_s=reduced.exchange_time_s,
                           bytes_sent=reduced.bytes_sent, bytes_received=reduced.bytes_received)

    def _prepare(self, work: RoundWork) -> _Progress:
        """The kept progress of this round if it is still good for `work`, else a fresh start from theta."""
        p = self.progress
        ranges = {(u.start, u.count) for u in work.units}
        if p is not None and p.step == work.step and p.finite and p.trained <= ranges:
            return p
        if p is not None and p.step == work.step:
            self.inner.load_state_dict(self.inner_at_start)  # the round starts again as it first did
        else:
            self.inner_at_start = {k: v.clone() for k, v in self.inner.state_dict().items()}
        self._reset_to_theta()
        m = self.cfg.model
        self.progress = _Progress(step=work.step,
                                  masks=torch.zeros(m.num_hidden_layers, m.intermediate_size, dtype=torch.bool))
        return self.progress

    def _inner_step(self, batch: InnerBatch, progress: _Progress) -> None:
        """One local step: forward/backward, local clip, the inner optimizer on this step's neurons."""
        if batch.tokens is None:
            return
        masks = self.neuron_masks(batch.neurons)
        loss, tokens = forward_into(self.model, batch, self.cfg.micro_batch_size, self.local)
        local = self.local.reduce(masks, tokens)
        if not (math.isfinite(loss) and math.isfinite(local.grad_norm)):
            progress.finite = False  # reported as diverged; never applied (the coordinator discards)
            return
        self.inner.step(step_lr(batch.step, self.cfg.lr_schedule), local.update_masks)
        progress.masks |= masks
        progress.tokens += tokens
        progress.loss_sum += loss * tokens
        progress.sequences += int(batch.tokens.shape[0])
        progress.helpers = max(progress.helpers, batch.neurons.num_helpers)

    @torch.no_grad()
    def commit(self, lr: float) -> None:
        """The masked Nesterov outer step; `lr` (the inner schedule's) is not used: outer_lr is constant."""
        if self.pending is None:
            raise RuntimeError("commit without a reduced pseudo-gradient")
        mu, outer_lr = self.settings.outer_momentum, self.settings.outer_lr
        for name, p in self.model.named_parameters():
            g, mask = self.deltas[name], self.pending[name]
            theta, m = self.theta[name], self.momentum[name]
            new_m = torch.mul(m, mu).add_(g)
            new_theta = torch.sub(theta, torch.mul(new_m, mu).add_(g).mul_(outer_lr))
            if mask is None:
                theta.copy_(new_theta)
                m.copy_(new_m)
            else:
                theta.copy_(torch.where(mask, new_theta, theta))
                m.copy_(torch.where(mask, new_m, m))
            p.data.copy_(theta)
        self.pending = None
        self.progress = None

    def discard(self) -> None:
        """Drop the pending outer step; the local progress stays for a repeat of the round."""
        self.pending = None

    def _reset_to_theta(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.data.copy_(self.theta[name])
        self.progress = None

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> list[torch.Tensor]:
        return list(self.theta.values()) + list(self.momentum.values())

    def load_state(self, flat: torch.Tensor, *, behind: bool) -> None:
        offset = 0
        for t in self.state_tensors():
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        self.pending = None
        if behind:  # a joiner: theta_global, the outer momentum, and a fresh inner optimizer
            self.inner = build_optimizer(list(self.model.named_parameters()), self.cfg.optimizer)
            self._reset_to_theta()
        elif self.progress is None:
            self._reset_to_theta()

    def checkpoint_optimizer(self) -> Any:
        return _OuterState(self.momentum)

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        for key, t in flat.items():
            name, _, kind = key.rpartition(".")
            if kind != MOMENTUM_KEY or name not in self.momentum or t.shape != self.momentum[name].shape:
                raise ConfigError(f"checkpoint optimizer state has {key!r} {tuple(t.shape)}, which is not a "
                                  f"diloco outer momentum (was it saved under another --sync?)")
            self.momentum[name].copy_(t)

    def shared_checksum(self) -> str:
        """theta_global's checksum: mid-round the parameters are this client's own theta_local."""
        return tensors_checksum(self.theta.items())

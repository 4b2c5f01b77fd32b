"""`--sync demo`: DeMo (Peng et al., arXiv:2411.19870) as Psyche's DisTrO runs it, exact across tiers.

One round of one client (the tensor math is `demo_codec.py`, the payload layout `demo_layout.py`):

    forward/backward         gradient of the client's mean loss, only its neurons   `model/train.py`
    local clip               by the client's own gradient norm (Psyche clips before `generate`)
    momentum                 delta = decay * delta + lr * g  (local, never sent)     `apply_momentum`
    encode                   DCT, top-k in owned blocks, delta -= what was taken     `encode`
    all_gather               one gloo collective of the flat uint8 payloads          `DemoSync`
    decode                   per coefficient, the token-weighted mean over the senders that own the
                             block and picked it; exact IDCT; sign                   `decode`
    commit(lr)               p *= 1 - lr * wd (matrices), p -= lr * sign, only where a sender owned
                             the block: a block nobody owns is left bit-identical, decay included

Decisions:
- Weighting: senders are weighted by their tokens (`decode(token_weighted=True)`), so that with k =
  every coefficient and unquantized values the decoded momentum is exactly the masked,
  token-weighted average that `--sync allreduce` uses (DeMo and Psyche weight senders equally; the
  testnet's shares are equal up to one sequence, so the difference is small).
- Bit-identity: every replica decodes every payload itself, in rank order, with the codec's fixed
  summation order and integer-exact IDCT (see `demo_codec.py`). A sharded decode whose results are
  all-gathered would add P/8 bytes of signs per step to the wire (4.3 MB on the 20M model, 16x the
  k=8 1-bit payload), so the bytes the mode exists to save are not spent on it.
- A discarded round leaves the momentum as it was before the round (a copy is kept until the
  commit), so the repeated round is exact.
- Momentum is local and is not in the state broadcast or in checkpoints: a joiner (or a client
  that fell behind and is refreshed by broadcast) starts from zero, as a new Psyche client does.
  Another client's momentum would be wrong for it: it holds that client's unsent residual, which
  its owner still sends.
- Helpers are drawn in whole neuron blocks (`sample_block_helpers`), and every tier's FFN width must
  be a whole number of blocks (`check_demo_tiers`, run at plan time and at admission).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from hetero_testnet.config import DemoSyncConfig, RunConfig
from hetero_testnet.errors import PeerLostError
from hetero_testnet.exchange.demo_codec import DecodedStep, apply_momentum, decode, encode, init_momentum
from hetero_testnet.exchange.demo_layout import (DemoConfig, build_demo_layout, check_tier_alignment,
                                                 sample_block_helpers)
from hetero_testnet.exchange.reducer import MaskedGradientReducer
from hetero_testnet.exchange.stepper import RoundResult, RoundWork, Stepper, forward_into
from hetero_testnet.exchange.strategies import DemoSync, SingleProcess
from hetero_testnet.model.matformer import NeuronSet, ffn_width
from hetero_testnet.model.nanogpt import NanoGPT
from hetero_testnet.model.optim import step_lr


def demo_config(settings: DemoSyncConfig) -> DemoConfig:
    """The codec's config from the run config's `sync.demo`."""
    return DemoConfig(topk=settings.topk, chunk=settings.chunk, decay=settings.decay,
                      quantize_1bit=settings.quantize_1bit, value_dtype=settings.values)


def check_demo_tiers(cfg: RunConfig, tiers: Iterable[int]) -> None:
    """`ConfigError` (one line) unless every tier's FFN width is a whole number of DeMo neuron blocks."""
    settings = demo_config(cfg.sync.demo)
    for tier in sorted(set(tiers)):
        check_tier_alignment(settings, cfg.model.intermediate_size, [tier])


class DemoStepper(Stepper):
    """`demo`: local momentum, one all_gather of DeMo payloads, sign-SGD (module docstring)."""

    name = "demo"

    def __init__(self, model: NanoGPT, cfg: RunConfig, sync: DemoSync, **client: Any) -> None:
        super().__init__(model, cfg, sync, **client)
        self.sync: DemoSync = sync
        self.settings = cfg.sync.demo
        codec = demo_config(self.settings)
        check_tier_alignment(codec, cfg.model.intermediate_size, [self.tier])
        self.demo = build_demo_layout(self.layout, codec)
        self.local = MaskedGradientReducer.for_model(model, self.layout, SingleProcess(),
                                                     max_grad_norm=cfg.optimizer.clip_grad_norm)
        self.grads = self.local.grad_views()
        self.delta = init_momentum(self.demo)
        self.saved: dict[str, torch.Tensor] | None = None
        """The momentum before the pending round; restored by `discard`."""
        self.pending: DecodedStep | None = None

    def neurons(self, step: int) -> NeuronSet:
        """The tier's prefix plus helpers in whole neuron blocks."""
        m = self.cfg.model
        width = ffn_width(m.intermediate_size, self.tier)
        helpers = sample_block_helpers(m.intermediate_size, width, self.helper_fraction, self.demo.neuron_block,
                                       seed=self.cfg.seed, step=step, rotation_interval=self.rotation_interval,
                                       num_layers=m.num_hidden_layers)
        if all(h.numel() == 0 for h in helpers):
            return NeuronSet(prefix_width=width)
        return NeuronSet(prefix_width=width, helpers=helpers)

    def run_round(self, work: RoundWork) -> RoundResult:
        (batch,) = work.batches  # one inner step per round
        masks = self.neuron_masks(batch.neurons)
        t0 = time.perf_counter()
        loss, tokens = forward_into(self.model, batch, self.cfg.micro_batch_size, self.local)
        local = self.local.reduce(masks, tokens)  # local norm and clip; the buffer is every p.grad
        ok = math.isfinite(local.grad_norm) and (tokens == 0 or math.isfinite(loss))
        self.discard()
        self.saved = {name: d.clone() for name, d in self.delta.items()}
        if ok and tokens > 0:
            apply_momentum(self.delta, self.grads, step_lr(batch.step, self.cfg.lr_schedule), self.settings.decay)
        # A diverged client still takes part in the collective (its peers wait in it), owning nothing.
        encoded = encode(self.delta, self.demo, masks, tokens if ok else 0)
        t1 = time.perf_counter()
        try:
            payloads, _ = self.sync.all_gather(encoded.payload)
        except PeerLostError:
            self.discard()
            raise
        decoded = decode(payloads, self.demo, apply=self.settings.apply, token_weighted=True)
        ok = ok and all(bool(torch.isfinite(u).all()) for u in decoded.updates.values())
        self.pending = decoded
        moved = self.sync.payload_bytes_sent(encoded.payload)
        sequences = 0 if batch.tokens is None else int(batch.tokens.shape[0])
        return RoundResult(loss=loss, tokens=tokens, sequences=sequences, helper_neurons=batch.neurons.num_helpers,
                           grad_norm=local.grad_norm if ok else float("nan"), compute_time_s=t1 - t0,
                           exchange_time_s=time.perf_counter() - t1, bytes_sent=moved, bytes_received=moved)

    @torch.no_grad()
    def commit(self, lr: float) -> None:
        if self.pending is None:
            raise RuntimeError("commit without a decoded step")
        wd = self.cfg.optimizer.weight_decay
        for name, p in self.model.named_parameters():
            mask = self.pending.update_masks[name]
            update = self.pending.updates[name]
            new = p.data if mask is None else p.data.clone()
            if p.dim() >= 2 and wd:
                new.mul_(1.0 - lr * wd)  # decoupled weight decay, matrices only (as MaskedAdamW)
            new.sub_(torch.mul(update, lr) if self.settings.apply == "sign" else update)
            if mask is not None:
                p.data.copy_(torch.where(mask, new, p.data))
        self.pending = None
        self.saved = None

    def discard(self) -> None:
        """Drop the pending step and put the momentum back as it was before the round."""
        if self.saved is not None:
            for name, d in self.delta.items():
                d.copy_(self.saved[name])
        self.saved = None
        self.pending = None

    def state_tensors(self) -> list[torch.Tensor]:
        return self._params()

    def load_state(self, flat: torch.Tensor, *, behind: bool) -> None:
        self._copy_params(flat)
        if behind:  # a joiner's momentum starts at zero (module docstring)
            self.saved = self.pending = None
            for d in self.delta.values():
                d.zero_()

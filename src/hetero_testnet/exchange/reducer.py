"""MaskedGradientReducer: a step's whole gradient reduction, from backward's buffer to AdamW's input.

The reducer owns the flat float32 exchange buffer (`aggregation.BufferLayout`) and installs views
of it as every `p.grad`, so backward accumulates straight into the buffer, the collective sums it
in place and `MaskedAdamW` reads the result: one buffer, no copies. `reduce` then does, in order:

    contribution   T * grad, plus the token counts (total and per FFN neuron)  `pack_contribution`
    collective     one SUM over the group (the strategy; injected faults)      `SyncStrategy.exchange_buffer`
    average        exact masked, token-weighted average in place; update masks `apply_average`
    norm           sharded float64 sum of squares, partials all-reduced        `shard_bounds`, `sum_of_squares`
    clip           buffer *= clip coefficient when it is below 1              `optim.clip_coefficient`

Both the distributed client (`run/client.py`) and the one-process baseline (`testnet train`,
`model/train.py`) run this code; they differ only in the strategy (`exchange/strategies.py`).
At world size 1 (`SingleProcess`) the contribution and average steps are skipped: with one
contributor the token-weighted mean is the gradient itself, and x T then / T is not exact in
float32. The update masks then come straight from the neurons computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hetero_testnet.exchange.aggregation import (BufferLayout, apply_average, float64_device, grad_views,
                                                 pack_contribution, shard_bounds, sum_of_squares, update_masks_for)
from hetero_testnet.exchange.strategies import SyncStrategy
from hetero_testnet.model.optim import clip_coefficient


@dataclass(frozen=True)
class ReducedStep:
    """What one `reduce` produced; the buffer itself now holds the averaged, clipped gradient."""

    update_masks: dict[str, torch.Tensor | None]
    """Per parameter: None (update every element) or a bool mask broadcastable to it (`MaskedAdamW.step`)."""
    grad_norm: float
    """Global L2 norm of the averaged gradient before clipping; bit-identical on every rank (may be NaN/inf)."""
    clip_coefficient: float
    """`optim.clip_coefficient(grad_norm, max)`; the buffer was scaled by it only if it is below 1."""
    bytes_moved: int
    """Bytes of the tensors SUM-reduced over the group (buffer as `SyncStrategy.wire_bytes` puts it on
    the wire, + norm partials); 0 without a collective."""
    bytes_sent: int
    """Estimated bytes this rank sent: 2 (W-1)/W of `bytes_moved`, as a ring all-reduce moves them
    (gloo may pick another algorithm; this is a model, not a measurement)."""
    bytes_received: int
    """Estimated bytes received; equal to `bytes_sent` for a ring."""
    fault_delay_s: float
    """Injected network-fault delay (part of `exchange_time_s`)."""
    exchange_time_s: float
    """Wall time of the whole reduction: pack, delay, collectives, average, norm, clip."""

    @property
    def clipped(self) -> bool:
        return self.clip_coefficient < 1.0


class MaskedGradientReducer:
    """The exchange buffer of one model and the reduction of every step's gradient in it.

    `for_model` builds the buffer and installs its views as `p.grad`; the caller runs backward
    (`train.forward_backward` zeroes and fills the views), then `reduce`, then the optimizer step.
    """

    def __init__(self, layout: BufferLayout, strategy: SyncStrategy, *, max_grad_norm: float,
                 device: torch.device | str = "cpu", buffer: torch.Tensor | None = None) -> None:
        """`buffer`: share another reducer's buffer (a local clip and a collective reduction of the
        same gradients, as `--sync diloco` does); by default a new zero buffer on `device`."""
        self.layout = layout
        self.strategy = strategy
        self.max_grad_norm = max_grad_norm
        if buffer is not None and (buffer.numel() != layout.total_numel or buffer.dtype != torch.float32):
            raise ValueError(f"a shared buffer must be {layout.total_numel} float32 elements")
        self.buffer = buffer if buffer is not None else torch.zeros(layout.total_numel, dtype=torch.float32,
                                                                    device=device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, layout: BufferLayout, strategy: SyncStrategy, *,
                  max_grad_norm: float) -> "MaskedGradientReducer":
        """A reducer on `model`'s device whose buffer views are now every `p.grad` of `model`."""
        reducer = cls(layout, strategy, max_grad_norm=max_grad_norm, device=next(model.parameters()).device)
        views = reducer.grad_views()
        for name, p in model.named_parameters():
            p.grad = views[name]
        return reducer

    def grad_views(self) -> dict[str, torch.Tensor]:
        """The buffer as one view per parameter name, shaped like the parameter."""
        return grad_views(self.buffer, self.layout)

    def zero_grad(self) -> None:
        """Zero every gradient at once (a step in which this client trained nothing)."""
        self.buffer.zero_()

    def reduce(self, neuron_masks: torch.Tensor, tokens: int) -> ReducedStep:
        """Average, measure and clip this step's gradient over the group, in place.

        `neuron_masks` (num_layers, intermediate) bool: the FFN neurons this client computed
        (`matformer.build_neuron_masks`); `tokens`: the target tokens its gradient is the mean over
        (0 when it trained nothing: its buffer must then be zero). Every element is averaged over
        the clients that computed it, weighted by their tokens (`aggregation`).

        Failure contract:
        - A lost peer (killed, or hung past the group timeout `Generation.timeout_s`) makes the
          gradient or the norm all-reduce raise `PeerLostError`. Nothing is latched: the reducer keeps
          no state between calls, and there is no timeout here beyond the group's.
        - After `PeerLostError` the buffer (every `p.grad`) holds a partial sum or a half-finished
          average: it must NOT be applied. Drop the step (report it failed); the next backward zeroes it.
        - The exchange has destroyed its broken group: another `reduce` before the next generation
          is formed raises `PeerLostError` again without waiting on any peer.
        - On return, every rank of the group holds the same buffer bit for bit, and the same
          `update_masks` and `grad_norm`. A non-finite `grad_norm` is returned, not raised: the
          caller reports the step as diverged and must not apply it.
        """
        t0 = time.perf_counter()
        fault_delay = 0.0
        if self.strategy.packs:
            pack_contribution(self.buffer, self.layout, neuron_masks, tokens)
            fault_delay = self.strategy.exchange_buffer(self.buffer)
            update_masks = apply_average(self.buffer, self.layout)
        else:  # one contributor: the buffer already is the token-weighted mean (module docstring)
            held = neuron_masks.to(self.buffer.device, torch.bool)
            if tokens <= 0:  # as apply_average with no tokens: zero gradient, no FFN neuron updated
                self.buffer[:self.layout.grad_numel].zero_()
                held = torch.zeros_like(held)
            update_masks = update_masks_for(self.layout, held)
        rank, world = self.strategy.group()
        grad_norm = self._global_grad_norm(rank, world)
        coefficient = clip_coefficient(grad_norm, self.max_grad_norm)
        if coefficient < 1.0:  # a NaN norm gives 1.0: never scaled; the caller reports it as diverged
            self.buffer[:self.layout.grad_numel].mul_(coefficient)
        moved = (self.strategy.wire_bytes(self.buffer) + world * 8) if world > 1 else 0
        ring = 2 * (world - 1) * moved // world
        return ReducedStep(update_masks=update_masks, grad_norm=grad_norm, clip_coefficient=coefficient,
                           bytes_moved=moved, bytes_sent=ring, bytes_received=ring, fault_delay_s=fault_delay,
                           exchange_time_s=time.perf_counter() - t0)

    def _global_grad_norm(self, rank: int, world: int) -> float:
        """L2 norm of the averaged gradient, bit-identical on every rank.

        Each rank sums squares over its own contiguous shard in float64 and the per-rank partial
        sums are all-reduced, so every rank adds the same numbers in the same order.
        """
        start, end = shard_bounds(self.layout.grad_numel, rank, world)
        # NCCL needs device tensors; MPS has no float64 (its partials go through host memory anyway)
        partial = torch.zeros(world, dtype=torch.float64, device=float64_device(self.buffer.device))
        partial[rank] = sum_of_squares(self.buffer, start, end)
        if world > 1:
            self.strategy.sum_partials(partial)
        # An explicit left-to-right loop, not `sum()`: since Python 3.12 `sum()` of floats is
        # compensated (Neumaier), so a 3.11 and a 3.12 client would add the same partials
        # differently and their clip coefficients, hence their weights, could differ.
        total = 0.0
        for x in partial.tolist():
            total += x
        return total ** 0.5

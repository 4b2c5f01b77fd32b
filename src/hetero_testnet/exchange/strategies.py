"""Sync strategies: how (and whether) a step's packed gradient buffer is shared between clients.

A strategy is the part of `MaskedGradientReducer.reduce` that talks to other processes. The
reducer does the tensor math; the strategy says which group the buffer is summed over (`group`),
sums the buffer (`exchange`, where injected network faults are charged) and the norm partials
(`sum_partials`). Strategies are chosen by name (`--sync`, `Welcome.sync`) from `SYNC_STRATEGIES`;
a new one is a subclass here plus one line in that registry.

- `allreduce`: one shared model. The buffer is SUM-reduced over the current generation's gloo
  group (`GradientExchange`), so every replica applies the same average.
- `none`: independent replicas. No collective and no fault delay; each client averages only its
  own contribution.
- `demo`: no buffer is summed. `DemoSync.all_gather` moves every client's DeMo payload (a flat
  uint8 tensor of the same length on every client) with one gloo all_gather; the decode is
  `exchange/demo_codec.py`, the step `exchange/demo_stepper.py`.
- `diloco`: `allreduce` of the pseudo-gradient buffer once per round (`exchange/diloco_stepper.py`),
  optionally with the gradient part as bfloat16 on the wire.

Bytes and the network faults: each strategy first passes the round's Ready->Go gate (so a slow link
is exchange time, never compute time: the compute-done timings that batch shares follow stay the
device's compute), then charges `NetworkFaults.delay_s` on the bytes this rank
sends: for `allreduce` 2 (W-1)/W (a ring, `sent_bytes`) of what it puts on the wire (`wire_bytes`,
the float32 buffer), nothing alone; `diloco` the same of its buffer (bf16 part halved); `demo` (W-1)
payloads, what one rank sends in an all_gather.

`SingleProcess` is not a `--sync` choice: it is the one-process baseline (`testnet train`), whose
buffer already holds the finished gradient (see `packs`).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from hetero_testnet.errors import ConfigError, PeerLostError
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.exchange.group import GradientExchange


class SyncStrategy(ABC):
    """How one client's buffer meets the others'. Constructed with the client's `GradientExchange`
    (None where there is no group) and its `NetworkFaults`; `faults` may be replaced on rejoin."""

    name: ClassVar[str]
    packs: ClassVar[bool] = True
    """True: the reducer packs T * grad with the token counts, exchanges and divides (the exact masked
    average). False only for a buffer that can never hold anyone else's gradient (`SingleProcess`)."""

    def __init__(self, exchange: GradientExchange | None = None, faults: NetworkFaults | None = None) -> None:
        self.exchange = exchange
        self.faults = faults if faults is not None else NetworkFaults()

    @abstractmethod
    def group(self) -> tuple[int, int]:
        """(rank, world_size) of the group the buffer was summed over; (0, 1) without one."""

    @abstractmethod
    def exchange_buffer(self, buffer: torch.Tensor) -> float:
        """SUM `buffer` over the group in place; returns the injected fault delay in seconds.

        Raises `PeerLostError` when a peer is lost (the buffer then holds a partial sum).
        """

    @abstractmethod
    def sum_partials(self, partial: torch.Tensor) -> None:
        """SUM the per-rank norm partials (float64, one per rank) in place; called only when world > 1."""

    def wire_bytes(self, buffer: torch.Tensor) -> int:
        """Bytes of `buffer` as `exchange_buffer` puts it on the wire: float32, 4 per element."""
        return buffer.numel() * 4

    def sent_bytes(self, wire_bytes: int) -> int:
        """What this rank sends when `wire_bytes` are SUM-reduced: 2 (W-1)/W of them (a ring), 0 alone;
        the network faults charge these."""
        world = self.group()[1]
        return 2 * (world - 1) * wire_bytes // world


class AllReduceSync(SyncStrategy):
    """`allreduce`: SUM over the current generation's process group (gloo), after the fault delay."""

    name = "allreduce"

    def __init__(self, exchange: GradientExchange | None = None, faults: NetworkFaults | None = None) -> None:
        super().__init__(exchange, faults)
        if exchange is None:
            raise ConfigError("sync strategy 'allreduce' needs a gradient exchange (a process group)")
        self.exchange: GradientExchange = exchange
        self.rng = random.Random()  # jitter draws; unseeded: a link's jitter is not part of the run

    def group(self) -> tuple[int, int]:
        world = self.exchange.world_size if self.exchange.active else 1
        return (self.exchange.rank if world > 1 else 0), world

    def exchange_buffer(self, buffer: torch.Tensor) -> float:
        self.exchange.pass_gate()  # the compute is done (Ready->Go): the link's time is exchange time
        delay = self.faults.delay_s(self.sent_bytes(self.wire_bytes(buffer)), self.rng)  # what this rank sends
        if delay > 0:
            time.sleep(delay)  # fault injection: the link is slow, nothing waits on anything
        self.exchange.all_reduce_sum(buffer)
        return delay

    def sum_partials(self, partial: torch.Tensor) -> None:
        self.exchange.all_reduce_sum(partial)


class DiLoCoSync(AllReduceSync):
    """`diloco`: the outer all-reduce of `T * (theta_global - theta_local)` and the counts.

    With `bf16` (set by `configure`) the pseudo-gradient part travels as bfloat16: it is rounded to
    bf16, summed by gloo in bf16 (every rank gets the same sum) and widened back; the token counts
    stay float32 (bf16 is exact only up to 256), so the exchange is two all-reduces.
    """

    name = "diloco"

    def __init__(self, exchange: GradientExchange | None = None, faults: NetworkFaults | None = None) -> None:
        super().__init__(exchange, faults)
        self.bf16 = False
        self.grad_numel = 0

    def configure(self, *, grad_numel: int, bf16: bool) -> None:
        """Where the gradient part of the buffer ends, and whether it travels as bfloat16."""
        self.grad_numel, self.bf16 = grad_numel, bf16

    def wire_bytes(self, buffer: torch.Tensor) -> int:
        if not self.bf16:
            return buffer.numel() * 4
        return self.grad_numel * 2 + (buffer.numel() - self.grad_numel) * 4

    def exchange_buffer(self, buffer: torch.Tensor) -> float:
        if not self.bf16:
            return super().exchange_buffer(buffer)
        self.exchange.pass_gate()
        delay = self.faults.delay_s(self.sent_bytes(self.wire_bytes(buffer)), self.rng)
        if delay > 0:
            time.sleep(delay)  # fault injection, as in allreduce
        grads = buffer[:self.grad_numel].to(torch.bfloat16)
        self.exchange.all_reduce_sum(grads)
        self.exchange.all_reduce_sum(buffer[self.grad_numel:])
        buffer[:self.grad_numel].copy_(grads)
        return delay


class DemoSync(SyncStrategy):
    """`demo`: one all_gather of every client's DeMo payload; no buffer is summed.

    `all_gather` raises `PeerLostError` when a peer is lost (nothing has been decoded or applied).
    """

    name = "demo"
    packs = False

    def __init__(self, exchange: GradientExchange | None = None, faults: NetworkFaults | None = None) -> None:
        super().__init__(exchange, faults)
        if exchange is None:
            raise ConfigError("sync strategy 'demo' needs a gradient exchange (a process group)")
        self.exchange: GradientExchange = exchange
        self.rng = random.Random()

    def group(self) -> tuple[int, int]:
        world = self.exchange.world_size if self.exchange.active else 1
        return (self.exchange.rank if world > 1 else 0), world

    def payload_bytes_sent(self, payload: torch.Tensor) -> int:
        """What this rank sends in an all_gather of `payload`: one copy to each of the other W - 1 ranks
        (gloo's ring all_gather forwards W - 1 payloads; it receives as many)."""
        return payload.numel() * payload.element_size() * (self.group()[1] - 1)

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """(every rank's payload in rank order, the injected fault delay in seconds)."""
        self.exchange.pass_gate()
        delay = self.faults.delay_s(self.payload_bytes_sent(payload), self.rng)
        if delay > 0:
            time.sleep(delay)  # fault injection: the link is slow, nothing waits on anything
        if not self.exchange.active:
            raise PeerLostError("all_gather without a process group")
        return self.exchange.all_gather(payload), delay

    def exchange_buffer(self, buffer: torch.Tensor) -> float:
        raise RuntimeError("sync 'demo' exchanges payloads (all_gather), never a summed buffer")

    def sum_partials(self, partial: torch.Tensor) -> None:
        raise RuntimeError("sync 'demo' clips locally: there are no norm partials to sum")


class NoSync(SyncStrategy):
    """`none`: independent replicas; no collective, no fault delay.

    The reducer still packs and divides by the client's own token counts. With one contributor
    that average is the gradient itself up to rounding (x T, / T is not exact in float32); it is
    kept so `--sync none` runs stay bit-identical to the runs made before this module existed.
    TODO: set `packs = False` (as `SingleProcess`) in a change that may move the last bits of
    `none` runs.
    """

    name = "none"

    def group(self) -> tuple[int, int]:
        return 0, 1

    def exchange_buffer(self, buffer: torch.Tensor) -> float:
        return 0.0

    def sum_partials(self, partial: torch.Tensor) -> None:
        raise RuntimeError("sync 'none' has a world of 1: there are no partials to sum")


class SingleProcess(NoSync):
    """The one-process baseline (`testnet train`): world size 1, and the buffer is the gradient.

    With one contributor the token-weighted mean is that contributor's gradient, so the reducer
    skips the pack (x T) and the divide (/ T): in float32 that round trip is not exact, and the
    baseline's weights would move in the last bit. The update masks still come from the neurons
    computed. Not in `SYNC_STRATEGIES`: `--sync` never selects it.
    """

    name = "single"
    packs = False


SYNC_STRATEGIES: dict[str, type[SyncStrategy]] = {
    AllReduceSync.name: AllReduceSync,
    NoSync.name: NoSync,
    DemoSync.name: DemoSync,
    DiLoCoSync.name: DiLoCoSync,
}
"""Every `--sync` choice by name; add a strategy here and nowhere else."""


def sync_names() -> tuple[str, ...]:
    """The valid `--sync` values, in registry order."""
    return tuple(SYNC_STRATEGIES)


def build_sync(name: str, exchange: GradientExchange | None = None,
               faults: NetworkFaults | None = None) -> SyncStrategy:
    """The strategy called `name`; `ConfigError` naming the choices for an unknown one."""
    cls = SYNC_STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown sync strategy {name!r}; choose one of {', '.join(sync_names())}")
    return cls(exchange, faults)

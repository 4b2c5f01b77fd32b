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

`SingleProcess` is not a `--sync` choice: it is the one-process baseline (`testnet train`), whose
buffer already holds the finished gradient (see `packs`).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from hetero_testnet.errors import ConfigError
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
        delay = self.faults.delay_s(buffer.numel() * 4, self.rng)  # float32 bytes, as charged since the start
        if delay > 0:
            time.sleep(delay)  # fault injection: the link is slow, nothing waits on anything
        self.exchange.all_reduce_sum(buffer)
        return delay

    def sum_partials(self, partial: torch.Tensor) -> None:
        self.exchange.all_reduce_sum(partial)


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

"""A test double of `GradientExchange`: W ranks as threads of one process, collectives at a barrier.

`ThreadGroup(world).run(fn)` calls `fn(rank, exchange)` in one thread per rank and returns the
results in rank order. The collectives sum (or gather) in rank order, so every rank gets the same
bits, as gloo gives every rank the same result. `fail_next()` makes every rank's next collective
raise `PeerLostError`, as when a peer is killed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from hetero_testnet.errors import PeerLostError


class ThreadGroup:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world
        self.failing = False
        self.collectives = 0

    def fail_next(self) -> None:
        self.failing = True

    def run(self, fn: Callable[[int, "FakeExchange"], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, FakeExchange(self, rank))
            except PeerLostError as e:  # every rank raises it from the same collective: no abort
                errors.append(e)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                self.barrier.abort()  # a rank that died unexpectedly must not leave the others waiting

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _meet(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        failing = self.failing
        self.barrier.wait()
        if rank == 0:
            self.collectives += 1
            self.failing = False
        self.barrier.wait()
        if failing:
            raise PeerLostError("simulated peer loss")
        return values


class FakeExchange:
    """Duck-types `GradientExchange` for one rank of a `ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world
        self.active = True
        self.generation = 0
        self.gates_passed = 0

    def pass_gate(self) -> None:
        """The Ready->Go gate the strategies pass before their link delay (nothing to wait for here)."""
        self.gates_passed += 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        parts = self.group._meet(self.rank, tensor.clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total.add_(p)
        tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [p.clone() for p in self.group._meet(self.rank, tensor.clone())]

    def broadcast(self, tensor: torch.Tensor, src_rank: int) -> None:
        tensor.copy_(self.group._meet(self.rank, tensor.clone())[src_rank])

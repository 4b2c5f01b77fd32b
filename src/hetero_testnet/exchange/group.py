"""Gradient exchange on torch.distributed: group lifecycle per membership generation.

Vocabulary: `client_id` is a stable identity; `rank` is a position in the current group and may
change with every `generation`. The coordinator hosts a `TCPStore`; generation g forms its
process group under the store prefix `gen/<g>/` so that keys of earlier (possibly broken)
generations are never read again.

Failure semantics (measured on gloo, see shared/reference/exchange-facts.md):
- A SIGKILLed peer makes the next collective raise at once on the survivors. A hung peer is
  noticed only by the group timeout, which is therefore set per generation from the run's round
  deadline (`Generation.timeout_s`).
- Any failure is raised as `PeerLostError` and the group is destroyed at once: holding on to a
  broken group has blocked other survivors for a full timeout. The caller reports the failed
  step to the coordinator and waits for the next generation; nothing was applied.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from hetero_testnet.errors import PeerLostError

log = logging.getLogger("hetero_testnet")


def _short(e: BaseException) -> str:
    """Gloo's messages carry source paths and banners: keep the first line, minus the path prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:200]


class GradientExchange:
    """One client's membership in the current generation's process group."""

    def __init__(self, store_host: str, store_port: int, backend: str, connect_timeout_s: float) -> None:
        self.backend = backend
        try:
            self.store = dist.TCPStore(store_host, store_port, is_master=False,
                                       timeout=timedelta(seconds=connect_timeout_s),
                                       use_libuv=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError variants
            raise PeerLostError(f"cannot reach the rendezvous store at {store_host}:{store_port}: {e}") from e
        self.generation: int | None = None
        self.rank = 0
        self.world_size = 1

    @property
    def active(self) -> bool:
        return self.generation is not None

    def form(self, generation: int, rank: int, world_size: int, timeout_s: float) -> float:
        """Join generation `generation`; returns the seconds it took. Raises PeerLostError."""
        self.destroy()
        t0 = time.perf_counter()
        prefix = dist.PrefixStore(f"gen/{generation}/", self.store)
        try:
            dist.init_process_group(self.backend, store=prefix, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001
            self._drop()
            raise PeerLostError(f"forming generation {generation} failed: {_short(e)}") from e
        self.generation, self.rank, self.world_size = generation, rank, world_size
        return time.perf_counter() - t0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place SUM over the group; raises PeerLostError (and destroys the group) on failure."""
        if self.world_size == 1:
            return
        self._run(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM), "all_reduce")

    def broadcast(self, tensor: torch.Tensor, src_rank: int) -> None:
        if self.world_size == 1:
            return
        self._run(lambda: dist.broadcast(tensor, src=src_rank), "broadcast")

    def _run(self, op, what: str) -> None:
        if not self.active:
            raise PeerLostError(f"{what} without a process group")
        try:
            op()
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError
            generation = self.generation
            self._drop()
            raise PeerLostError(f"{what} failed in generation {generation}: {_short(e)}") from e

    def _drop(self) -> None:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - a broken group may refuse a clean destroy
            log.debug("destroy_process_group after failure: %s", e)
        self.generation = None

    def destroy(self) -> None:
        """Leave the current group (if any); safe to call repeatedly."""
        self._drop()

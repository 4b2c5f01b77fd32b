"""Gradient exchange on torch.distributed: group lifecycle per membership generation.

Vocabulary: `client_id` is a stable identity; `rank` is a position in the current group and may
change with every `generation`. The coordinator hosts a `TCPStore`; generation g forms its
process group under the store prefix `gen/<g>/` so that keys of earlier (possibly broken)
generations are never read again. Groups are backend objects (`formation.new_backend_group`), not
torch's global default group, so one being formed can be abandoned while the next one forms.

Timeouts (every wait is bounded; the coordinator sets the values, see run/readygo.py):
- forming (and the state broadcast to a joiner) runs under `Generation.timeout_s`, in a thread the
  client can abandon (`start_forming` / `adopt` / `abandon`, `formation.py`);
- every collective runs under `op_timeout_s`, the coordinator's `Go.exchange_timeout_s`: a few
  times the measured exchange time plus a floor. Gloo applies it per operation, so a hung peer
  costs at most that long once all members have entered the collective together (the Ready->Go
  barrier, `arm_gate`).

Failure semantics (measured on gloo, see shared/reference/exchange-facts.md):
- A SIGKILLed peer makes the next collective raise at once on the survivors; a hung (SIGSTOPped)
  one makes it raise after `op_timeout_s`.
- Any failure is raised as `PeerLostError` and the group is dropped at once: holding on to a
  broken group has blocked other survivors for a full timeout. The caller reports the failed
  step to the coordinator and waits for the next generation; nothing was applied.
- The gate (`arm_gate`) runs before the first collective of a round; when it raises
  `PeerLostError` (the coordinator discarded the round before the exchange) no collective starts
  and the group is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

from hetero_testnet.errors import PeerLostError
from hetero_testnet.exchange.formation import AbandonedFormations, Formation, PhaseHook, on_host

log = logging.getLogger("hetero_testnet")

FORM_GRACE_S = 1.0
"""`form` waits this long past the formation timeout before it abandons the attempt."""


def _short(e: BaseException | None) -> str:
    """Gloo's messages carry source paths and banners: keep the first line, minus the path prefix."""
    if e is None:
        return "no group"
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:200]


class GradientExchange:
    """One client's membership in the current generation's process group."""

    def __init__(self, store_host: str, store_port: int, backend: str, connect_timeout_s: float) -> None:
        self.backend = backend
        self.store_host, self.store_port = store_host, store_port
        try:  # fail fast when the store is unreachable; formations open their own connections
            self.store = dist.TCPStore(store_host, store_port, is_master=False,
                                       timeout=timedelta(seconds=connect_timeout_s),
                                       use_libuv=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError variants
            raise PeerLostError(f"cannot reach the rendezvous store at {store_host}:{store_port}: {e}") from e
        self.group: dist.ProcessGroup | None = None
        self.generation: int | None = None
        self.rank = 0
        self.world_size = 1
        self.op_timeout_s: float | None = None
        """Timeout of each collective (the coordinator's `Go.exchange_timeout_s`); None: the group's."""
        self.gate: Callable[[], None] | None = None
        self.collective_time_s = 0.0
        """Seconds spent inside collectives since `arm_gate` (the measured exchange cost)."""
        self.abandoned = AbandonedFormations()
        self.phase_hook: PhaseHook | None = None

    @property
    def active(self) -> bool:
        return self.generation is not None

    # ------------------------------------------------------------------ forming
    def start_forming(self, generation: int, rank: int, world_size: int, timeout_s: float,
                      broadcast: tuple[torch.Tensor, int] | None = None) -> Formation:
        """Leave the current group and start forming `generation` in a thread (see `formation.py`)."""
        self.destroy()
        return Formation(store_host=self.store_host, store_port=self.store_port, backend=self.backend,
                         generation=generation, rank=rank, world_size=world_size, timeout_s=timeout_s,
                         broadcast=broadcast, phase_hook=self.phase_hook).start()

    def adopt(self, formation: Formation) -> float:
        """Make a finished formation the current group; returns the seconds it took. Raises
        PeerLostError when it failed."""
        if formation.group is None:
            raise PeerLostError(f"forming generation {formation.generation} failed: {_short(formation.error)}")
        self.group = formation.group
        self.generation, self.rank, self.world_size = formation.generation, formation.rank, formation.world_size
        return formation.form_time_s + formation.broadcast_time_s

    def abandon(self, formation: Formation) -> None:
        """Stop waiting for `formation`; its thread is left to end by itself."""
        self.abandoned.add(formation)

    def form(self, generation: int, rank: int, world_size: int, timeout_s: float) -> float:
        """Form `generation` and wait for it (up to `timeout_s + FORM_GRACE_S`, then abandon it);
        returns the seconds it took. Raises PeerLostError."""
        formation = self.start_forming(generation, rank, world_size, timeout_s)
        if not formation.wait(timeout_s + FORM_GRACE_S):
            self.abandon(formation)
            raise PeerLostError(f"forming generation {generation} did not end within {timeout_s + FORM_GRACE_S:.0f} s")
        return self.adopt(formation)

    # ------------------------------------------------------------------ collectives
    def arm_gate(self, gate: Callable[[], None] | None) -> None:
        """Run `gate()` before the next collective (once); it may raise PeerLostError to cancel it."""
        self.gate = gate
        self.collective_time_s = 0.0

    def pass_gate(self) -> None:
        """Run the armed gate now (a round without any collective still passes it once)."""
        gate, self.gate = self.gate, None
        if gate is not None:
            gate()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place SUM over the group; raises PeerLostError (and destroys the group) on failure."""
        if self.world_size == 1:
            return

        def op(group: dist.ProcessGroup, timeout: timedelta | None) -> dist.Work:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            if timeout is not None:
                opts.timeout = timeout
            return group.allreduce([wire], opts)

        wire = on_host(tensor, self.backend)
        self._run(op, "all_reduce")
        if wire is not tensor:
            tensor.copy_(wire)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (equal shapes and dtypes), in rank order; gloo's list-form
        all_gather. Raises PeerLostError (and destroys the group) on failure."""
        if self.world_size == 1:
            return [tensor]
        wire = on_host(tensor, self.backend)  # the gathered tensors are on the host then
        out = [torch.empty_like(wire) for _ in range(self.world_size)]

        def op(group: dist.ProcessGroup, timeout: timedelta | None) -> dist.Work:
            opts = AllgatherOptions()  # not re-exported by torch.distributed in this torch
            if timeout is not None:
                opts.timeout = timeout
            return group.allgather([out], [wire], opts)

        self._run(op, "all_gather")
        return out

    def broadcast(self, tensor: torch.Tensor, src_rank: int) -> None:
        if self.world_size == 1:
            return

        def op(group: dist.ProcessGroup, timeout: timedelta | None) -> dist.Work:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src_rank, 0
            if timeout is not None:
                opts.timeout = timeout
            return group.broadcast([wire], opts)

        wire = on_host(tensor, self.backend)
        self._run(op, "broadcast")
        if wire is not tensor:
            tensor.copy_(wire)

    def _run(self, op: Callable[[dist.ProcessGroup, timedelta | None], dist.Work], what: str) -> None:
        if not self.active or self.group is None:
            raise PeerLostError(f"{what} without a process group")
        self.pass_gate()
        timeout = timedelta(seconds=self.op_timeout_s) if self.op_timeout_s else None
        t0 = time.perf_counter()
        try:
            op(self.group, timeout).wait()
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError
            generation = self.generation
            self._drop()
            raise PeerLostError(f"{what} failed in generation {generation}: {_short(e)}") from e
        finally:
            self.collective_time_s += time.perf_counter() - t0

    def _drop(self) -> None:
        self.group = None  # the last reference: gloo's destructor joins its (idle) worker threads
        self.generation = None

    def destroy(self) -> None:
        """Leave the current group (if any); safe to call repeatedly."""
        self._drop()

"""Forming one generation's process group in a thread of its own, so that a stuck formation can be abandoned.

Measured here (torch 2.13, gloo, see shared/reference/exchange-facts.md and /work/notes/issue11.md):
a peer killed while a group forms usually makes the survivors' formation fail at its timeout, but
now and then (about 1 formation in 8 with a kill 5-10 ms into it) one survivor stays inside gloo's
`connectFullMesh` retry loop for about 5x its timeout, long after its peers formed or gave up. A
formation is therefore never waited on blindly: it runs in a daemon thread with its own store
connection (a thread blocked in a store wait holds that connection's lock, so it must not be the
one the next formation uses), and the caller waits on `done` while it keeps serving its control
connection. `abandon` forgets the attempt; its thread ends by itself (the group it may still build
is dropped unused). The optional state broadcast to a joiner runs in the same thread and writes
only into its own flat buffer, so an abandoned broadcast can never touch the model.

Failure semantics of `Formation`:
- `error` is set (and `group` is None) when forming or the broadcast raised, e.g. at the timeout;
- `done` is never set while the thread is stuck; the caller decides when to stop waiting
  (`GradientExchange.adopt` takes only a finished, successful formation);
- `AbandonedFormations.overdue_s` says how far the worst abandoned thread is past its hard deadline
  (`WEDGE_FACTOR` x its timeout + `WEDGE_GRACE_S`: wedges were measured at ~5x), for the client's
  crash-only watchdog (a client with a thread stuck past it exits and is restarted).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

GLOO_STAGING_ENV = "HETERO_TESTNET_GLOO_STAGING"
"""`device` hands CUDA tensors to gloo itself (it reduces them through its own host copies) instead of
staging them here: the alternative benchmarks/gpu_check.sh measures. Default `host`."""

PhaseHook = Callable[[str], None]
"""Called in the formation thread as it enters a phase ("forming", "broadcast"); tests use it to
kill the process at that point (`run/testhooks.py`)."""


def stages_through_host(backend: str, device_type: str) -> bool:
    """Gloo reduces host memory: a tensor on an accelerator (CUDA shared by several clients, or MPS,
    which gloo does not take at all) goes through a host copy around each collective (run/devices.py)."""
    if device_type == "cuda" and os.environ.get(GLOO_STAGING_ENV) == "device":
        return False
    return backend == "gloo" and device_type != "cpu"


def on_host(tensor: torch.Tensor, backend: str) -> torch.Tensor:
    """The tensor a collective of `backend` takes: `tensor` itself, or a host copy to copy back from."""
    return tensor.cpu() if stages_through_host(backend, tensor.device.type) else tensor


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def new_backend_group(backend: str, store: dist.Store, rank: int, world_size: int,
                      timeout: timedelta, *, loopback: bool = False) -> dist.ProcessGroup:
    """A process group object of `backend` on `store`, outside torch's global default group (so
    that several can exist, and one being built can be abandoned). Gloo reads GLOO_SOCKET_IFNAME
    here, as `init_process_group` does; without it, `loopback` (the store is on a loopback address,
    so every peer is on this machine) keeps gloo's sockets on 127.0.0.1 too, instead of the address
    the hostname resolves to."""
    if backend == "gloo":
        if loopback and not os.environ.get("GLOO_SOCKET_IFNAME"):
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._threads = 2  # what the plain constructor gives one device
            return dist.ProcessGroupGloo(store, rank, world_size, options)
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":  # not exercised on this project's CPU machines
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"unsupported backend {backend!r}")


class Formation:
    """One attempt to form generation `generation` (and, optionally, broadcast a state)."""

    def __init__(self, *, store_host: str, store_port: int, backend: str, generation: int, rank: int,
                 world_size: int, timeout_s: float, broadcast: tuple[torch.Tensor, int] | None = None,
                 phase_hook: PhaseHook | None = None) -> None:
        self.generation, self.rank, self.world_size, self.timeout_s = generation, rank, world_size, timeout_s
        self.broadcast = broadcast
        """(flat state buffer, source rank): the source's buffer is sent, the others' filled."""
        self.group: dist.ProcessGroup | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self.abandoned = False
        self.form_time_s = 0.0
        self.broadcast_time_s = 0.0
        self._args = (store_host, store_port, backend)
        self._hook = phase_hook or (lambda phase: None)
        self.thread = threading.Thread(target=self._run, name=f"form-gen-{generation}", daemon=True)

    def start(self) -> Formation:
        self.thread.start()
        return self

    def _run(self) -> None:
        host, port, backend = self._args
        timeout = timedelta(seconds=self.timeout_s)
        try:
            t0 = time.perf_counter()
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout, use_libuv=True)
            self._hook("forming")
            group = new_backend_group(backend, dist.PrefixStore(f"gen/{self.generation}/", store), self.rank,
                                      self.world_size, timeout, loopback=is_loopback(host))
            t1 = time.perf_counter()
            if self.broadcast is not None and self.world_size > 1:
                self._hook("broadcast")
                flat, source = self.broadcast
                opts = dist.BroadcastOptions()
                opts.rootRank, opts.rootTensor, opts.timeout = source, 0, timeout
                wire = on_host(flat, backend)
                group.broadcast([wire], opts).wait()
                if wire is not flat:
                    flat.copy_(wire)
            self.form_time_s, self.broadcast_time_s = t1 - t0, time.perf_counter() - t1
            if not self.abandoned:
                self.group = group
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError/DistBackendError variants
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout_s: float) -> bool:
        """True once the attempt has finished (well or not) within `timeout_s`."""
        return self.done.wait(max(0.0, timeout_s))

    def abandon(self) -> None:
        """Give up on this attempt: whatever it builds later is dropped."""
        self.abandoned = True
        self.group = None


WEDGE_FACTOR = 10.0
WEDGE_GRACE_S = 30.0


class AbandonedFormations:
    """The abandoned attempts whose threads are still running (they end by themselves, or not)."""

    def __init__(self) -> None:
        self._items: list[Formation] = []
        self._lock = threading.Lock()

    def add(self, formation: Formation) -> None:
        formation.abandon()
        with self._lock:
            self._items.append(formation)

    def overdue_s(self, now: float | None = None) -> float:
        """How far the worst still-running abandoned formation is past its hard deadline, started +
        WEDGE_FACTOR x timeout + WEDGE_GRACE_S (<= 0: none is; -inf when none is left)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._items = [f for f in self._items if not f.done.is_set()]
            return max((now - f.started - WEDGE_FACTOR * f.timeout_s - WEDGE_GRACE_S for f in self._items),
                       default=float("-inf"))

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for f in self._items if not f.done.is_set())

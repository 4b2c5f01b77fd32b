"""The seam between the launcher and whatever runs its clients: the engine.

The launcher owns the run (coordinator, events, stop, fault schedule, summary); an engine only
starts, kills, restarts and ends client processes and says what they are doing, through handles
shaped like `subprocess.Popen` (`pid`, `poll()`, `returncode`, `kill()`, `wait()`).

- `LocalEngine` (`--engine local`, the default): the launcher's own subprocesses, exactly as before
  the seam existed: the launcher restarts a killed client itself after `--kill-restart-delay`.
- `RayEngine` (`--engine ray`, `run/ray_engine.py`, imported only then): each client is a Ray actor
  that runs the same `testnet client` command line. Ray restarts a killed actor by itself
  (`restarts_itself`), so the launcher does not; it *adopts* each new incarnation when the actor
  reports its client's pid, and only then counts and records the restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from hetero_testnet.run.plan import GLOO_IFNAME_ENV, TOKEN_ENV, ClientSpec, LaunchPlan
from hetero_testnet.run.processes import kill_tree, spawn_supervised, wait_all

TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
"""glibc malloc settings every process of a run gets (unless GLIBC_TUNABLES is set already)."""


def client_env_vars(plan: LaunchPlan, token: str, threads: int) -> dict[str, str]:
    """The variables a run adds to its processes' environment: the token (never an argument), threads,
    malloc tuning, unbuffered output and gloo's interface (`--gloo-ifname`)."""
    env = {TOKEN_ENV: token, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", TUNED_MALLOC),
           "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if plan.gloo_ifname:
        env[GLOO_IFNAME_ENV] = plan.gloo_ifname
    return env


class ClientEngine(Protocol):
    name: str
    restarts_itself: bool
    kill_signal: str
    """What a fault kill is called in `fault_kill` events."""

    def connect(self) -> None:
        """Reach the machinery (a Ray cluster); ConfigError if it cannot be used as asked."""

    def client_address(self, bind: str, port: int, advertise_host: str | None) -> str:
        """HOST:PORT at which the clients reach the coordinator."""

    def start(self, spec: ClientSpec, args: list[str], log_path: Path, env: dict[str, str]) -> Any:
        """Start one client; returns its Popen-like handle (OSError if it cannot be started)."""

    def kill(self, handle: Any) -> None:
        """The fault: kill the client at once."""

    def restart(self, handle: Any) -> None:
        """A client that exited asking for a restart (crash-only): start it again, same client id."""

    def adopt(self, handle: Any, wait: bool = False) -> int | None:
        """The pid of a client incarnation the engine started and the launcher has not adopted yet."""

    def pump(self) -> None:
        """Periodic work (logs of remote clients)."""

    def finish(self, handles: Sequence[Any], wait_s: float) -> None:
        """Up to `wait_s` for the clients to leave by themselves, then kill what is left (exit codes set)."""

    def close(self) -> None:
        """Let go of the machinery (always called, last)."""

    def describe(self, handle: Any) -> dict[str, Any]:
        """Where this client ran, for summary.json (empty: nothing to add)."""


class LocalEngine:
    """Clients as subprocesses of the launcher (own session, die with it: `run/processes.py`)."""

    name = "local"
    restarts_itself = False
    kill_signal = "SIGKILL"

    def connect(self) -> None:
        pass

    def client_address(self, bind: str, port: int, advertise_host: str | None) -> str:
        return f"{'127.0.0.1' if bind in ('0.0.0.0', '') else bind}:{port}"

    def start(self, spec: ClientSpec, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
        return spawn_supervised([sys.executable, "-m", "hetero_testnet", *args], log_path=log_path, env=env)

    def kill(self, handle: subprocess.Popen) -> None:
        handle.kill()
        handle.wait()

    def restart(self, handle: subprocess.Popen) -> None:
        raise NotImplementedError("the launcher restarts local clients itself")

    def adopt(self, handle: subprocess.Popen, wait: bool = False) -> int | None:
        return None

    def pump(self) -> None:
        pass

    def finish(self, handles: Sequence[subprocess.Popen], wait_s: float) -> None:
        wait_all(handles, wait_s)
        kill_tree(handles)

    def close(self) -> None:
        pass

    def describe(self, handle: subprocess.Popen) -> dict[str, Any]:
        return {}


def make_engine(plan: LaunchPlan, token: str) -> ClientEngine:
    """The engine `plan.engine` names; Ray's module (and Ray) is imported only for `ray`."""
    if plan.engine.is_ray:
        from hetero_testnet.run.ray_engine import RayEngine

        return RayEngine(plan, token)
    return LocalEngine()

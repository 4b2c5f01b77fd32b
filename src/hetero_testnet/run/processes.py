"""Child processes that cannot outlive their parent: spawn, stop, kill, and what they last said.

Both supervisors use this module: the launcher (`testnet start`: one coordinator and N clients) and
the experiment runner (one `testnet start` per run). torchrun cannot supervise roles this different,
with fault injection, so it is written by hand, but only here.

- `spawn_supervised` starts a command in its own session (a terminal Ctrl-C reaches only the
  supervisor, which then stops the child cleanly) with PR_SET_PDEATHSIG (the child gets SIGTERM when
  the supervisor dies, even by SIGKILL). Output goes to a log file, appended.
- `stop` walks a ladder of (signal, wait) rungs until the process has exited; every wait is bounded.
- `kill_tree` SIGKILLs processes and all their descendants and waits (bounded) until they are gone.
- `last_error_line` is what a failed child last reported, for humans (never parsed further).
- `wait_for_file` waits (bounded) for a file a child writes when it is ready; `Child` is the
  launcher's record of one supervised role.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal a process receives when its parent dies."""
KILL_WAIT_S = 5.0
"""How long to wait for SIGKILLed processes to disappear."""

Ladder = Sequence[tuple[signal.Signals | None, float]]
"""Rungs of `stop`: send the signal (None: send nothing), then wait up to that many seconds."""


@dataclass
class Child:
    role: str
    client_id: int | None
    proc: subprocess.Popen | Any
    """A Popen, or the engine's handle shaped like one (`run/engine.py`)."""
    log_path: Path
    kills: int = 0
    restarts: int = 0
    restart_scheduled: bool = False
    """Its exit asked for a restart that is already scheduled (crash-only)."""
    joined: bool = False
    """Its current process has joined the run."""
    trained: bool = False
    """Its current process has trained a round since joining (it may be killed by the fault injection)."""


def _own_session_dying_with_parent() -> None:
    """Runs in the child before exec: a new session, and SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # no glibc (the child still gets its own session)
        pass


def spawn_supervised(cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str],
                     pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start `cmd` with stdin from /dev/null and stdout and stderr appended to `log_path`.

    The child runs in its own session and receives SIGTERM when this process dies. Only `pass_fds`
    are inherited (besides 0-2). Raises OSError when the log cannot be opened or `cmd` not started.
    """
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=dict(env), preexec_fn=_own_session_dying_with_parent, close_fds=True,
                                pass_fds=tuple(pass_fds))


def stop(proc: subprocess.Popen, ladder: Ladder, *, ctrl_c_escalates: bool = False) -> int:
    """Climb `ladder` until `proc` has exited; returns its exit code (-SIGKILL if it outlived every rung).

    A rung whose signal is None only waits. With `ctrl_c_escalates`, a KeyboardInterrupt during a
    wait moves to the next rung at once (a second Ctrl-C); otherwise it propagates.
    """
    for sig, wait_s in ladder:
        if proc.poll() is not None:
            break
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            if not ctrl_c_escalates:
                raise
    return proc.returncode if proc.returncode is not None else -signal.SIGKILL


def wait_all(procs: Iterable[subprocess.Popen], timeout_s: float) -> None:
    """Wait up to `timeout_s` in all for `procs` to exit by themselves (their exit codes are then set)."""
    psutil.wait_procs(list(procs), timeout=timeout_s)


def kill_tree(procs: Iterable[subprocess.Popen], timeout_s: float = KILL_WAIT_S) -> None:
    """SIGKILL every still-running process of `procs` and all its descendants, then wait up to
    `timeout_s` until they are gone. Processes already reaped are skipped (their pid may be reused)."""
    running = [p for p in procs if p.poll() is None]
    descendants: list[psutil.Process] = []
    for proc in running:
        try:
            descendants += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for victim in [*descendants, *running]:
        try:
            victim.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    # subprocess.Popen objects are waited through their own wait(), so their returncode is set.
    psutil.wait_procs([*running, *descendants], timeout=timeout_s)


def last_error_line(log_path: Path) -> str | None:
    """The message of the last `error: ...` line in a log (the CLI's one-line errors), else its last
    non-empty line; None if the log is missing or empty."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else None


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until `path` exists (True), `proc` exits (False) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.05)
    return path.exists()

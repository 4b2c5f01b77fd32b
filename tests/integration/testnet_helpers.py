"""Running real testnets from tests: subprocess helpers with deadlines, and orphan checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hetero_testnet", *args]


def start_args(logs_dir: Path, name: str, *extra: str) -> list[str]:
    return cli_cmd("start", "--headless", "--config-path", str(TINY), "--server-port", "0",
                       "--logs-dir", str(logs_dir), "--name", name, "--threads", "1", *extra)


def restore_sigint() -> None:
    """`preexec_fn` of every testnet a test starts: SIGINT back to its default, so Python installs its
    KeyboardInterrupt handler even when the test run itself ignores SIGINT (a background job, nohup).
    A test that sends SIGINT must not depend on how pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_start(logs_dir: Path, name: str, *extra: str, timeout: float = 240,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(start_args(logs_dir, name, *extra), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, preexec_fn=restore_sigint, env=env)


def spawn_start(logs_dir: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(start_args(logs_dir, name, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, preexec_fn=restore_sigint, env=env)


@contextmanager
def live_testnet(logs_dir: Path, name: str, *extra: str,
                 env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A testnet running in the background, and its run directory; killed on the way out, whatever
    the test did, so a failed assertion never leaves a run behind."""
    proc = spawn_start(logs_dir, name, *extra, env=env)
    try:
        yield proc, logs_dir / name
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for_event(run_dir: Path, predicate, timeout: float = 120.0) -> dict:
    """Poll the run's event file until an event matches (deadline, no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events(run_dir):
            if predicate(e):
                return e
        time.sleep(0.1)
    raise AssertionError(f"no matching event in {run_dir} within {timeout} s")


def wait_for_step(run_dir: Path, step: int, timeout: float = 120.0) -> dict:
    """Wait until step `step` (or a later one) is committed."""
    return wait_for_event(run_dir, lambda e: e["event"] == "step_committed" and e["step"] >= step, timeout)


def started_pids(run_dir: Path) -> list[int]:
    return [e["pid"] for e in events(run_dir) if e["event"] in ("process_started", "client_restarted")]


def assert_no_orphans(run_dir: Path, timeout: float = 15.0) -> None:
    """Every process the launcher started is gone (zombies of a reaped tree count as gone)."""
    pids = started_pids(run_dir)
    assert pids, "the launcher recorded no processes"
    deadline = time.monotonic() + timeout
    alive: list[int] = []
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and "hetero_testnet" in " ".join(p.cmdline()):
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes left behind: {alive}")


def client_pid(run_dir: Path, client_id: int) -> int:
    joined = [e for e in events(run_dir) if e["event"] == "client_joined" and e["client_id"] == client_id]
    return joined[-1]["pid"]


def checksums_by_step(run_dir: Path) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for e in events(run_dir):
        if e["event"] == "client_step":
            out.setdefault(e["step"], set()).add(e["checksum"])
    return out

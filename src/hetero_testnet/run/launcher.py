"""Process supervision for `testnet start`: one coordinator and N clients, and nothing left behind.

The launcher spawns exactly the commands a user could run by hand (`testnet coordinator`,
`testnet client`), each in its own session (so a terminal Ctrl-C reaches only the launcher,
which then stops the run cleanly) and with PR_SET_PDEATHSIG (so they die with the launcher even
if it is SIGKILLed). It hands the per-run token over in the environment, never on a command line.

Guarantee: when `Launcher.run` returns or raises, every process it started, and their children,
has exited. Ctrl-C / `exit_after_s` ask the coordinator to stop (status interrupted); a crash of
the coordinator stops the clients; a client crash is the coordinator's business (fault tolerance).

Faults: `--random-kill-*` SIGKILLs eligible clients every interval and restarts them with the
same client id after a delay; every kill and restart is an event in `events.jsonl`.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hetero_testnet.config import RunConfig, dump_yaml
from hetero_testnet.run.coordinator import READY_FILE, SUMMARY_FILE
from hetero_testnet.errors import ConfigError, RunFailedError
from hetero_testnet.events import EventTail, EventWriter
from hetero_testnet.run.summary import write_json_atomic

TOKEN_ENV = "HETERO_TESTNET_TOKEN"
TOKEN_FILE = ".token"
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


@dataclass
class ClientSpec:
    client_id: int
    tier: int
    helper_fraction: float
    rotation_interval: int


@dataclass
class FaultPlan:
    random_kill_num: int = 0
    random_kill_interval_s: float = 120.0
    allowed_to_kill: list[int] = field(default_factory=list)
    kill_restart_delay_s: float = 1.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    seed: int = 0

    def network(self) -> dict[str, float]:
        return {"latency_ms": self.latency_ms, "latency_jitter_ms": self.latency_jitter_ms,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s}


@dataclass
class LaunchPlan:
    run_dir: Path
    config: RunConfig
    clients: list[ClientSpec]
    sync: str = "allreduce"
    bind: str = "127.0.0.1"
    server_port: int = 20000
    device: str = "cpu"
    threads_per_client: int = 1
    exit_after_s: float | None = None
    min_clients: int | None = None
    checkpoint_every: int = 0
    resume_checkpoint: Path | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)
    command_line: str = ""


@dataclass
class Child:
    role: str
    client_id: int | None
    proc: subprocess.Popen
    log_path: Path
    kills: int = 0
    restarts: int = 0


def _die_with_parent() -> None:
    """Runs in the child before exec: new session, and SIGTERM when the launcher dies."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    """The coordinator's listening socket, bound here so that the port is known (and checked)
    before anything starts; the coordinator inherits it, and clients can connect at once."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(f"port {port} on {host} is in use or unavailable ({e.strerror})",
                          hint="pass --server-port 0 to use any free port") from e
    s.listen(128)
    s.set_inheritable(True)
    return s


class Launcher:
    def __init__(self, plan: LaunchPlan, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.plan = plan
        self.on_event = on_event or (lambda e: None)
        self.children: dict[str, Child] = {}
        self.token = secrets.token_hex(32)
        self.stop_requested: str | None = None
        self.stop_sent = False
        self.coordinator_ready = False
        self.run_ending = False
        """Set once the run is in Cooldown/Finished: no more fault kills or restarts."""
        self.rng = random.Random(plan.faults.seed)
        self.pending_restarts: list[tuple[float, int]] = []
        self.events: EventWriter | None = None
        self.fault_counts = {"kills": 0, "restarts": 0}

    # ------------------------------------------------------------------ spawning
    def _env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env[TOKEN_ENV] = self.token
        env.setdefault("GLIBC_TUNABLES", TUNED_MALLOC)
        env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, key: str, role: str, client_id: int | None, args: list[str], log_name: str,
               threads: int, pass_fds: tuple[int, ...] = ()) -> Child:
        log_path = self.plan.run_dir / log_name
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "hetero_testnet", *args], stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT, env=self._env(threads),
                                    preexec_fn=_die_with_parent, close_fds=True, pass_fds=pass_fds)
        child = self.children.get(key)
        if child is None:
            child = Child(role, client_id, proc, log_path)
            self.children[key] = child
        else:
            child.proc = proc
        self.events.emit("process_started", client_id=client_id, role_started=role, pid=proc.pid, log=False)
        return child

    def _coordinator_args(self, listen_fd: int) -> list[str]:
        p = self.plan
        args = ["coordinator", "--config-path", str(p.run_dir / "config.yaml"), "--run-dir", str(p.run_dir),
                "--bind", p.bind, "--listen-fd", str(listen_fd), "--expect-clients", str(len(p.clients)),
                "--sync", p.sync, "--device", p.device, "--checkpoint-every", str(p.checkpoint_every)]
        if p.min_clients is not None:
            args += ["--min-clients", str(p.min_clients)]
        if p.resume_checkpoint is not None:
            args += ["--resume-checkpoint", str(p.resume_checkpoint)]
        f = p.faults
        if f.latency_ms or f.latency_jitter_ms:
            args += ["--fault-latency-ms", f"{f.latency_ms:g}-{f.latency_jitter_ms:g}"]
        if f.bandwidth_bytes_per_s:
            args += ["--fault-bandwidth-limit", f"{f.bandwidth_bytes_per_s:g}"]
        return args

    def _spawn_client(self, spec: ClientSpec, address: str) -> Child:
        args = ["client", "--coordinator", address, "--client-id", str(spec.client_id), "--tier", str(spec.tier),
                "--helper-fraction", str(spec.helper_fraction), "--helper-rotation-interval",
                str(spec.rotation_interval), "--threads", str(self.plan.threads_per_client),
                "--device", self.plan.device]
        return self._spawn(f"client-{spec.client_id}", "client", spec.client_id, args,
                           f"client-{spec.client_id}.log", self.plan.threads_per_client)

    def _wait_ready(self, coordinator: Child, timeout_s: float = 60.0) -> dict[str, Any]:
        ready_file = self.plan.run_dir / READY_FILE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready_file.exists():
                return json.loads(ready_file.read_text())
            code = coordinator.proc.poll()
            if code is not None:
                reason = _last_error_line(coordinator.log_path) or f"exit code {code}"
                cls = ConfigError if code == 2 else RunFailedError
                raise cls(f"coordinator failed to start: {reason}")
            time.sleep(0.05)
        raise RunFailedError(f"coordinator did not become ready within {timeout_s:.0f} s "
                             f"(see {coordinator.log_path})")

    # ------------------------------------------------------------------ running
    def prepare_run_dir(self) -> None:
        p = self.plan
        p.run_dir.mkdir(parents=True, exist_ok=True)
        token_path = p.run_dir / TOKEN_FILE
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        for stale in (READY_FILE, SUMMARY_FILE):
            (p.run_dir / stale).unlink(missing_ok=True)
        header = f"# resolved by: {p.command_line}\n" if p.command_line else ""
        (p.run_dir / "config.yaml").write_text(header + dump_yaml(p.config.to_dict()))

    def request_stop(self, reason: str) -> None:
        """Ask for a clean stop (status interrupted). Before the coordinator is ready (its signal
        handlers installed) the request is held, and sent as soon as it is."""
        self.stop_requested = reason
        self._forward_stop()

    def _forward_stop(self) -> None:
        coordinator = self.children.get("coordinator")
        if (self.stop_requested and not self.stop_sent and self.coordinator_ready and coordinator is not None
                and coordinator.proc.poll() is None):
            coordinator.proc.send_signal(signal.SIGTERM)
            self.stop_sent = True

    def toggle_pause(self) -> None:
        """Pause or resume the run at the next step boundary (the coordinator acts on SIGUSR1)."""
        coordinator = self.children.get("coordinator")
        if self.coordinator_ready and coordinator is not None and coordinator.proc.poll() is None:
            coordinator.proc.send_signal(signal.SIGUSR1)

    def run(self) -> int:
        """Run to the end; returns the coordinator's exit code (0, 1 or 130)."""
        p = self.plan
        listener = listen_socket(p.bind, p.server_port)
        self.prepare_run_dir()
        self.events = EventWriter(p.run_dir / "events.jsonl", run_id=p.config.run_id, role="launcher")
        tail = EventTail(p.run_dir / "events.jsonl")
        tail._offset = (p.run_dir / "events.jsonl").stat().st_size  # only this run's events
        started = time.monotonic()
        interrupted = False
        try:
            self.events.emit("launch", log=False, name=p.run_dir.name, num_clients=len(p.clients),
                             tiers=[c.tier for c in p.clients], helper_fractions=[c.helper_fraction for c in p.clients],
                             sync=p.sync, total_steps=p.config.timing.total_steps, command_line=p.command_line)
            coordinator = self._spawn("coordinator", "coordinator", None,
                                      self._coordinator_args(listener.fileno()), "coordinator.log", 1,
                                      pass_fds=(listener.fileno(),))
            port = listener.getsockname()[1]
            listener.close()  # the coordinator holds it now
            address = f"{'127.0.0.1' if p.bind in ('0.0.0.0', '') else p.bind}:{port}"
            for spec in p.clients:  # they queue in the listen backlog until the coordinator accepts
                self._spawn_client(spec, address)
            self._wait_ready(coordinator)
            self.coordinator_ready = True
            self._forward_stop()
            next_kill = time.monotonic() + p.faults.random_kill_interval_s if p.faults.random_kill_num else None
            while coordinator.proc.poll() is None:
                for event in tail.poll():
                    self._note(event)
                    self.on_event(event)
                now = time.monotonic()
                if p.exit_after_s is not None and now - started >= p.exit_after_s and not self.stop_requested:
                    self.request_stop(f"--exit-after-secs {p.exit_after_s:g} reached")
                if next_kill is not None and now >= next_kill and not self.run_ending:
                    self._random_kill()
                    next_kill = now + p.faults.random_kill_interval_s
                self._restart_due(address)
                time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted = True
            self.request_stop("Ctrl-C")
        finally:
            code = self._shutdown(interrupted)
            for event in tail.poll():
                self.on_event(event)
        return code

    def _note(self, event: dict[str, Any]) -> None:
        if event.get("event") == "run_finished" or (event.get("event") == "state"
                                                    and event.get("new") in ("Cooldown", "Finished")):
            self.run_ending = True

    def _random_kill(self) -> None:
        f = self.plan.faults
        eligible = [c for c in self.children.values()
                    if c.role == "client" and c.proc.poll() is None
                    and (not f.allowed_to_kill or c.client_id in f.allowed_to_kill)]
        for child in self.rng.sample(eligible, min(f.random_kill_num, len(eligible))):
            child.proc.kill()
            child.proc.wait()
            child.kills += 1
            self.fault_counts["kills"] += 1
            self.events.emit("fault_kill", client_id=child.client_id, pid=child.proc.pid, signal="SIGKILL")
            self.pending_restarts.append((time.monotonic() + f.kill_restart_delay_s, child.client_id))

    def _restart_due(self, address: str) -> None:
        if self.run_ending:
            self.pending_restarts.clear()
            return
        now = time.monotonic()
        due = [cid for t, cid in self.pending_restarts if t <= now]
        self.pending_restarts = [(t, cid) for t, cid in self.pending_restarts if t > now]
        specs = {s.client_id: s for s in self.plan.clients}
        for cid in due:
            child = self._spawn_client(specs[cid], address)
            child.restarts += 1
            self.fault_counts["restarts"] += 1
            self.events.emit("client_restarted", client_id=cid, pid=child.proc.pid)

    def _shutdown(self, interrupted: bool) -> int:
        """Stop everything: coordinator first (it tells clients), then anything still alive."""
        coordinator = self.children.get("coordinator")
        if coordinator is not None:
            if self.stop_requested and not self.stop_sent and coordinator.proc.poll() is None:
                coordinator.proc.terminate()  # stopped before it was ready: nothing to save yet
            try:
                code = coordinator.proc.wait(timeout=30 if self.stop_requested else 5)
            except subprocess.TimeoutExpired:
                coordinator.proc.kill()
                code = coordinator.proc.wait()
        else:
            code = 1
        clients = [c for c in self.children.values() if c.role == "client"]
        deadline = time.monotonic() + 5.0
        for c in clients:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children.values():
            _kill_tree(c.proc)
        self._amend_summary()
        if self.events is not None:
            self.events.close()
        if interrupted or self.stop_requested:
            return 130 if code in (0, 130, -signal.SIGTERM) else code
        return code if code >= 0 else 1

    def _amend_summary(self) -> None:
        """Add what only the launcher knows: client exit codes, kills and restarts."""
        path = self.plan.run_dir / SUMMARY_FILE
        coordinator = self.children.get("coordinator")
        if not path.exists():
            # The coordinator died before writing one (e.g. SIGKILL): record that much.
            code = coordinator.proc.returncode if coordinator is not None else None
            reason = (f"coordinator exited with code {code} without a summary" if code is None or code >= 0
                      else f"coordinator killed by signal {signal.Signals(-code).name}")
            status = "interrupted" if self.stop_requested else "failed"
            if self.stop_requested:
                reason = f"stopped before the run started ({self.stop_requested})"
            summary = {"run_id": self.plan.config.run_id, "name": self.plan.run_dir.name, "status": status,
                       "reason": reason, "steps_completed": None, "total_steps": self.plan.config.timing.total_steps,
                       "clients": {}}
            self.events.emit("run_finished", status=status, reason=reason, log=False)
        else:
            summary = json.loads(path.read_text())
        for c in self.children.values():
            if c.role != "client":
                continue
            entry = summary.setdefault("clients", {}).setdefault(str(c.client_id), {})
            entry["exit_code"] = c.proc.returncode
            entry["kills"] = c.kills
            entry["restarts"] = c.restarts
        summary["faults"] = {**self.fault_counts, **self.plan.faults.network()}
        if self.stop_requested and summary.get("status") == "interrupted":
            summary["reason"] = f"{summary.get('reason')} ({self.stop_requested})"
        write_json_atomic(path, summary)


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _last_error_line(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1].strip() if lines else None

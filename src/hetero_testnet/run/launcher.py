"""Process supervision for `testnet start`: one coordinator and N clients, and nothing left behind.

The launcher spawns exactly the commands a user could run by hand (`testnet coordinator`,
`testnet client`, as `LaunchPlan` spells them) through `run.processes`: each in its own session
(so a terminal Ctrl-C reaches only the launcher, which then stops the run cleanly) and with
PR_SET_PDEATHSIG (so they die with the launcher even if it is SIGKILLed). It hands the per-run
token over in the environment, never on a command line.

Guarantee: when `Launcher.run` returns or raises, every process it started, and their children,
has exited. Ctrl-C / `exit_after_s` ask the coordinator to stop (status interrupted); a crash of
the coordinator stops the clients; a client crash is the coordinator's business (fault tolerance),
except when every client exits before any joined (RunFailedError: nobody can ever come).
Clients beyond the cores the coordinator leaves idle start once it is ready (`_start_processes`).

Faults: `--random-kill-*` SIGKILLs eligible clients every interval and restarts them with the
same client id after a delay; every kill and restart is an event in `events.jsonl`. Eligible: a
client whose current process joined (a `client_joined` with its pid) and then trained a round;
killing processes still starting only starved the run (on 2 loaded cores a client killed every
5-6 s was killed again before its first round, run after run). Kills aimed at formation and the
state broadcast are the test hooks' job (`run/testhooks.py`). No kill comes once only the last
round is left (one racing the switch to Cooldown left nobody to validate or save the model).
Crash-only: a client exiting with `RESTART_EXIT_CODES` (75: it gave up on a stuck process group;
76: a test hook killed it) is restarted the same way.

Engines (`run/engine.py`): clients run as the launcher's subprocesses (`--engine local`) or as Ray
actors (`--engine ray`). Under Ray a kill is `ray.kill` and Ray restarts the actor itself: the
launcher records the restart when the new client reports (`_adopt`), not when it asks for one.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetero_testnet.config import dump_yaml
from hetero_testnet.errors import ConfigError, HeteroTestnetError, RunFailedError
from hetero_testnet.events import Event, EventTail, EventWriter, RunState
from hetero_testnet.run.engine import client_env_vars, make_engine
from hetero_testnet.run.plan import ClientSpec, LaunchPlan
from hetero_testnet.run.profiles import EMULATION
from hetero_testnet.run.processes import Child, kill_tree, last_error_line, spawn_supervised, stop, wait_for_file
from hetero_testnet.run.sockets import bind_listening
from hetero_testnet.rundir import RunDir, read_json, write_json_atomic

READY_TIMEOUT_S = 60.0
"""How long the coordinator may take to listen (write its ready file) before the run fails."""
COORDINATOR_STOP_WAIT_S = 30.0
"""After a stop request: time for the coordinator to finish cleanly (cooldown, summary) before SIGKILL."""
COORDINATOR_EXIT_WAIT_S = 5.0
"""Without a stop request: time for an exiting coordinator to go before SIGKILL."""
CLIENT_EXIT_WAIT_S = 5.0
"""After the coordinator: time for the clients to leave by themselves (it told them to) before SIGKILL."""
RESTART_EXIT_CODES = {75: "stuck past a hard deadline", 76: "killed by a test hook"}
"""Client exit codes that ask to be restarted (`run/client_waits.EXIT_STUCK`, `run/testhooks.EXIT_TEST_KILL`)."""
_ENDING_STATES = frozenset(state.value for state in RunState if state.is_ending)
"""`state` events whose `new` state ends the run (Cooldown, Finished): no more kills or restarts."""


def listen_socket(host: str, port: int) -> socket.socket:
    """The coordinator's listening socket, which it inherits; clients can connect at once."""
    try:
        return bind_listening(host, port, inheritable=True)
    except OSError as e:
        raise ConfigError(f"port {port} on {host} is in use or unavailable ({e.strerror})",
                          hint="pass --server-port 0 to use any free port") from e


class Launcher:
    def __init__(self, plan: LaunchPlan, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.plan = plan
        self.files = RunDir(plan.run_dir)
        self.on_event = on_event or (lambda e: None)
        self.children: dict[str, Child] = {}
        self.token = secrets.token_hex(32)
        self.stop_requested: str | None = None
        self.stop_sent = False
        self.coordinator_ready = False
        self.run_ending = False
        """Set once the run is in Cooldown/Finished: no more fault kills or restarts."""
        self.last_round = False
        """Set once every step but the last is committed: no more fault kills (module docstring)."""
        self.rng = random.Random(plan.faults.seed)
        self.pending_restarts: list[tuple[float, int]] = []
        self.events: EventWriter | None = None
        self.fault_counts = {"kills": 0, "restarts": 0}
        self.failure: str | None = None
        """Why the launcher stopped the run as failed (it raises RunFailedError once all is stopped)."""
        self.anyone_joined = False
        self.engine = make_engine(plan, self.token)

    # ------------------------------------------------------------------ spawning
    def _env(self, threads: int) -> dict[str, str]:
        return {**os.environ, **client_env_vars(self.plan, self.token, threads)}

    def _spawn(self, key: str, role: str, client_id: int | None, args: list[str], log_path: Path,
               threads: int, pass_fds: tuple[int, ...] = (), spec: ClientSpec | None = None) -> Child:
        if spec is not None:  # a client: the engine starts it (Ray: with only the run's variables)
            env = client_env_vars(self.plan, self.token, threads) if self.engine.restarts_itself else self._env(threads)
            proc = self._engine(self.engine.start, spec, args, log_path, env)
        else:
            proc = spawn_supervised([sys.executable, "-m", "hetero_testnet", *args], log_path=log_path,
                                    env=self._env(threads), pass_fds=pass_fds)
        child = self.children.get(key)
        if child is None:
            child = Child(role, client_id, proc, log_path)
            self.children[key] = child
        else:
            child.proc = proc
            child.restart_scheduled = child.joined = child.trained = False
        if proc.pid is not None:  # an engine's client that is still starting is recorded when adopted
            self.events.emit(Event.PROCESS_STARTED, client_id=client_id, role_started=role, pid=proc.pid, log=False)
        return child

    def _engine(self, call: Callable[..., Any], *args: Any) -> Any:
        """An engine call; its error (a client that cannot start) stops the run, then propagates."""
        try:
            return call(*args)
        except HeteroTestnetError as e:
            self.request_stop(str(e))
            raise

    def _adopt(self, child: Child, wait: bool = False) -> None:
        """Record a client the engine started by itself (Ray: a restarted actor's new client)."""
        pid = self._engine(self.engine.adopt, child.proc, wait)
        if pid is None:
            return
        child.restart_scheduled = child.joined = child.trained = False
        self.events.emit(Event.PROCESS_STARTED, client_id=child.client_id, role_started="client", pid=pid, log=False)
        if child.proc.incarnations > 1:
            child.restarts += 1
            self.fault_counts["restarts"] += 1
            self.events.emit(Event.CLIENT_RESTARTED, client_id=child.client_id, pid=pid)

    def _spawn_client(self, spec: ClientSpec, address: str) -> Child:
        return self._spawn(f"client-{spec.client_id}", "client", spec.client_id, self.plan.client_args(spec, address),
                           self.files.client_log(spec.client_id), self.plan.threads_per_client, spec=spec)

    def _wait_ready(self, coordinator: Child, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        if wait_for_file(self.files.ready, coordinator.proc, timeout_s):
            return read_json(self.files.ready)
        code = coordinator.proc.poll()
        if code is None:
            raise RunFailedError(f"coordinator did not become ready within {timeout_s:.0f} s "
                                 f"(see {coordinator.log_path})")
        reason = last_error_line(coordinator.log_path) or f"exit code {code}"
        raise (ConfigError if code == 2 else RunFailedError)(f"coordinator failed to start: {reason}")

    # ------------------------------------------------------------------ running
    def prepare_run_dir(self) -> None:
        p = self.plan
        p.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.files.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        for stale in (self.files.ready, self.files.summary, self.files.stop_request):
            stale.unlink(missing_ok=True)
        header = f"# resolved by: {p.command_line}\n" if p.command_line else ""
        self.files.config.write_text(header + dump_yaml(p.config.to_dict()))

    def request_stop(self, reason: str) -> None:
        """Ask for a clean stop (status interrupted). Before the coordinator is ready (its signal
        handlers installed) the request is held, and sent as soon as it is."""
        self.stop_requested = reason
        self._forward_stop()

    def _forward_stop(self) -> None:
        coordinator = self.children.get("coordinator")
        if (self.stop_requested and not self.stop_sent and self.coordinator_ready and coordinator is not None
                and coordinator.proc.poll() is None):
            try:  # the coordinator reads why (else its summary could only name the signal)
                write_json_atomic(self.files.stop_request, {"reason": self.stop_requested})
            except OSError:
                pass
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
        self.engine.connect()  # (Ray) before anything is written: a cluster it cannot use leaves no run behind
        try:
            listener = listen_socket(p.bind, p.server_port)
        except ConfigError:
            self.engine.close()
            raise
        self.prepare_run_dir()
        self.events = EventWriter(self.files.events, run_id=p.config.run_id, role="launcher")
        tail = EventTail(self.files.events, from_end=True)  # only this run's events
        interrupted = False
        try:
            self.events.emit(Event.LAUNCH, log=False, name=p.run_dir.name, num_clients=len(p.clients),
                             tiers=[c.tier for c in p.clients], helper_fractions=[c.helper_fraction for c in p.clients],
                             sync=p.sync, total_steps=p.config.timing.total_steps, command_line=p.command_line)
            coordinator, address = self._start_processes(listener)
            self._supervise(coordinator, tail, address)
        except KeyboardInterrupt:
            interrupted = True
            self.request_stop("Ctrl-C")
        finally:
            code = self._shutdown(interrupted)
            for event in tail.poll():
                self.on_event(event)
        if self.failure:
            raise RunFailedError(self.failure)
        return code

    def _start_processes(self, listener: socket.socket) -> tuple[Child, str]:
        """The coordinator (holding `listener`) and the clients; returns it and its address. Clients start
        beside it only on cores it leaves idle (one fewer than the cores), the rest once it is ready:
        32 started beside it made its torch import share 2 cores 33 ways (past READY_TIMEOUT_S)."""
        p = self.plan
        coordinator = self._spawn("coordinator", "coordinator", None, p.coordinator_args(listener.fileno()),
                                  self.files.coordinator_log, 1, pass_fds=(listener.fileno(),))
        port = listener.getsockname()[1]
        listener.close()  # the coordinator holds it now; clients queue in its backlog until it accepts
        address = self.engine.client_address(p.bind, port, p.advertise_host)
        early = max(0, len(os.sched_getaffinity(0)) - 1)
        for spec in p.clients[:early]:
            self._spawn_client(spec, address)
        self._wait_ready(coordinator)
        self.coordinator_ready = True
        self._forward_stop()
        for spec in p.clients[early:]:
            self._spawn_client(spec, address)
        return coordinator, address

    def _supervise(self, coordinator: Child, tail: EventTail, address: str) -> None:
        """Until the coordinator exits: pass events on, stop at --exit-after-secs, kill and restart."""
        p = self.plan
        started = time.monotonic()
        next_kill = time.monotonic() + p.faults.random_kill_interval_s if p.faults.random_kill_num else None
        while coordinator.proc.poll() is None:
            for event in tail.poll():
                self._note(event)
                self.on_event(event)
            now = time.monotonic()
            if p.exit_after_s is not None and now - started >= p.exit_after_s and not self.stop_requested:
                self.request_stop(f"--exit-after-secs {p.exit_after_s:g} reached")
            if next_kill is not None and now >= next_kill and not (self.run_ending or self.last_round):
                self._random_kill()
                next_kill = now + p.faults.random_kill_interval_s
            self._restart_crashed()
            self._restart_due(address)
            self._fail_if_no_client_can_join()
            for child in [c for c in self.children.values() if c.role == "client"]:
                self._adopt(child)
            self.engine.pump()
            time.sleep(0.1)

    def _note(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == Event.RUN_FINISHED or (kind == Event.STATE and event.get("new") in _ENDING_STATES):
            self.run_ending = True
        if kind == Event.STEP_COMMITTED and isinstance(event.get("step"), int):
            inner = int(event.get("inner_steps") or 1)  # the next round is at most as long (diloco: H)
            self.last_round = event["step"] + 2 * inner >= self.plan.config.timing.total_steps
        self.anyone_joined = self.anyone_joined or kind == Event.CLIENT_JOINED
        if kind == Event.CLIENT_JOINED and (child := self.children.get(f"client-{event.get('client_id')}")):
            if child.proc.pid != event.get("pid"):
                self._adopt(child, wait=True)  # an engine's client may join before its pid is known
            child.joined = child.joined or child.proc.pid == event.get("pid")
        if kind == Event.CLIENT_STEP:
            child = self.children.get(f"client-{event.get('client_id')}")
            if child is not None and child.joined:
                child.trained = True

    def _fail_if_no_client_can_join(self) -> None:
        """Stop the run (failed) when every client exited before any joined: nobody can ever come
        (the coordinator's first wait counts from the first connection, `run/inbox.py`)."""
        clients = [c for c in self.children.values() if c.role == "client"]
        if self.stop_requested or self.anyone_joined or self.pending_restarts or any(
                c.proc.poll() is None for c in clients):
            return
        why = last_error_line(clients[0].log_path) or f"exit code {clients[0].proc.poll()}"
        self.failure = f"every client exited before joining (client {clients[0].client_id}: {why})"
        self.request_stop(self.failure)

    def _random_kill(self) -> None:
        f = self.plan.faults
        eligible = [c for c in self.children.values()
                    if c.role == "client" and c.proc.poll() is None and c.trained
                    and (not f.allowed_to_kill or c.client_id in f.allowed_to_kill)]
        for child in self.rng.sample(eligible, min(f.random_kill_num, len(eligible))):
            self.engine.kill(child.proc)
            child.kills += 1
            self.fault_counts["kills"] += 1
            self.events.emit(Event.FAULT_KILL, client_id=child.client_id, pid=child.proc.pid,
                             signal=self.engine.kill_signal)
            if not self.engine.restarts_itself:  # Ray restarts the actor (after the delay, `run/ray_actor.py`)
                self.pending_restarts.append((time.monotonic() + f.kill_restart_delay_s, child.client_id))

    def _restart_crashed(self) -> None:
        """Schedule the restart of clients that exited asking for one (crash-only, RESTART_EXIT_CODES)."""
        pending = {cid for _, cid in self.pending_restarts}
        for child in self.children.values():
            code = child.proc.poll()
            if child.role == "client" and code in RESTART_EXIT_CODES and child.client_id not in pending \
                    and not self.run_ending and not child.restart_scheduled:
                child.restart_scheduled = True
                self.events.emit(Event.CLIENT_EXITED, client_id=child.client_id, pid=child.proc.pid, exit_code=code,
                                 reason=RESTART_EXIT_CODES[code])
                self.pending_restarts.append((time.monotonic() + self.plan.faults.kill_restart_delay_s,
                                              child.client_id))

    def _restart_due(self, address: str) -> None:
        if self.run_ending:
            self.pending_restarts.clear()
            return
        now = time.monotonic()
        due = [cid for t, cid in self.pending_restarts if t <= now]
        self.pending_restarts = [(t, cid) for t, cid in self.pending_restarts if t > now]
        specs = {s.client_id: s for s in self.plan.clients}
        for cid in due:
            if self.engine.restarts_itself:  # recorded when the new client reports (`_adopt`)
                self.engine.restart(self.children[f"client-{cid}"].proc)
                continue
            child = self._spawn_client(specs[cid], address)
            child.restarts += 1
            self.fault_counts["restarts"] += 1
            self.events.emit(Event.CLIENT_RESTARTED, client_id=cid, pid=child.proc.pid)

    def _shutdown(self, interrupted: bool) -> int:
        """Stop everything: coordinator first (it tells clients), then anything still alive."""
        coordinator = self.children.get("coordinator")
        if coordinator is not None:
            # Stopped before it was ready (no stop sent yet): nothing to save, so SIGTERM it now.
            first = signal.SIGTERM if self.stop_requested and not self.stop_sent else None
            wait_s = COORDINATOR_STOP_WAIT_S if self.stop_requested else COORDINATOR_EXIT_WAIT_S
            code = stop(coordinator.proc, [(first, wait_s), (signal.SIGKILL, COORDINATOR_EXIT_WAIT_S)])
        else:
            code = 1
        try:
            self.engine.finish([c.proc for c in self.children.values() if c.role == "client"], CLIENT_EXIT_WAIT_S)
        finally:
            kill_tree([c.proc for c in self.children.values() if c.role != "client"])
            self.engine.close()
        self._amend_summary()
        if self.events is not None:
            self.events.close()
        if interrupted or self.stop_requested:
            return 130 if code in (0, 130, -signal.SIGTERM) else code
        return code if code >= 0 else 1

    def _amend_summary(self) -> None:
        """Add what only the launcher knows: client exit codes, kills and restarts."""
        path = self.files.summary
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
            self.events.emit(Event.RUN_FINISHED, status=status, reason=reason, log=False)
        else:
            summary = read_json(path)
        for c in self.children.values():
            if c.role != "client":
                continue
            entry = summary.setdefault("clients", {}).setdefault(str(c.client_id), {})
            entry.update(exit_code=c.proc.returncode, kills=c.kills, restarts=c.restarts,
                         **self.engine.describe(c.proc))
        for spec in self.plan.clients:  # what the plan gave each client, beside what the run measured
            entry = summary.setdefault("clients", {}).setdefault(str(spec.client_id), {})
            entry.update(profile=entry.get("profile") or spec.profile.to_dict(),
                         emulation=EMULATION if spec.profile.emulated else None,
                         **({"tier_reason": spec.tier_reason} if spec.tier_reason is not None else {}))
        summary["faults"] = {**self.fault_counts, **self.plan.faults.network()}
        if self.plan.faults.packet_loss:  # this launcher has no netem: the loss is the exchange's emulation
            summary["faults"]["packet_loss_mode"] = "emulated (one retransmission round trip per lost packet)"
        if (self.stop_requested and summary.get("status") == "interrupted"
                and self.stop_requested not in str(summary.get("reason"))):
            summary["reason"] = f"{summary.get('reason')} ({self.stop_requested})"
        write_json_atomic(path, summary)

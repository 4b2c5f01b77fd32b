"""`--engine ray`: every client is a Ray core actor (`run/ray_actor.py`), the coordinator stays a
process of the launcher on this machine (the head), as in local mode.

Imported only when `--engine ray` is used; Ray itself is imported in `connect`. What it does:

- placement: each actor asks for its tier's resources (`--client-resources`, `run/cluster.py`),
  so Ray puts tier-0 clients on the nodes that offer, e.g., a GPU; a request that no node can ever
  satisfy is refused up front instead of waiting forever;
- restarts: actors have `max_restarts=-1`; a fault kill is `ray.kill(actor, no_restart=False)`, Ray
  restarts the actor, whose `__init__` starts the client again under the same `--client-id`, and
  the client rejoins. The launcher adopts the new pid when the actor reports it (`adopt`);
- token: only in the actors' runtime environment (`env_vars`), never an argument;
- multi-host hygiene: on a cluster of several nodes the coordinator must listen where they can
  reach it (`--bind 0.0.0.0 --advertise-host ...`), checked here; `--gloo-ifname` goes into every
  actor's environment; the clients' data is checked against the head's manifest;
- logs: remote actors' client logs are pulled into the head's `client-K.log` (`pump`).

Failure contract: `connect` raises ConfigError (one line) when Ray is missing, no cluster answers
at `--address`, or the cluster cannot host the clients as asked; an actor that cannot start its
client (different data, say) surfaces as ConfigError from `adopt` with the actor's reason.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetero_testnet.errors import ConfigError
from hetero_testnet.run.cluster import INSTALL_RAY, LOOPBACK, ActorResources
from hetero_testnet.run.plan import ClientSpec, LaunchPlan
from hetero_testnet.run.ray_actor import ClientActor

STATUS_EVERY_S = 0.5
"""How often the launcher asks each actor how its client is doing (non-blocking)."""
LOG_EVERY_S = 1.0
"""How often remote actors' new log bytes are pulled to the head."""
ADOPT_WAIT_S = 10.0
"""Longest blocking status call (when a join names a pid the launcher has not seen yet)."""
NAMESPACE = "hetero-testnet"
FINAL_LOG_PULLS = 64
"""At the end, pull a remote log until it is complete or this many chunks (64 MiB) came over."""
REACH_TIMEOUT_S = 5.0
"""How long the cluster's address may take to accept a TCP connection before `connect` gives up."""


class RayClient:
    """The launcher's view of one client actor, shaped like the Popen it replaces in local mode."""

    def __init__(self, actor: Any, client_id: int, log_path: Path) -> None:
        self.actor = actor
        self.client_id = client_id
        self.log_path = log_path
        self.pid: int | None = None
        """The adopted client process (None until the actor first reports one)."""
        self.returncode: int | None = None
        self.latest: dict[str, Any] | None = None
        self.killed_pid: int | None = None
        self.incarnations = 0
        self.log_offset = 0
        self._status_ref: Any = None
        self._status_at = 0.0
        self._log_ref: Any = None
        self._log_at = 0.0

    def _take(self, status: dict[str, Any]) -> None:
        if status.get("error"):
            self.latest = status
            return
        if status.get("pid") is None or status["pid"] == self.killed_pid:
            return  # an answer of the incarnation that was just killed
        self.latest = status
        if status["pid"] == self.pid:
            self.returncode = status.get("exit_code")

    def refresh(self, block_s: float = 0.0) -> None:
        """Take a finished status answer; ask again when due (or now, waiting up to `block_s`)."""
        import ray

        if block_s or (self._status_ref is None and time.monotonic() - self._status_at >= STATUS_EVERY_S):
            self._status_ref, self._status_at = self.actor.status.remote(), time.monotonic()
        if self._status_ref is None:
            return
        ready, _ = ray.wait([self._status_ref], timeout=block_s)
        if ready:
            ref, self._status_ref = self._status_ref, None
            try:
                self._take(ray.get(ref))
            except ray.exceptions.RayError:
                pass  # the actor is restarting or gone: ask again later

    def poll(self) -> int | None:
        self.refresh()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        """The fault: Ray kills the actor (and with it its client) and restarts it."""
        import ray

        ray.kill(self.actor, no_restart=False)
        self.killed_pid, self.returncode, self._status_ref = self.pid, -9, None

    def take_incarnation(self) -> int | None:
        """The pid of a client this actor started that is not adopted yet (ConfigError: it cannot start)."""
        s = self.latest
        if s is not None and s.get("error"):
            raise ConfigError(s["error"])
        if s is None or s["pid"] in (self.pid, self.killed_pid):
            return None
        self.pid, self.returncode = s["pid"], s.get("exit_code")
        self.incarnations += 1
        return self.pid

    def pull_log(self, block_s: float = 0.0) -> int:
        """Append the remote client's new log bytes to the head's log (nothing for a client on the head);
        returns how many arrived."""
        import ray

        if not (self.latest or {}).get("remote_log"):
            return 0
        if self._log_ref is None and (block_s or time.monotonic() - self._log_at >= LOG_EVERY_S):
            self._log_ref, self._log_at = self.actor.read_log.remote(self.log_offset), time.monotonic()
        if self._log_ref is None or not ray.wait([self._log_ref], timeout=block_s)[0]:
            return 0
        ref, self._log_ref = self._log_ref, None
        try:
            data = ray.get(ref)
        except ray.exceptions.RayError:
            return 0
        if data:
            with open(self.log_path, "ab") as f:
                f.write(data)
            self.log_offset += len(data)
        return len(data)


class RayEngine:
    name = "ray"
    restarts_itself = True
    kill_signal = "ray.kill"

    def __init__(self, plan: LaunchPlan, token: str) -> None:
        self.plan = plan
        self.token = token
        self.head_node = ""
        self.node_ip = "127.0.0.1"
        self.actor_cls: Any = None
        self.shipped: Any = None
        self.handles: list[RayClient] = []

    def connect(self) -> None:
        # Ray's core worker would install a C++ SIGTERM handler in this process that aborts it (exit 134,
        # no summary) instead of letting `testnet start` stop the run cleanly; read when Ray is imported.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        try:
            import ray
        except ImportError:
            raise ConfigError(f"--engine ray needs Ray, which is not installed: {INSTALL_RAY}") from None
        address = self.plan.engine.address
        check_reachable(address, os.environ.get("RAY_ADDRESS"))
        previous = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"no Ray cluster at --address {address} ({reason})",
                              hint="start one with `ray start --head`, or see docs/cluster.md") from None
        finally:  # ray.init replaces the SIGTERM handler with sys.exit(15): keep the launcher's clean stop
            if threading.current_thread() is threading.main_thread() and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        try:
            self._prepare(ray, client_mode=address.startswith("ray://"),
                          remote_driver=address.startswith("ray://") and _host(address) not in LOOPBACK)
        except BaseException:
            ray.shutdown()
            raise

    def _prepare(self, ray: Any, *, client_mode: bool, remote_driver: bool) -> None:
        """Where the head is, whether the cluster can host the run, the actor class, shipped shards."""
        self.head_node = "" if client_mode else ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address() if not client_mode else self.node_ip
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        check_cluster(self.plan, [dict(n.get("Resources", {})) for n in nodes], remote_driver=remote_driver)
        self.actor_cls = ray.remote(ClientActor)
        if self.plan.engine.ship_data and self.plan.engine.manifest is not None:
            from hetero_testnet.data.fingerprint import DataManifest, shipped_files

            self.shipped = ray.put(shipped_files(DataManifest.from_dict(self.plan.engine.manifest)))

    def client_address(self, bind: str, port: int, advertise_host: str | None) -> str:
        if advertise_host:
            return f"{advertise_host}:{port}"
        return f"{self.node_ip if bind in ('0.0.0.0', '', '::') else bind}:{port}"

    def start(self, spec: ClientSpec, args: list[str], log_path: Path, env: dict[str, str]) -> RayClient:
        p = self.plan
        job = {"client_id": spec.client_id, "argv": list(args), "log_path": str(log_path.resolve()),
               "run_name": p.run_dir.name, "head_node": self.head_node,
               "restart_delay_s": p.faults.kill_restart_delay_s, "manifest": p.engine.manifest,
               "data_dir": p.engine.data_dir}
        options = p.engine.resources_for(spec.tier).ray_options(p.threads_per_client)
        name = f"{p.run_dir.name}-client-{spec.client_id}"
        try:
            actor = self.actor_cls.options(name=name, max_restarts=-1, max_task_retries=0,
                                           runtime_env={"env_vars": dict(env)}, **options).remote(job, self.shipped)
        except ValueError as e:  # Ray's answer to a name already taken in the namespace
            raise ConfigError(f"cannot start actor {name} in Ray namespace {NAMESPACE} ({e})",
                              hint="another run of this --name is on the cluster: choose another --name") from None
        handle = RayClient(actor, spec.client_id, log_path)
        self.handles.append(handle)
        return handle

    def kill(self, handle: RayClient) -> None:
        handle.kill()

    def restart(self, handle: RayClient) -> None:
        handle.actor.start_client.remote()  # the new pid arrives with the next status answer

    def adopt(self, handle: RayClient, wait: bool = False) -> int | None:
        handle.refresh(block_s=ADOPT_WAIT_S if wait else 0.0)
        return handle.take_incarnation()

    def pump(self) -> None:
        for handle in self.handles:
            handle.pull_log()

    def finish(self, handles: Sequence[RayClient], wait_s: float) -> None:
        """Clients leave by themselves (up to `wait_s`), the rest are killed by their actors; then the
        last log bytes come over and the actors go (no restart)."""
        import ray

        stops = {h: h.actor.stop.remote(wait_s) for h in handles}
        for h, ref in stops.items():
            try:
                h._take(ray.get(ref, timeout=wait_s + 15))
                h.take_incarnation()
            except (ray.exceptions.RayError, ConfigError):
                pass
            try:  # the shutdown goes on whatever Ray answers (a cluster that went away, say)
                for _ in range(FINAL_LOG_PULLS):
                    if not h.pull_log(block_s=5.0):
                        break
                ray.kill(h.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def describe(self, handle: RayClient) -> dict[str, Any]:
        s = handle.latest or {}
        return {"engine": "ray", "host": s.get("host"), "node_id": s.get("node")}


def check_reachable(address: str, env_address: str | None = None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """ConfigError when nothing listens at the cluster's HOST:PORT (`--address`, or RAY_ADDRESS for
    `auto`): `ray.init` would retry for minutes. `auto` without RAY_ADDRESS is left to Ray, which
    answers at once when this machine runs no Ray."""
    target = env_address if address == "auto" else address
    if not target or target == "auto":
        return
    host, port = _host(target), _port(target)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {host}:{port} (--address {address}"
                          f"{f', RAY_ADDRESS={env_address}' if address == 'auto' else ''}: {e.strerror or e})",
                          hint="start one with `ray start --head`, or see docs/cluster.md") from None


def _host(address: str) -> str:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    return (host if sep and port.isdigit() else rest).strip("[]")


def _port(address: str) -> int:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() and not address.endswith("//") else 10001


def check_cluster(plan: LaunchPlan, nodes: list[dict[str, float]], *, remote_driver: bool = False) -> None:
    """ConfigError when the cluster cannot host the run as planned: a client whose resources no single
    node offers (Ray would wait forever), or the coordinator listening on loopback while the clients
    run elsewhere (several nodes, or a `ray://` cluster on another machine: `remote_driver`)."""
    if not nodes:
        raise ConfigError("the Ray cluster has no live node")
    for spec in plan.clients:
        wanted = _request(plan.engine.resources_for(spec.tier), plan.threads_per_client)
        if not any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes):
            asked = "+".join(f"{k}:{v:g}" for k, v in wanted.items())
            raise ConfigError(f"client {spec.client_id} (tier {spec.tier}) asks Ray for {asked}, which no node of "
                              f"the cluster offers", hint="change --client-resources or --threads, or add nodes")
    remote = len(nodes) > 1 or remote_driver
    if remote and plan.bind in LOOPBACK and not plan.advertise_host:
        raise ConfigError(f"the coordinator listens on {plan.bind} only, which the Ray cluster's other nodes cannot "
                          "reach", hint="pass --bind 0.0.0.0 --advertise-host <this machine's address>")


def _request(resources: ActorResources, threads: int) -> dict[str, float]:
    opts = resources.ray_options(threads)
    wanted = {"CPU": float(opts["num_cpus"])}
    if opts.get("num_gpus"):
        wanted["GPU"] = float(opts["num_gpus"])
    wanted.update(opts.get("resources", {}))
    return {k: v for k, v in wanted.items() if v > 0}

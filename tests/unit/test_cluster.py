"""`--engine ray` without a cluster: flag parsing and rules, the missing extra, the data manifest, what
an actor is asked to run (command line, environment, resources), and the actor itself run bare."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetero_testnet.errors import ConfigError, DataError
from hetero_testnet.run.cluster import (INSTALL_RAY, ActorResources, EnginePlan, check_address, parse_client_resources,
                                        plan_engine)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"
SAMPLE = ROOT / "data" / "sample"


# ----------------------------------------------------------------- --client-resources

def test_client_resources_map_tiers_to_cpus_gpus_and_custom_resources():
    got = parse_client_resources("tier0=GPU:1+CPU:4, tier1=CPU:2,tier2=edge:1+gpu:0.5")
    assert got[0] == ActorResources(num_cpus=4.0, num_gpus=1.0)
    assert got[1] == ActorResources(num_cpus=2.0)
    assert got[2] == ActorResources(num_gpus=0.5, custom={"edge": 1.0})
    assert got[2].ray_options(threads=3) == {"num_cpus": 3.0, "num_gpus": 0.5, "resources": {"edge": 1.0}}
    assert got[0].ray_options(threads=1) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert parse_client_resources(None) == {} and parse_client_resources(" ") == {}


@pytest.mark.parametrize("text, words", [
    ("tier0", "tierN=RESOURCE:AMOUNT"),
    ("client1=CPU:1", "tierN=RESOURCE:AMOUNT"),
    ("tier0=", "tierN=RESOURCE:AMOUNT"),
    ("tier0=GPU", "RESOURCE:AMOUNT joined by '+'"),
    ("tier0=GPU:x", "needs a number"),
    ("tier0=GPU:-1", "positive amount"),
    ("tier0=GPU:nan", "positive amount"),
    ("tier0=CPU:1+cpu:2", "names CPU twice"),
    ("tier0=CPU:1,tier0=GPU:1", "names tier0 twice"),
    ("tier0=bad name:1", "RESOURCE:AMOUNT"),
])
def test_bad_client_resources_are_one_line_naming_the_flag(text, words):
    with pytest.raises(ConfigError) as e:
        parse_client_resources(text)
    assert "--client-resources" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "head:6379", "ray://head:10001", "ray://head"])
def test_addresses_ray_accepts(address):
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["", "head", "head:port", "http://head:8265", "ray://", ":6379"])
def test_bad_addresses_are_refused(address):
    with pytest.raises(ConfigError, match="--address must be"):
        check_address(address)


# ----------------------------------------------------------------- plan_engine

def test_local_engine_refuses_ray_only_flags():
    assert plan_engine(engine="local", address=None, client_resources=None, data_dir=None, ship_data=False,
                       tiers=[0, 1]) == EnginePlan()
    with pytest.raises(ConfigError, match=r"--address, --client-resources only apply to --engine ray"):
        plan_engine(engine="local", address="auto", client_resources="tier0=CPU:1", data_dir=None, ship_data=False,
                    tiers=[0])
    with pytest.raises(ConfigError, match="--engine must be one of local, ray"):
        plan_engine(engine="k8s", address=None, client_resources=None, data_dir=None, ship_data=False, tiers=[0])


def test_missing_ray_is_one_line_naming_the_install_command(monkeypatch):
    from hetero_testnet.run import cluster

    monkeypatch.setattr(cluster, "ray_installed", lambda: False)
    with pytest.raises(ConfigError) as e:
        plan_engine(engine="ray", address=None, client_resources=None, data_dir=None, ship_data=False, tiers=[0])
    assert str(e.value) == f"--engine ray needs Ray, which is not installed: {INSTALL_RAY}"


def test_cli_without_the_extra_says_how_to_install_it(tmp_path):
    """The whole CLI with Ray made unimportable (`sys.modules['ray'] = None`, as if not installed)."""
    code = ("import sys; sys.modules['ray'] = None; from hetero_testnet.cli import main; "
            f"sys.argv = ['testnet', 'start', '--engine', 'ray', '--config-path', {str(TINY)!r}, '--num-clients', '2', "
            f"'--logs-dir', {str(tmp_path)!r}, '--headless']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: --engine ray needs Ray, which is not installed: {INSTALL_RAY}"
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_the_cli_starts_without_importing_ray():
    r = subprocess.run([sys.executable, "-c", "import sys, hetero_testnet.cli.run; print('ray' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.stdout.strip() == "False", r.stderr


def test_an_actor_supervising_a_client_does_not_load_torch_itself():
    """Each actor only starts and watches a process: its worker should not pay torch's import."""
    code = "import sys, hetero_testnet.run.ray_actor; print(sorted({'torch', 'numpy', 'ray'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stderr


def test_ray_plan_checks_tiers_data_flags_and_fingerprints_the_data(tiny_config, tmp_path, monkeypatch):
    from hetero_testnet.run import cluster

    monkeypatch.setattr(cluster, "ray_installed", lambda: True)
    kw = dict(engine="ray", address=None, client_resources=None, data_dir=None, ship_data=False, tiers=[0, 1, 1])
    with pytest.raises(ConfigError, match="names tier2, but the clients' tiers are 0,1"):
        plan_engine(**{**kw, "client_resources": "tier2=CPU:1"})
    with pytest.raises(ConfigError, match="--ship-data and --data-dir exclude each other"):
        plan_engine(**{**kw, "ship_data": True, "data_dir": tmp_path})
    plan = plan_engine(**{**kw, "client_resources": "tier0=CPU:2", "data_dir": tmp_path}, data=tiny_config.data)
    assert plan.is_ray and plan.address == "auto" and plan.data_dir == str(tmp_path)
    assert plan.resources_for(0).num_cpus == 2.0 and plan.resources_for(1) == ActorResources()
    names = [entry[0] for entry in plan.manifest["files"]["train"]]
    assert names == sorted(p.name for p in SAMPLE.glob("*_train_*.bin"))
    json.dumps(plan.manifest)  # plain data: it travels to the actors as such


# ----------------------------------------------------------------- data manifest

def _copy_sample(to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for p in SAMPLE.glob("*.bin"):
        (to / p.name).write_bytes(p.read_bytes())
    return to


def test_a_copy_of_the_data_passes_and_a_changed_or_missing_shard_is_named(tiny_config, tmp_path):
    from hetero_testnet.data.fingerprint import DataManifest, manifest_for, verify_copy

    manifest = DataManifest.from_dict(json.loads(json.dumps(manifest_for(tiny_config.data).to_dict())))
    assert manifest.digest == manifest_for(tiny_config.data).digest and manifest.total_bytes > 0
    verify_copy(manifest)  # the head's own paths
    copy = _copy_sample(tmp_path / "copy")
    verify_copy(manifest, copy)
    train = sorted(copy.glob("*_train_*.bin"))[0]
    blob = bytearray(train.read_bytes())
    blob[-1] ^= 1
    train.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=rf"train shard .*{train.name} differs from the head's \(sha256"):
        verify_copy(manifest, copy)
    train.unlink()
    with pytest.raises(DataError, match=rf"train shard {train.name} is on the head only"):
        verify_copy(manifest, copy)
    with pytest.raises(DataError, match="does not exist"):
        verify_copy(manifest, tmp_path / "nowhere")
    with pytest.raises(DataError, match="malformed data manifest"):
        DataManifest.from_dict({"dirs": {}})


def test_shipped_shards_land_in_a_node_cache_and_are_checked(tiny_config, tmp_path):
    from hetero_testnet.data.fingerprint import manifest_for, shipped_files, write_shipped

    manifest = manifest_for(tiny_config.data)
    files = shipped_files(manifest)
    where = write_shipped(manifest, files, tmp_path / "cache")
    assert sorted(p.name for p in where.iterdir()) == sorted(files)
    assert write_shipped(manifest, files, tmp_path / "cache") == where  # a restart reuses the copy
    bad = dict(files)
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    with pytest.raises(DataError, match="differs from the head's"):
        write_shipped(manifest, bad, tmp_path / "other")


def test_ship_data_refuses_splits_that_would_mix_in_one_directory(tmp_path):
    from hetero_testnet.data.fingerprint import DataManifest, ShardEntry, check_shippable

    entry = ShardEntry("a_train_0.bin", 1, "0" * 64)
    same = DataManifest(dirs={"train": "/t", "val": "/v"}, patterns={"train": "*_train_*", "val": "*.bin"},
                        files={"train": (entry,), "val": (entry,)})
    with pytest.raises(DataError, match="both hold a shard named a_train_0.bin"):
        check_shippable(same)
    greedy = DataManifest(dirs=same.dirs, patterns=same.patterns,
                          files={"train": (entry,), "val": (ShardEntry("a_val_0.bin", 1, "1" * 64),)})
    with pytest.raises(DataError, match="the val pattern '\\*.bin' also matches train shard a_train_0.bin"):
        check_shippable(greedy)


# ----------------------------------------------------------------- what the actors are asked to run

class _FakeActorClass:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, tuple]] = []

    def options(self, **options):
        outer = self

        class _Bound:
            def remote(self, *args):
                outer.calls.append((options, args))
                return object()
        return _Bound()


def _ray_plan(tmp_path, **engine):
    from hetero_testnet.run.plan import plan_launch

    plan = plan_launch(num_clients=3, config_path=TINY, tiers=[0, 1, 1], logs_dir=tmp_path / "logs", name="r",
                       threads=1)
    import dataclasses

    return dataclasses.replace(plan, engine=EnginePlan(name="ray", **engine), gloo_ifname="wg0")


def test_actors_run_the_local_command_line_with_the_token_only_in_their_environment(tmp_path):
    from hetero_testnet.run.engine import client_env_vars
    from hetero_testnet.run.ray_engine import RayEngine

    plan = _ray_plan(tmp_path, resources={0: ActorResources(num_gpus=1.0, custom={"fast": 1.0})}, data_dir="/d")
    engine = RayEngine(plan, "t0ken")
    engine.actor_cls, engine.head_node = _FakeActorClass(), "head"
    for spec in plan.clients:
        args = plan.client_args(spec, "10.0.0.1:20000")
        engine.start(spec, args, plan.run_dir / f"client-{spec.client_id}.log", client_env_vars(plan, "t0ken", 1))
    (opts0, (job0, shipped)), (opts1, (job1, _)) = engine.actor_cls.calls[:2]
    assert job0["argv"] == plan.client_args(plan.clients[0], "10.0.0.1:20000")  # exactly local mode's
    assert "t0ken" not in json.dumps(job0) and shipped is None
    env = opts0["runtime_env"]["env_vars"]
    assert env["HETERO_TESTNET_TOKEN"] == "t0ken" and env["GLOO_SOCKET_IFNAME"] == "wg0"
    assert env["OMP_NUM_THREADS"] == "1" and "PATH" not in env  # only the run's variables travel
    assert opts0["max_restarts"] == -1 and opts0["name"] == "r-client-1"
    assert (opts0["num_cpus"], opts0["num_gpus"], opts0["resources"]) == (1.0, 1.0, {"fast": 1.0})
    assert opts1["num_cpus"] == 1.0 and "num_gpus" not in opts1 and "resources" not in opts1
    assert job1["data_dir"] == "/d" and job1["head_node"] == "head" and job1["client_id"] == 2
    assert engine.client_address("0.0.0.0", 5, "head.example") == "head.example:5"
    assert engine.client_address("10.1.1.1", 5, None) == "10.1.1.1:5"


def test_the_cluster_must_be_able_to_host_every_client(tmp_path):
    from hetero_testnet.run.ray_engine import check_cluster

    plan = _ray_plan(tmp_path, resources={0: ActorResources(num_gpus=1.0)})
    with pytest.raises(ConfigError, match=r"client 1 \(tier 0\) asks Ray for CPU:1\+GPU:1, which no node"):
        check_cluster(plan, [{"CPU": 8.0}])
    check_cluster(plan, [{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match="listens on 127.0.0.1 only"):
        check_cluster(plan, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}])
    import dataclasses

    check_cluster(dataclasses.replace(plan, bind="0.0.0.0", advertise_host="10.0.0.1"),
                  [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}])


# ----------------------------------------------------------------- the actor, run without Ray

def _bare_actor(monkeypatch, tmp_path, job: dict, node: str = "head"):
    from hetero_testnet.run import ray_actor

    monkeypatch.setattr(ray_actor, "_ray_context", lambda: (node, False))
    monkeypatch.setattr(ray_actor.tempfile, "gettempdir", lambda: str(tmp_path / "node-tmp"))
    base = {"client_id": 2, "argv": ["--version"], "log_path": str(tmp_path / "run" / "client-2.log"),
            "run_name": "run", "head_node": "head", "restart_delay_s": 0.0, "manifest": None, "data_dir": None}
    return ray_actor.ClientActor({**base, **job})


def _exited(actor, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = actor.status()
        if status["exit_code"] is not None:
            return status
        time.sleep(0.1)
    raise AssertionError("the actor's client did not exit")


def test_the_actor_supervises_its_client_and_writes_the_heads_log_on_the_head(monkeypatch, tmp_path):
    (tmp_path / "run").mkdir()
    actor = _bare_actor(monkeypatch, tmp_path, {})
    status = _exited(actor)
    assert status["exit_code"] == 0 and status["error"] is None and not status["remote_log"]
    assert "hetero-testnet" in (tmp_path / "run" / "client-2.log").read_text()
    first = status["pid"]
    assert actor.start_client() != first and actor.status()["starts"] == 2  # a crash-only restart
    assert actor.read_log(0) == b""  # nothing to pull: the head has it
    assert actor.stop(5.0)["exit_code"] is not None


def test_a_remote_actor_keeps_the_log_on_its_node_for_the_head_to_pull(monkeypatch, tmp_path):
    stale = tmp_path / "node-tmp" / "hetero-testnet" / "run" / "client-2.log"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run of this name\n")
    actor = _bare_actor(monkeypatch, tmp_path, {}, node="worker")
    assert _exited(actor)["remote_log"] is True
    local = tmp_path / "node-tmp" / "hetero-testnet" / "run" / "client-2.log"
    text = local.read_bytes()
    assert b"hetero-testnet" in text and b"earlier" not in text and not (tmp_path / "run").exists()
    assert actor.read_log(0) == text and actor.read_log(3) == text[3:] and actor.read_log(len(text)) == b""


def test_an_actor_with_other_data_reports_one_line_and_starts_nothing(monkeypatch, tmp_path, tiny_config):
    from hetero_testnet.data.fingerprint import manifest_for

    other = _copy_sample(tmp_path / "other")
    val = sorted(other.glob("*_val_*.bin"))[0]
    val.write_bytes(val.read_bytes()[:-2])
    actor = _bare_actor(monkeypatch, tmp_path, {"manifest": manifest_for(tiny_config.data).to_dict(),
                                                "data_dir": str(other)})
    status = actor.status()
    assert status["pid"] is None
    assert status["error"].startswith("client 2 on ") and f"val shard {val}" in status["error"]
    assert "\n" not in status["error"]
    ok = _bare_actor(monkeypatch, tmp_path, {"manifest": manifest_for(tiny_config.data).to_dict(),
                                             "data_dir": str(_copy_sample(tmp_path / "good")),
                                             "argv": ["client", "--help"]})
    assert ok.argv == ["client", "--help", "--data-dir", str(tmp_path / "good")] and _exited(ok)["exit_code"] == 0


def test_an_address_where_nothing_listens_is_one_line_not_minutes_of_retries():
    import socket

    from hetero_testnet.run.ray_engine import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConfigError, match=rf"no Ray cluster answers at 127.0.0.1:{port} \(--address auto, "
                                              rf"RAY_ADDRESS=127.0.0.1:{port}"):
            check_reachable("auto", f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=rf"answers at 127.0.0.1:{port} \(--address ray://127.0.0.1:{port}:"):
            check_reachable(f"ray://127.0.0.1:{port}")
        s.listen(1)
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto", None)  # left to Ray


# ----------------------------------------------------------------- the launcher's view of an actor (Ray faked)

class _FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)  # the "object ref" is the value itself (ray.wait / ray.get are faked)


class _FakeActor:
    def __init__(self, log: bytes) -> None:
        self.state = {"pid": 100, "exit_code": None, "error": None, "remote_log": True, "host": "w1", "node": "n1"}
        self.log = log
        self.status = _FakeMethod(lambda: dict(self.state))
        self.read_log = _FakeMethod(lambda offset: self.log[offset:offset + 4])


def test_the_launchers_handle_adopts_incarnations_and_pulls_remote_logs(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from hetero_testnet.run.ray_engine import RayClient

    killed = []
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append(no_restart))
    actor = _FakeActor(b"0123456789")
    handle = RayClient(actor, 2, tmp_path / "client-2.log")
    assert handle.pid is None and handle.poll() is None
    handle.refresh(block_s=1.0)
    assert handle.take_incarnation() == 100 and handle.incarnations == 1 and handle.take_incarnation() is None
    for _ in range(3):  # 4 bytes per pull
        handle.pull_log(block_s=1.0)
    assert (tmp_path / "client-2.log").read_bytes() == b"0123456789" and handle.log_offset == 10
    handle.kill()
    assert killed == [False] and handle.poll() == -9 and handle.wait() == -9
    handle.refresh(block_s=1.0)  # the old incarnation's answer is ignored
    assert handle.take_incarnation() is None and handle.returncode == -9
    actor.state = {**actor.state, "pid": 200}  # Ray restarted the actor; its client runs again
    handle.refresh(block_s=1.0)
    assert handle.take_incarnation() == 200 and handle.incarnations == 2 and handle.returncode is None
    actor.state = {**actor.state, "exit_code": 0}
    handle.refresh(block_s=1.0)
    assert handle.returncode == 0
    actor.state = {**actor.state, "error": "client 2 on w1: train shard x differs"}
    handle.refresh(block_s=1.0)
    with pytest.raises(ConfigError, match="client 2 on w1: train shard x differs"):
        handle.take_incarnation()


# ----------------------------------------------------------------- the KubeRay manifest (no Kubernetes here)

def test_the_kuberay_manifest_uses_real_flags_and_resources_its_pods_offer():
    import shlex

    import typer
    import yaml

    from hetero_testnet.cli import _register_subcommands, app

    doc = yaml.safe_load((ROOT / "docs" / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["testnet", "start"]
    _register_subcommands()
    start = typer.main.get_command(app).commands["start"]
    known = {opt for param in start.params for opt in param.opts + param.secondary_opts}
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags and set(flags) <= known, sorted(set(flags) - known)
    cluster = doc["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    offered = [json.loads(json.loads(g["rayStartParams"]["resources"])) for g in groups]
    wanted = parse_client_resources(argv[argv.index("--client-resources") + 1])
    for tier, resources in wanted.items():
        assert any(all(node.get(k, 0) >= v for k, v in resources.custom.items()) for node in offered), tier
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "MY_POD_IP" for e in env) and "$MY_POD_IP" in doc["spec"]["entrypoint"]


# ----------------------------------------------------------------- the launcher with an engine that restarts clients itself

class _SelfRestartingEngine:
    name, restarts_itself, kill_signal = "fake", True, "ray.kill"

    def __init__(self) -> None:
        self.killed: list = []
        self.restarted: list = []
        self.next_pid: int | None = None

    def restart(self, handle) -> None:
        self.restarted.append(handle.pid)

    def kill(self, handle) -> None:
        self.killed.append(handle.pid)
        handle.returncode = -9

    def adopt(self, handle, wait: bool = False):
        if self.next_pid is None or self.next_pid == handle.pid:
            return None
        handle.pid, handle.returncode, self.next_pid = self.next_pid, None, None
        handle.incarnations += 1
        return handle.pid


class _Handle:
    def __init__(self, pid: int) -> None:
        self.pid, self.returncode, self.incarnations = pid, None, 1

    def poll(self):
        return self.returncode


def test_the_launcher_leaves_restarts_to_an_engine_that_restarts_clients_itself(tmp_path):
    from hetero_testnet.events import Event
    from hetero_testnet.run.launcher import Launcher
    from hetero_testnet.run.processes import Child
    from hetero_testnet.run.plan import FaultPlan, plan_launch

    plan = plan_launch(num_clients=3, config_path=TINY, logs_dir=tmp_path / "logs", name="r",
                       faults=FaultPlan(random_kill_num=1, random_kill_interval_s=5))
    launcher = Launcher(plan)
    emitted: list = []
    launcher.events = type("E", (), {"emit": lambda self, e, **f: emitted.append((str(e), f))})()
    launcher.engine = engine = _SelfRestartingEngine()
    handle = _Handle(pid=41)
    launcher.children["client-2"] = child = Child("client", 2, handle, tmp_path / "c2.log")
    launcher._note({"event": Event.CLIENT_JOINED, "client_id": 2, "pid": 41})
    launcher._note({"event": Event.CLIENT_STEP, "client_id": 2, "step": 0})
    launcher._random_kill()
    assert engine.killed == [41] and launcher.pending_restarts == []  # Ray restarts it, not the launcher
    assert emitted[-1] == (str(Event.FAULT_KILL), {"client_id": 2, "pid": 41, "signal": "ray.kill"})
    engine.next_pid = 77  # the restarted actor's client reports
    launcher._adopt(child)
    assert [e for e, _ in emitted[-2:]] == [str(Event.PROCESS_STARTED), str(Event.CLIENT_RESTARTED)]
    assert emitted[-1][1] == {"client_id": 2, "pid": 77}
    assert child.restarts == 1 and launcher.fault_counts == {"kills": 1, "restarts": 1} and not child.trained
    launcher._note({"event": Event.CLIENT_JOINED, "client_id": 2, "pid": 77})
    assert child.joined


def test_a_client_asking_for_a_restart_is_restarted_by_the_engine_not_respawned(tmp_path):
    from hetero_testnet.events import Event
    from hetero_testnet.run.launcher import Launcher
    from hetero_testnet.run.processes import Child
    from hetero_testnet.run.plan import FaultPlan, plan_launch

    plan = plan_launch(num_clients=2, config_path=TINY, logs_dir=tmp_path / "logs", name="r",
                       faults=FaultPlan(kill_restart_delay_s=0.0))
    launcher = Launcher(plan)
    emitted: list = []
    launcher.events = type("E", (), {"emit": lambda self, e, **f: emitted.append((str(e), f))})()
    launcher.engine = engine = _SelfRestartingEngine()
    handle = _Handle(pid=41)
    launcher.children["client-1"] = child = Child("client", 1, handle, tmp_path / "c1.log")
    handle.returncode = 75  # a formation stuck past its deadline (crash-only)
    launcher._restart_crashed()
    launcher._restart_crashed()  # scheduled once
    assert [e for e, _ in emitted] == [str(Event.CLIENT_EXITED)] and len(launcher.pending_restarts) == 1
    launcher._restart_due("127.0.0.1:1")
    assert engine.restarted == [41] and launcher.children["client-1"] is child and child.proc is handle
    assert child.restarts == 0  # counted when the new client reports
    engine.next_pid = 42
    launcher._adopt(child)
    assert emitted[-1] == (str(Event.CLIENT_RESTARTED), {"client_id": 1, "pid": 42}) and child.restarts == 1

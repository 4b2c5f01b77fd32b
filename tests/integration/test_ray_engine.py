"""`--engine ray` on a real, local Ray head that this module starts and stops itself.

The head runs `ray start --head --block` in its own session, on loopback only (Ray otherwise
advertises the machine's first interface address; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every
Ray address on 127.0.0.1), with 4 logical CPUs, a 100 MB object store, no dashboard and a temp dir
of its own (also the nodes' TMPDIR, where shipped shards land). It is stopped with SIGTERM to that `ray start` (which stops what it started), then
SIGKILL to its process group: never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from testnet_helpers import (ROOT, assert_no_orphans, checksums_by_step, events, restore_sigint, run_start, start_args,
                             summary, wait_for_step)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="--engine ray needs the ray extra (pip install -e '.[dev]')")]

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_env() -> Iterator[dict[str, str]]:
    """A local Ray head for this module; yields the environment in which `--address auto` finds it."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    log = temp / "head.log"
    ray = Path(sys.executable).parent / "ray"
    (temp / "tmp").mkdir()
    env = {**os.environ, **LOOPBACK_ONLY, "TMPDIR": str(temp / "tmp")}  # the actors' node cache goes there too
    cmd = [str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "4",
           "--object-store-memory", "100000000", "--include-dashboard=false", "--disable-usage-stats",
           "--ray-client-server-port", str(_free_port()), "--temp-dir", str(temp)]
    with open(log, "wb") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=temp / "tmp")  # its workers' working directory: not the one `testnet start` runs in
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _actor_processes() -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or [""]
        if cmdline and cmdline[0].startswith("ray::ClientActor"):
            out.append(proc)
    return out


def assert_no_actors_left(timeout: float = 20.0) -> None:
    """The run's actors are gone (killed without restart at its end), not idle on the cluster."""
    deadline = time.monotonic() + timeout
    while _actor_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _actor_processes(), [p.pid for p in _actor_processes()]


def _ray_start(logs_dir: Path, name: str, env: dict[str, str], *extra: str):
    return run_start(logs_dir, name, "--engine", "ray", "--address", "auto", *extra, env=env, timeout=240)


def test_ray_run_trains_the_same_parameters_as_the_local_launcher(logs_dir, ray_env):
    common = ("--num-clients", "3", "--tiers", "0,1,1", "--seed", "7", "--min-clients", "3")
    local = run_start(logs_dir, "local", *common)
    assert local.returncode == 0, local.stderr
    started = time.monotonic()
    # a relative --logs-dir: the clients run in Ray's working directory, not this one, and must still
    # write the final checkpoint into this run's directory
    result = _ray_start(logs_dir, "ray", ray_env, *common, "--logs-dir", os.path.relpath(logs_dir, ROOT))
    assert result.returncode == 0, result.stderr
    print(f"ray run: {time.monotonic() - started:.1f} s")
    run = logs_dir / "ray"
    s = summary(run)
    assert s["status"] == "finished" and s["steps_completed"] == 8 and s["replicas_identical"] is True
    sums = checksums_by_step(run)
    assert sorted(sums) == list(range(8)) and all(len(v) == 1 for v in sums.values())
    a, b = load_file(str(logs_dir / "local" / "checkpoint" / "model.safetensors")), load_file(
        str(run / "checkpoint" / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).norm() <= 1e-5 * a[name].norm() + 1e-7, name
    token = (run / ".token").read_text().strip()
    for k in (1, 2, 3):
        assert s["clients"][str(k)]["engine"] == "ray" and s["clients"][str(k)]["exit_code"] == 0
        log = (run / f"client-{k}.log").read_text()
        assert log.count(" client_loss ") == 8 and token not in log  # the head's log, as in local mode
    assert token not in (run / "events.jsonl").read_text() and token not in result.stdout + result.stderr
    assert_no_orphans(run)
    assert_no_actors_left()


def test_a_killed_actor_is_restarted_by_ray_and_rejoins(logs_dir, ray_env):
    """Shipped shards (checked on arrival and again by the restarted actor), a kill every 4 s: the first
    lands within 4 s of client 2's first round, so on a fast machine too the run (100 steps, ~15 s of
    training when idle) goes on long enough for the restarted client to rejoin and train."""
    result = _ray_start(logs_dir, "kills", ray_env, "--num-clients", "3", "--tiers", "0,1,1", "--total-steps", "100",
                        "--random-kill-num", "1", "--allowed-to-kill", "2", "--random-kill-interval", "4",
                        "--kill-restart-delay", "0.5", "--exit-after-secs", "200", "--ship-data")
    assert result.returncode == 0, result.stderr
    run = logs_dir / "kills"
    s = summary(run)
    assert s["status"] == "finished" and s["steps_completed"] == 100
    assert s["faults"]["kills"] >= 1 and s["clients"]["2"]["kills"] >= 1 and s["clients"]["2"]["restarts"] >= 1
    evs = events(run)
    kill = next(e for e in evs if e["event"] == "fault_kill")
    assert kill["client_id"] == 2 and kill["signal"] == "ray.kill"
    restarted = next(e for e in evs if e["event"] == "client_restarted" and e["ts"] > kill["ts"])
    assert restarted["client_id"] == 2 and restarted["pid"] != kill["pid"]
    rejoin = next(e for e in evs if e["event"] == "client_joined" and e["client_id"] == 2 and e["incarnation"] > 0)
    assert rejoin["pid"] == restarted["pid"]
    assert any(e["event"] == "client_step" and e["client_id"] == 2 and e["ts"] > rejoin["ts"] for e in evs)
    sums = checksums_by_step(run)
    assert sorted(sums) == list(range(100)) and all(len(v) == 1 for v in sums.values())
    assert_no_orphans(run)
    assert_no_actors_left()


def test_a_node_with_other_data_stops_the_run_with_one_line(logs_dir, ray_env, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(ROOT / "data" / "sample", other)
    shard = sorted(other.glob("*_train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    result = _ray_start(logs_dir, "baddata", ray_env, "--num-clients", "2", "--data-dir", str(other))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: client ") and f"train shard {shard} differs from the head's" in lines[-1]
    assert "Traceback" not in result.stderr
    assert summary(logs_dir / "baddata")["status"] == "interrupted"
    assert_no_orphans(logs_dir / "baddata")


def test_sigterm_stops_a_ray_run_cleanly(logs_dir, ray_env):
    """Ray's driver would turn SIGTERM into sys.exit(15) (and its C++ core into an abort): the
    launcher keeps its own handler, so the run stops as in local mode (summary, exit 130)."""
    proc = subprocess.Popen(start_args(logs_dir, "term", "--engine", "ray", "--address", "auto", "--num-clients", "2",
                                       "--tiers", "0,1", "--total-steps", "400"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ray_env,
                            preexec_fn=restore_sigint)
    run = logs_dir / "term"
    try:
        wait_for_step(run, 2, timeout=180)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    s = summary(run)
    assert s["status"] == "interrupted" and "SIGTERM" in s["reason"] and 2 <= s["steps_completed"] < 400
    assert "faults" in s and all(c["exit_code"] is not None for c in s["clients"].values())
    assert "logging.cc" not in err  # no stack trace of Ray's own signal handler
    assert_no_orphans(run)
    assert_no_actors_left()

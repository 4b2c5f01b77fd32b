"""Issue 11 end to end: hostile traffic beside a run, a rendezvous that stays on loopback, and churn.

One calm run (module fixture) is attacked for ~20 s with every class of hostile input at its
control port while its listening sockets are sampled; it must finish with identical replicas, and
its final validation loss is the reference for the churn soak, which kills clients at random and,
through test hooks, inside group formation and inside the state broadcast to joiners. Only
127.0.0.1 is targeted.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time

import psutil
import pytest

from hetero_testnet.events import read_events
from hetero_testnet.run.audit import audit
from testnet_helpers import (assert_no_orphans, events, live_testnet, run_start, started_pids, summary,
                             wait_for_step)

pytestmark = pytest.mark.slow

STEPS = 60
TIERS = ("--num-clients", "3", "--tiers", "0,1,1", "--total-steps", str(STEPS))
HOSTILE_S = 20.0


def _frame(body: dict | bytes) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps({"v": 1, **body}).encode()
    return struct.pack(">I", len(data)) + data


ATTACKS = {
    "random bytes": lambda rng: rng.randbytes(rng.randint(1, 4096)),
    "zero length": lambda rng: struct.pack(">I", 0),
    "huge length": lambda rng: struct.pack(">I", 2**32 - 1) + b"x" * 64,
    "truncated": lambda rng: struct.pack(">I", 500) + b'{"v": 1, "type": "hello"',
    "wrong types": lambda rng: _frame({"type": "hello", "token": 1, "client_id": "one", "tier": [0]}),
    "missing fields": lambda rng: _frame({"type": "hello", "tier": 0}),
    "wrong token": lambda rng: _frame({"type": "hello", "token": "guess", "client_id": None, "tier": 0}),
    "forged id": lambda rng: _frame({"type": "hello", "token": "forged", "client_id": 1, "tier": 0}),
    "forged message": lambda rng: _frame({"type": "reduced", "step": 0, "generation": 0}),
}


def hostile_traffic(port: int, seconds: float, stop: threading.Event) -> dict[str, int]:
    """Every attack class at random against 127.0.0.1:port, plus slow senders and 100 idle connections."""
    rng, sent, held = random.Random(11), {name: 0 for name in [*ATTACKS, "slow", "idle"]}, []
    deadline = time.monotonic() + seconds
    for _ in range(100):
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        sent["idle"] += 1
    while time.monotonic() < deadline and not stop.is_set():
        name = rng.choice([*ATTACKS, "slow"])
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if name == "slow":  # a slowloris: a few bytes of a frame, then nothing
                s.sendall(struct.pack(">I", 80)[:3])
                held.append(s)
            else:
                s.sendall(ATTACKS[name](rng))
                s.close()
            sent[name] += 1
        except OSError:
            pass  # a connection the coordinator already closed
        time.sleep(0.05)
    for s in held:
        s.close()
    return sent


def listening_addresses(pids: list[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add(c.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    logs = tmp_path_factory.mktemp("calm")
    with live_testnet(logs, "calm", *TIERS) as (proc, run):
        wait_for_step(run, 1)
        port = json.loads((run / "coordinator.json").read_text())["port"]
        stop, result = threading.Event(), {}
        attacker = threading.Thread(target=lambda: result.update(hostile_traffic(port, HOSTILE_S, stop)))
        attacker.start()
        seen: set[str] = set()
        while attacker.is_alive():  # sample the run's listening sockets while it trains
            seen |= listening_addresses([proc.pid, *started_pids(run)])
            if proc.poll() is not None:
                stop.set()  # the run is over: attacking a closed port proves nothing
            attacker.join(0.5)
        out, err = proc.communicate(timeout=240)
    return proc.returncode, err, run, seen, result


def test_a_run_beside_20_s_of_hostile_traffic_finishes_with_identical_replicas(calm):
    code, err, run, _, sent = calm
    assert code == 0, err
    s = summary(run)
    assert s["status"] == "finished" and s["steps_completed"] == STEPS and s["replicas_identical"]
    assert audit(read_events(run / "events.jsonl"), STEPS) == []
    assert s["discarded_steps"] == 0 and s["clients_lost"] == 0  # the members never noticed
    assert sum(sent.values()) > 100 and all(sent.values()), sent
    kinds = {e["event"] for e in events(run)}
    assert {"protocol_error", "connection_dropped", "client_rejected"} <= kinds
    assert "guess" not in (run / "coordinator.log").read_text()


def test_no_socket_of_a_default_run_listens_outside_loopback(calm):
    _, _, _, seen, _ = calm
    assert seen and seen <= {"127.0.0.1", "::1"}, seen


def test_churn_with_kills_in_formation_and_broadcast_loses_nothing(calm, tmp_path):
    env = {**os.environ, "HETERO_TESTNET_DIE_AT": "forming:0.25,broadcast:0.5", "HETERO_TESTNET_DIE_CLIENTS": "2,3"}
    result = run_start(tmp_path, "churn", *TIERS, "--random-kill-num", "1", "--random-kill-interval", "4",
                       "--allowed-to-kill", "2,3", "--kill-restart-delay", "0.5", env=env, timeout=300)
    run = tmp_path / "churn"
    assert result.returncode == 0, result.stderr
    s = summary(run)
    assert s["status"] == "finished" and s["steps_completed"] == STEPS and s["replicas_identical"]
    assert audit(read_events(run / "events.jsonl"), STEPS) == []  # every step once, identical, samples tiled
    hook_deaths = [e for e in events(run) if e["event"] == "client_exited" and e["exit_code"] == 76]
    # both kinds of fault happened, at least 3 in all (random kills hit only clients that trained since
    # joining, so how many land in the ~20 s depends on how often the hooks already killed the joiner)
    assert s["faults"]["kills"] >= 1 and hook_deaths and s["faults"]["kills"] + len(hook_deaths) >= 3, \
        (s["faults"], len(hook_deaths))
    assert s["rejoins"] >= 1
    calm_loss, churn_loss = summary(calm[2])["final_val_loss"], s["final_val_loss"]
    for tier, value in calm_loss.items():
        assert abs(churn_loss[tier] - value) <= 0.02 * value, (tier, value, churn_loss[tier])
    assert_no_orphans(run)

"""Clients on their own (virtual) hosts: network namespaces joined by veth pairs, real addresses.

Each client runs in a namespace `<prefix>-k` with address 10.213.k.2, reaching the coordinator
(bound to 10.213.1.1 in the root namespace, which routes between the veths) only over the
network. Where the kernel has the netem qdisc, each client's link also gets `tc netem delay` and
`loss` (real packet loss), and the exchange times must grow by the delay; elsewhere the topology
still runs, with the exchange's emulated loss (`--fault-packet-loss`) instead, and says so. Needs
root and iproute2; skipped otherwise. Only addresses of these namespaces are used.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid

import pytest

from testnet_helpers import ROOT, TINY, events

pytestmark = pytest.mark.slow

NETEM_DELAY_MS = 40
PACKET_LOSS = 0.01


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _namespaces_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    probe = f"htprobe{uuid.uuid4().hex[:6]}"
    if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces here"
    _sh("ip", "netns", "del", probe, check=False)
    return None


@pytest.fixture
def two_hosts():
    reason = _namespaces_available()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    names = [f"ht{tag}{k}" for k in (1, 2)]
    netem = True
    try:
        _sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for k, ns in enumerate(names, start=1):
            host_if, ns_if = f"vh{tag}{k}", f"vn{tag}{k}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _sh("ip", "link", "set", ns_if, "netns", ns)
            _sh("ip", "addr", "add", f"10.213.{k}.1/24", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.213.{k}.2/24", "dev", ns_if)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"10.213.{k}.1")
            if netem:
                r = _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, "root", "netem", "delay",
                        f"{NETEM_DELAY_MS}ms", "loss", f"{PACKET_LOSS * 100:g}%", check=False)
                netem = r.returncode == 0
        yield names, [f"vn{tag}{k}" for k in (1, 2)], netem
    finally:
        for k, ns in enumerate(names, start=1):
            _sh("ip", "netns", "del", ns, check=False)
            _sh("ip", "link", "del", f"vh{tag}{k}", check=False)


def test_clients_in_their_own_namespaces_train_one_model(two_hosts, tmp_path):
    namespaces, interfaces, netem = two_hosts
    token = uuid.uuid4().hex
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "hetero_testnet", "coordinator", "--config-path", str(TINY), "--run-dir",
         str(run_dir), "--bind", "10.213.1.1", "--server-port", "0", "--expect-clients", "2",
         "--total-steps", "6", "--token-file", str(token_file),
         *([] if netem else ["--fault-packet-loss", str(PACKET_LOSS)])],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        ready = run_dir / "coordinator.json"
        import time

        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and coordinator.poll() is None:
            time.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        for k, (ns, iface) in enumerate(zip(namespaces, interfaces), start=1):
            clients.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "hetero_testnet", "client", "--coordinator",
                 f"10.213.1.1:{port}", "--client-id", str(k), "--tier", str(k - 1), "--token-file", str(token_file),
                 "--gloo-ifname", iface],
                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
        coordinator.wait(timeout=180)
        outs = [c.communicate(timeout=60)[1] for c in clients]
    finally:
        for p in [coordinator, *clients]:
            if p.poll() is None:
                p.kill()
    assert coordinator.returncode == 0, "\n".join(outs) + (coordinator.stderr.read() if coordinator.stderr else "")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["replicas_identical"] is True
    hosts = {e["client_id"]: e["host"] for e in events(run_dir) if e["event"] == "client_joined"}
    assert len(hosts) == 2
    assert all("client_loss" in out for out in outs)
    if netem:
        exchange = statistics.median(e["exchange_time_s"] for e in events(run_dir) if e["event"] == "client_step")
        # an all-reduce crosses each delayed link at least once each way
        assert exchange >= 2 * NETEM_DELAY_MS / 1000
    else:
        print("netem qdisc unavailable in this kernel: ran the namespace topology without injected delay, "
              f"with the exchange's emulated packet loss ({PACKET_LOSS:g})")

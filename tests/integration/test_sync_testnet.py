"""`--sync demo` and `--sync diloco` on real testnets of the tiny config: replicas identical at every
step (round), across kills and rejoins; bytes on the wire as the layout says; DiLoCo with H = 1,
SGD, outer lr 1, momentum 0 trains the same model as allreduce with SGD."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from testnet_helpers import (ROOT, TINY, checksums_by_step, cli_cmd, client_pid, events, live_testnet, run_start,
                             summary, wait_for_event, wait_for_step)

from hetero_testnet.config import dump_yaml, load_run_config

pytestmark = pytest.mark.slow

DEMO_8_1BIT = ("--sync", "demo", "--demo-topk", "8", "--demo-1bit")


def _config(tmp_path: Path, **optimizer) -> Path:
    """The tiny config with a round deadline that 2 shared cores meet under DeMo's decode (and,
    with `optimizer`, other optimizer fields)."""
    cfg = load_run_config(TINY)
    cfg = cfg.replace(timing=dataclasses.replace(cfg.timing, max_round_train_time=60.0))
    if optimizer:
        cfg = cfg.replace(optimizer=dataclasses.replace(cfg.optimizer, **optimizer))
    d = tmp_path / "config"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
    return d


def _kill_and_rejoin(logs_dir: Path, name: str, *args: str, tier: int, helper_fraction: str = "0") -> Path:
    """A long run; once it trains, client 2 is SIGKILLed and a new client 2 process (same id, same
    tier) joins from outside the launcher, as a restarted machine would. After the newcomer has
    trained two rounds the run is stopped cleanly (SIGINT). Deterministic, unlike the launcher's
    timed kills, whose interval a loaded machine's start-up time (10-20 s) could overrun."""
    with live_testnet(logs_dir, name, *args, "--total-steps", "4000", "--exit-after-secs", "900") as (proc, run):
        wait_for_step(run, 2, timeout=240)
        os.kill(client_pid(run, 2), signal.SIGKILL)
        wait_for_event(run, lambda e: e["event"] == "client_lost" and e["client_id"] == 2, timeout=60)
        coordinator = json.loads((run / "coordinator.json").read_text())
        newcomer = subprocess.Popen(cli_cmd("client", "--coordinator", f"{coordinator['host']}:{coordinator['port']}",
                                            "--client-id", "2", "--tier", str(tier), "--helper-fraction",
                                            helper_fraction, "--threads", "1", "--token-file", str(run / ".token")),
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            joined = wait_for_event(run, lambda e: e["event"] == "client_joined" and e["client_id"] == 2
                                    and e["incarnation"] > 0, timeout=180)
            first = wait_for_event(run, lambda e: e["event"] == "client_step" and e["client_id"] == 2
                                   and e["ts"] > joined["ts"], timeout=240)
            wait_for_event(run, lambda e: e["event"] == "client_step" and e["client_id"] == 2
                           and e["step"] > first["step"], timeout=240)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=180)
        finally:
            if newcomer.poll() is None:
                newcomer.kill()
            newcomer.wait(timeout=60)
    return run


def _assert_identical_across_the_rejoin(run: Path) -> dict:
    s = summary(run)
    assert s["status"] == "interrupted" and s["replicas_identical"] is True, s["reason"]
    assert s["rejoins"] >= 1 and s["clients"]["2"]["joins"] >= 2
    sums = checksums_by_step(run)
    assert sums and all(len(v) == 1 for v in sums.values()), sums
    gens = [e for e in events(run) if e["event"] == "generation"]
    assert any(e["state_source"] is not None and 2 in e["members"] for e in gens), "the newcomer got no state"
    return s


def test_demo_tiers_0_1_2_stay_identical_across_a_kill_and_rejoin(logs_dir, tmp_path):
    run = _kill_and_rejoin(logs_dir, "demo", "--config-path", str(_config(tmp_path)), "--num-clients", "3",
                           "--tiers", "0,1,2", *DEMO_8_1BIT, "--demo-chunk", "16", tier=1)
    assert _assert_identical_across_the_rejoin(run)["sync"] == "demo"


def test_diloco_tiers_0_1_2_stay_identical_across_a_kill_and_rejoin(logs_dir, tmp_path):
    run = _kill_and_rejoin(logs_dir, "diloco", "--config-path", str(_config(tmp_path)), "--num-clients", "3",
                           "--tiers", "0,1,2", "--helper-fractions", "0,0.5,0.5", "--sync", "diloco",
                           "--inner-steps", "4", tier=1, helper_fraction="0.5")
    _assert_identical_across_the_rejoin(run)
    commits = [e for e in events(run) if e["event"] == "step_committed"]
    assert [e["step"] for e in commits] == list(range(0, 4 * len(commits), 4))
    assert {e["inner_steps"] for e in commits} == {4}


def test_demo_k8_1bit_bytes_are_the_layout_and_under_a_hundredth_of_allreduce(logs_dir):
    import torch

    from hetero_testnet.exchange.aggregation import layout_for_model
    from hetero_testnet.exchange.demo_layout import DemoConfig, build_demo_layout
    from hetero_testnet.model.nanogpt import NanoGPT

    per_step = {}
    for name, extra in (("ar", ()), ("demo", (*DEMO_8_1BIT, "--demo-chunk", "32"))):
        result = run_start(logs_dir, name, "--num-clients", "2", "--tiers", "0,1", "--total-steps", "3", *extra)
        assert result.returncode == 0, result.stderr
        clients = summary(logs_dir / name)["clients"]
        per_step[name] = {c["bytes_sent_per_step"] for c in clients.values()}
        assert {c["bytes_received_per_step"] for c in clients.values()} == per_step[name]
    m = load_run_config(TINY).model
    with torch.device("meta"):
        layout = layout_for_model(NanoGPT(m), m.num_hidden_layers, m.intermediate_size)
    payload = build_demo_layout(layout, DemoConfig(topk=8, chunk=32, quantize_1bit=True)).payload_bytes
    assert per_step["demo"] == {float(payload)}  # one all_gather at W = 2: one payload each way
    assert per_step["ar"] == {float(layout.total_numel * 4 + 2 * 8)}  # a ring at W = 2: all of it
    assert per_step["demo"].pop() * 100 <= per_step["ar"].pop()


def test_diloco_h1_sgd_outer_lr_1_momentum_0_trains_the_allreduce_sgd_model(logs_dir, tmp_path):
    config = _config(tmp_path, kind="SGD", clip_grad_norm=0.0, weight_decay=0.1)  # clip: local vs global
    for name, extra in (("ar", ("--sync", "allreduce")),
                        ("dl", ("--sync", "diloco", "--inner-steps", "1", "--outer-lr", "1", "--outer-momentum", "0"))):
        result = run_start(logs_dir, name, "--config-path", str(config), "--num-clients", "3", "--tiers", "0,1,2",
                           "--total-steps", "6", *extra)
        assert result.returncode == 0, result.stderr
    a = load_file(str(logs_dir / "ar" / "checkpoint" / "model.safetensors"))
    b = load_file(str(logs_dir / "dl" / "checkpoint" / "model.safetensors"))
    import torch

    for k in a:  # the same update up to float32 rounding of theta - theta_local (a few ulps)
        torch.testing.assert_close(b[k], a[k], rtol=2e-6, atol=1e-9, msg=k)

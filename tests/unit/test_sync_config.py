"""The sync modes' config and planning without processes: the `sync:` section and Psyche's
`optimizer.Distro`, `optimizer: {SGD: ...}` and MaskedSGD, the command line's flags, the DeMo tier
check, diloco's round planning and schedule, the bytes column of the dashboard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hetero_testnet.config import load_run_config, parse_run_config
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.optim import MaskedAdamW, MaskedSGD, build_optimizer
from hetero_testnet.run.assignment import SampleRange, assign_samples
from hetero_testnet.run.rounds import RoundPlanner
from hetero_testnet.run.schedule import due_after_commit
from hetero_testnet.run.sync_flags import SyncFlags, apply_sync_flags, check_sync_tiers
from hetero_testnet.tui.fold import build_snapshot
from hetero_testnet.tui.render import View, render_text

ROOT = Path(__file__).resolve().parents[2]

DISTRO_TOML = """
run_id = "distro"
[model.LLM]
architecture = "HfNanoGPT"
data_type = "Pretraining"
max_seq_len = 32
data_location = { Local = "%s" }
[model.LLM.architecture_config]
vocab_size = 50257
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
[model.LLM.lr_schedule.Cosine]
base_lr = 1.0e-3
warmup_steps = 2
warmup_init_lr = 0.0
total_steps = 8
final_lr = 1.0e-4
[model.LLM.optimizer.Distro]
clip_grad_norm = 1.0
compression_decay = 0.995
compression_topk = 4
compression_chunk = 16
quantize_1bit = true
"""


def test_psyche_distro_selects_demo_with_its_fields(tmp_path):
    (tmp_path / "state.toml").write_text(DISTRO_TOML % (ROOT / "data" / "sample"))
    cfg = load_run_config(tmp_path)
    assert cfg.sync.mode == "demo"
    d = cfg.sync.demo
    assert (d.topk, d.chunk, d.decay, d.quantize_1bit, d.values) == (4, 16, 0.995, True, "float32")
    assert cfg.optimizer.clip_grad_norm == 1.0 and cfg.optimizer.weight_decay == 0.0  # Psyche's None = 0
    again = parse_run_config(cfg.to_dict(), base_dir=tmp_path)  # config.yaml keeps it, in our layout
    assert again.sync == cfg.sync and again.optimizer == cfg.optimizer


def test_sync_section_and_sgd_round_trip(tiny_config):
    raw = tiny_config.to_dict()
    raw["model"]["LLM"]["optimizer"] = {"SGD": {"clip_grad_norm": 0.5}}
    raw["sync"] = {"mode": "diloco", "diloco": {"inner_steps": 4, "bf16": True}}
    cfg = parse_run_config(raw, base_dir=ROOT)
    assert cfg.optimizer.kind == "SGD" and cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.clip_grad_norm == 0.5
    assert (cfg.sync.mode, cfg.sync.inner_steps, cfg.sync.diloco.bf16, cfg.sync.diloco.outer_lr) == ("diloco", 4, True,
                                                                                                     0.7)
    assert parse_run_config(cfg.to_dict(), base_dir=ROOT) == dataclasses.replace(cfg, source=None)
    assert tiny_config.sync.mode == "allreduce" and tiny_config.sync.inner_steps == 1


@pytest.mark.parametrize("sync,message", [
    ({"mode": "ring"}, r"sync.mode\) must be one of allreduce, none, demo, diloco"),
    ({"demo": {"topk": 0}}, r"sync.demo.topk must be an integer >= 1"),
    ({"demo": {"values": "int8"}}, r"sync.demo.values must be one of float32, bfloat16"),
    ({"diloco": {"outer_momentum": 1.0}}, r"outer_momentum must be in \[0, 1\)"),
    ({"diloco": {"inner": 3}}, r"unknown config field sync.diloco.inner"),
])
def test_bad_sync_sections_are_one_line_errors(tiny_config, sync, message):
    raw = {**tiny_config.to_dict(), "sync": sync}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw, base_dir=ROOT)


def test_flags_apply_on_top_of_the_config(tiny_config):
    cfg = apply_sync_flags(tiny_config, SyncFlags(sync="demo", demo_topk=8, demo_1bit=True, demo_chunk=16))
    assert (cfg.sync.mode, cfg.sync.demo.topk, cfg.sync.demo.quantize_1bit, cfg.sync.demo.chunk) == ("demo", 8, True,
                                                                                                     16)
    assert apply_sync_flags(tiny_config, SyncFlags()) == tiny_config
    with pytest.raises(ConfigError, match=r"--inner-steps applies to --sync diloco, but this run's sync is demo"):
        apply_sync_flags(tiny_config, SyncFlags(sync="demo", inner_steps=4))
    with pytest.raises(ConfigError, match=r"sync.diloco.inner_steps must be an integer >= 1 .*\(--inner-steps\)"):
        apply_sync_flags(tiny_config, SyncFlags(sync="diloco", inner_steps=0))
    with pytest.raises(ConfigError, match=r"--resume continues a --sync allreduce run"):
        apply_sync_flags(tiny_config, SyncFlags(sync="diloco"), resumed=True)


def test_demo_tiers_must_be_whole_blocks(tiny_config):
    cfg = apply_sync_flags(tiny_config, SyncFlags(sync="demo"))  # chunk 64: one 64-neuron block per layer
    check_sync_tiers(cfg, [0])
    with pytest.raises(ConfigError, match=r"do not divide the smallest tier's FFN width 32; use a demo chunk <= 32"):
        check_sync_tiers(cfg, [0, 1])
    check_sync_tiers(apply_sync_flags(cfg, SyncFlags(demo_chunk=16)), [0, 1, 2])
    check_sync_tiers(tiny_config, [0, 1, 2, 3])  # allreduce: no rule


def test_masked_sgd():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))
    ref = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.randn(4, 3), torch.randn(3)
    from hetero_testnet.config import OptimizerConfig

    opt = build_optimizer([("model.layers.0.mlp.gate_proj.weight", w), ("bias", b)],
                          OptimizerConfig(kind="SGD", weight_decay=0.5))
    assert isinstance(opt, MaskedSGD) and opt.state_dict() == {}
    mask = torch.tensor([True, True, False, False]).view(4, 1)
    opt.step(0.1, {"model.layers.0.mlp.gate_proj.weight": mask})
    expected = ref[0] * (1 - 0.1 * 0.5) - 0.1 * w.grad
    assert torch.equal(w.detach()[:2], expected[:2]) and torch.equal(w.detach()[2:], ref[0][2:])
    assert torch.equal(b.detach(), ref[1] - 0.1 * b.grad)  # 1-D: no weight decay
    assert isinstance(build_optimizer([("bias", b)], OptimizerConfig()), MaskedAdamW)
    with pytest.raises(ConfigError, match="SGD has no optimizer state"):
        opt.load_state_dict({"bias.exp_avg": torch.zeros(3)})


# --------------------------------------------------------------------------- rounds

def test_one_step_rounds_assign_as_before():
    planner = RoundPlanner(seed=5)
    plan = planner.plan([1, 2, 3], 7, 100, 12, 84)
    assert plan.inner_steps == 1
    assert {c: w.main for c, w in plan.work.items()} == assign_samples([1, 2, 3], 12, 84, seed=5, step=7)
    assert planner.plan([1, 3], 7, 100, 12, 84).work[1].main == assign_samples([1, 3], 12, 84, seed=5, step=7)[1]


def test_diloco_rounds_keep_survivors_ranges_and_hand_out_the_lost_ones():
    planner = RoundPlanner(seed=5, inner_steps=4, keep_on_retry=True)
    first = planner.plan([1, 2, 3], 0, 10, 6, 0)
    assert first.inner_steps == 4 and sum(w.main.count for w in first.work.values()) == 24
    lost = first.work[2].main
    again = planner.plan([1, 3, 4], 0, 10, 6, 0)  # 2 died, 4 joined
    assert again.work[1].main == first.work[1].main and again.work[3].main == first.work[3].main
    assert again.work[1].extra == (lost,) and again.work[3].extra == ()
    assert again.work[4].main.count == 0 and again.work[4].extra == ()
    msg = again.message(1, epoch=0, generation=3)
    assert (msg.inner_steps, msg.extra_ranges, msg.sample_count) == (4, [[lost.start, lost.count]],
                                                                     first.work[1].main.count)
    third = planner.plan([3], 0, 10, 6, 0)  # 1 dies too: its range and its extra go to 3
    assert third.work[3].extra == (first.work[1].main, lost)
    planner.committed(0)
    assert planner.last_committed == 0
    tail = planner.plan([1, 3], 8, 10, 6, 48)  # only 2 steps left
    assert tail.inner_steps == 2 and sum(w.main.count for w in tail.work.values()) == 12
    assert tail.work[1].main in (SampleRange(48, 6), SampleRange(54, 6))


def test_due_after_commit_counts_the_steps_a_round_crossed():
    assert due_after_commit(4, 100, 4, 0).validate  # one step: 3 -> 4
    assert not due_after_commit(7, 100, 4, 0, previous=5).validate
    assert due_after_commit(9, 100, 4, 8, previous=5) == due_after_commit(8, 100, 4, 8)  # 5 -> 9 crosses 8
    assert not due_after_commit(12, 12, 4, 4, previous=8).validate  # the end is the cooldown's


def test_dashboard_shows_mb_per_step_and_counts_round_steps():
    base = {"ts": 1.0, "run_id": "r", "role": "coordinator"}
    events = [{**base, "event": "launch", "name": "d", "num_clients": 1, "tiers": [0], "total_steps": 8},
              {**base, "event": "client_joined", "client_id": 1, "tier": 0, "ffn_width": 64},
              {**base, "ts": 2.0, "event": "step_committed", "step": 0, "inner_steps": 4, "tokens": 10,
               "step_wall_s": 1.0, "total_steps": 8, "members": [1]},
              {**base, "ts": 2.1, "event": "client_step", "client_id": 1, "step": 0, "tier": 0, "ffn_width": 64,
               "inner_steps": 4, "bytes_sent": 1_084_560, "loss": 5.0}]
    snap = build_snapshot(events)
    assert snap.steps_done == 4 and snap.clients[1].sent_mb_per_step == pytest.approx(0.27114)
    assert "MB/step" in render_text(snap, now=3.0, view=View()) and "0.271" in render_text(snap, now=3.0, view=View())

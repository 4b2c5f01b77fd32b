"""`--sync demo` and `--sync diloco` as steppers, ranks as threads (`thread_group.py`), on a small model.

What the issue's acceptance asks at this level: DeMo with k = every coefficient and float32 values
is -lr * sign of the exact masked average (and `raw` is SGD on it), across mixed tiers; a block
nobody owns stays bit-identical; a discarded DeMo round leaves the momentum as it was; DiLoCo with
H = 1, inner SGD, outer lr 1 and momentum 0 is `--sync allreduce` with SGD; DiLoCo replicas agree
bit for bit after every outer step, also after a failed exchange that survivors redo with their
kept progress; bytes per step of demo k=8 1-bit are under 1/100 of allreduce's on the 20M layout.
"""

from __future__ import annotations

import pytest
import torch
from thread_group import ThreadGroup

from hetero_testnet.config import (DemoSyncConfig, DiLoCoConfig, LRScheduleConfig, ModelConfig, OptimizerConfig,
                                   RunConfig, SyncConfig, SYNC_MODES)
from hetero_testnet.errors import PeerLostError
from hetero_testnet.exchange.aggregation import apply_average, grad_views, layout_for_model, pack_contribution
from hetero_testnet.exchange.demo_layout import DemoConfig, allreduce_bytes, build_demo_layout
from hetero_testnet.exchange.diloco_stepper import DiLoCoStepper
from hetero_testnet.exchange.modes import STEPPERS, build_stepper
from hetero_testnet.exchange.stepper import RangeWork, RoundWork, build_round_work
from hetero_testnet.exchange.strategies import sync_names
from hetero_testnet.model.checkpoint import parameter_checksum
from hetero_testnet.model.matformer import NeuronSet, build_neuron_masks
from hetero_testnet.model.nanogpt import NanoGPT, build_model
from hetero_testnet.model.train import forward_backward

SMALL = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_seq_len=8)
LR = 0.01
TIERS = (0, 1, 2)


def _cfg(tiny_config: RunConfig, sync: SyncConfig, *, kind: str = "AdamW", wd: float = 0.0,
         clip: float = 0.0) -> RunConfig:
    return tiny_config.replace(model=SMALL, sync=sync, optimizer=OptimizerConfig(kind=kind, weight_decay=wd,
                                                                                 clip_grad_norm=clip),
                               lr_schedule=LRScheduleConfig(base_lr=LR, warmup_steps=0, total_steps=100, final_lr=LR))


def _tokens(seed: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (rows, SMALL.max_seq_len + 1), generator=gen)


def _samples(start: int, count: int) -> torch.Tensor:
    """Deterministic fake samples by id: sample i is always the same sequence."""
    return torch.stack([_tokens(1000 + i, 1)[0] for i in range(start, start + count)])


def _steppers(cfg: RunConfig, group: ThreadGroup, tiers=TIERS, helper_fraction: float = 0.0):
    models = [build_model(cfg.model, 0) for _ in tiers]
    return models, group.run(lambda r, ex: build_stepper(cfg.sync.mode, models[r], cfg, ex, tier=tiers[r],
                                                         helper_fraction=helper_fraction, rotation_interval=1))


def _round(steppers, group, step, ranges, inner_steps=1, commit=True):
    """Every rank runs (and commits) the round at `step`; ranges[r] = [(start, count), ...] of rank r."""
    def one(rank, ex):
        st = steppers[rank]
        st.sync.exchange = ex
        out = st.run_round(build_round_work(step, ranges[rank], inner_steps, _samples, st.neurons))
        if commit:
            st.commit(LR)
        return out
    return group.run(one)


def _exact_average(cfg, models, steppers, ranges, step=0):
    """The allreduce rule on the clients' gradients at the current weights: holders-only, token-weighted."""
    layout = layout_for_model(models[0], SMALL.num_hidden_layers, SMALL.intermediate_size)
    total = torch.zeros(layout.total_numel)
    for model, st, rng in zip(models, steppers, ranges):
        probe = NanoGPT(SMALL)
        probe.load_state_dict(model.state_dict())
        neurons = st.neurons(step)
        _, tokens = forward_backward(probe, _samples(*rng[0]), neurons, 0)
        buf = torch.zeros(layout.total_numel)
        for name, p in probe.named_parameters():
            grad_views(buf, layout)[name].copy_(p.grad)
        total += pack_contribution(buf, layout, build_neuron_masks(neurons, SMALL.intermediate_size,
                                                                   SMALL.num_hidden_layers), tokens)
    apply_average(total, layout)
    return {k: v.clone() for k, v in grad_views(total, layout).items()}


# --------------------------------------------------------------------------- demo

@pytest.mark.parametrize("apply", ["sign", "raw"])
def test_demo_full_k_is_sign_of_the_exact_masked_average(tiny_config, apply):
    # k = every coefficient of an 8 x 8 block, float32: the momentum (lr * g on the first step) is
    # sent whole, so the decoded mean is the exact masked, token-weighted average times lr.
    sync = SyncConfig(mode="demo", demo=DemoSyncConfig(topk=64, chunk=8, decay=0.9, apply=apply))
    cfg = _cfg(tiny_config, sync)
    group = ThreadGroup(3)
    models, steppers = _steppers(cfg, group)
    ranges = [[(0, 3)], [(3, 1)], [(4, 2)]]  # unequal tokens: the weighting matters
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    avg = _exact_average(cfg, models, steppers, ranges)
    outs = _round(steppers, group, 0, ranges)
    assert len({parameter_checksum(m) for m in models}) == 1
    assert outs[0].bytes_sent == 2 * steppers[0].demo.payload_bytes
    for name, p in models[0].named_parameters():
        old, g = before[0][name], avg[name]
        if apply == "raw":  # p - decoded = p - lr * avg: SGD on the exact average
            torch.testing.assert_close(p.detach(), old - LR * g, rtol=0, atol=1e-8)
            continue
        clear = g.abs() > 1e-5 * float(g.abs().max())
        assert torch.equal(p.detach()[clear], (old - LR * torch.sign(g))[clear]), name


def test_demo_block_owned_by_nobody_is_untouched_decay_included(tiny_config):
    sync = SyncConfig(mode="demo", demo=DemoSyncConfig(topk=8, chunk=8, quantize_1bit=True))
    cfg = _cfg(tiny_config, sync, wd=0.1)
    group = ThreadGroup(2)
    models, steppers = _steppers(cfg, group, tiers=(1, 2))  # nobody computes neurons 32..63
    before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    _round(steppers, group, 0, [[(0, 2)], [(2, 2)]])
    changed_prefix = False
    for name, p in models[0].named_parameters():
        if ".mlp." in name:
            axis = 1 if "down_proj" in name else 0
            assert torch.equal(p.detach().narrow(axis, 32, 32), before[name].narrow(axis, 32, 32)), name
            changed_prefix |= not torch.equal(p.detach().narrow(axis, 0, 32), before[name].narrow(axis, 0, 32))
    assert changed_prefix


def test_demo_discard_restores_the_momentum_so_the_repeat_is_exact(tiny_config):
    sync = SyncConfig(mode="demo", demo=DemoSyncConfig(topk=4, chunk=8, decay=0.9))
    cfg = _cfg(tiny_config, sync)
    group = ThreadGroup(2)
    models, steppers = _steppers(cfg, group, tiers=(0, 1))
    ranges = [[(0, 2)], [(2, 2)]]
    _round(steppers, group, 0, ranges)  # a committed step: the momentum is no longer zero
    momentum = [{k: v.clone() for k, v in st.delta.items()} for st in steppers]
    _round(steppers, group, 1, ranges, commit=False)
    first = [{k: v.clone() for k, v in st.pending.updates.items()} for st in steppers]
    for st, saved in zip(steppers, momentum):
        st.discard()
        assert all(torch.equal(st.delta[k], v) for k, v in saved.items())
    _round(steppers, group, 1, ranges, commit=False)
    for st, upd in zip(steppers, first):
        assert all(torch.equal(st.pending.updates[k], v) for k, v in upd.items())


def test_demo_failed_gather_restores_the_momentum(tiny_config):
    sync = SyncConfig(mode="demo", demo=DemoSyncConfig(topk=4, chunk=8))
    cfg = _cfg(tiny_config, sync)
    group = ThreadGroup(2)
    _, steppers = _steppers(cfg, group, tiers=(0, 1))
    zero = [{k: v.clone() for k, v in st.delta.items()} for st in steppers]
    group.fail_next()
    with pytest.raises(PeerLostError):
        _round(steppers, group, 0, [[(0, 2)], [(2, 2)]], commit=False)
    for st, saved in zip(steppers, zero):
        assert st.pending is None and all(torch.equal(st.delta[k], v) for k, v in saved.items())


def test_demo_k8_1bit_is_under_a_hundredth_of_allreduce_on_the_20m_layout():
    with torch.device("meta"):
        model = NanoGPT(ModelConfig())  # the 20M config's shapes
    layout = layout_for_model(model, 8, 1024)
    demo = build_demo_layout(layout, DemoConfig(topk=8, chunk=64, quantize_1bit=True))
    world = 3
    demo_sent = (world - 1) * demo.payload_bytes  # DemoSync.payload_bytes_sent
    allreduce_sent = 2 * (world - 1) * (allreduce_bytes(layout) + world * 8) // world  # the reducer's ring model
    assert demo.payload_bytes == 271_140 and demo_sent * 100 <= allreduce_sent
    assert allreduce_sent // demo_sent == 335


# --------------------------------------------------------------------------- diloco

def test_diloco_h1_sgd_outer_lr1_momentum0_equals_allreduce_with_sgd(tiny_config):
    ranges_by_step = [[[(0, 3)], [(3, 1)], [(4, 2)]], [[(6, 1)], [(7, 2)], [(9, 3)]], [[(12, 2)], [(14, 2)], [(16, 2)]]]
    finals = {}
    for mode in ("allreduce", "diloco"):
        sync = SyncConfig(mode=mode, diloco=DiLoCoConfig(inner_steps=1, outer_lr=1.0, outer_momentum=0.0))
        cfg = _cfg(tiny_config, sync, kind="SGD", wd=0.1)  # clip 0: diloco clips locally, allreduce globally
        group = ThreadGroup(3)
        models, steppers = _steppers(cfg, group, helper_fraction=0.25)
        for step, ranges in enumerate(ranges_by_step):
            _round(steppers, group, step, ranges)
        assert len({parameter_checksum(m) for m in models}) == 1
        finals[mode] = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    # The same update up to float32 rounding of theta - theta_local: a few ulps (4 ulps = 4.8e-7 relative).
    for name, a in finals["allreduce"].items():
        torch.testing.assert_close(finals["diloco"][name], a, rtol=5e-7, atol=1e-9, msg=name)


def test_diloco_replicas_agree_and_a_failed_exchange_keeps_local_progress(tiny_config, monkeypatch):
    sync = SyncConfig(mode="diloco", diloco=DiLoCoConfig(inner_steps=3))
    cfg = _cfg(tiny_config, sync, clip=1.0, wd=0.1)
    group = ThreadGroup(3)
    models, steppers = _steppers(cfg, group, helper_fraction=0.5)
    _round(steppers, group, 0, [[(0, 6)], [(6, 6)], [(12, 6)]], inner_steps=3)
    assert len({parameter_checksum(m) for m in models}) == 1
    assert len({st.shared_checksum() for st in steppers}) == 1
    trained = []
    monkeypatch.setattr(DiLoCoStepper, "_inner_step",
                        lambda self, batch, progress, orig=DiLoCoStepper._inner_step:
                        (batch.tokens is not None and trained.append(batch.step), orig(self, batch, progress)))
    group.fail_next()  # rank 2 is lost during the exchange
    with pytest.raises(PeerLostError):
        _round(steppers, group, 3, [[(18, 6)], [(24, 6)], [(30, 6)]], inner_steps=3, commit=False)
    assert len(trained) == 9
    survivors, trained[:] = ThreadGroup(2), []
    for st in steppers[:2]:
        st.discard()
    # the repeat (as run/rounds.py plans it): each survivor keeps its range; the lost range goes whole
    # to the first survivor as an extra range, trained in 3 inner steps before the exchange
    def again(rank, ex):
        st = steppers[rank]
        st.sync.exchange = ex
        ranges = [[(18, 6), (30, 6)], [(24, 6)]][rank]
        work = build_round_work(3, ranges, 3, _samples, st.neurons)
        out = st.run_round(work)
        st.commit(LR)
        return out
    outs = survivors.run(again)
    assert len(trained) == 3  # only the lost member's range was trained; the kept progress was reused
    assert outs[0].tokens == 12 * SMALL.max_seq_len and outs[1].tokens == 6 * SMALL.max_seq_len
    assert parameter_checksum(models[0]) == parameter_checksum(models[1])


def test_diloco_joiner_receives_theta_and_outer_momentum(tiny_config):
    sync = SyncConfig(mode="diloco", diloco=DiLoCoConfig(inner_steps=2))
    cfg = _cfg(tiny_config, sync)
    group = ThreadGroup(2)
    models, steppers = _steppers(cfg, group, tiers=(0, 1))
    _round(steppers, group, 0, [[(0, 4)], [(4, 4)]], inner_steps=2)
    joiner = DiLoCoStepper(build_model(SMALL, 5), cfg, steppers[0].sync, tier=2)
    flat = torch.cat([t.reshape(-1) for t in steppers[0].state_tensors()])
    joiner.load_state(flat, behind=True)
    assert joiner.shared_checksum() == steppers[0].shared_checksum() == parameter_checksum(joiner.model)
    assert all(torch.equal(joiner.momentum[k], v) for k, v in steppers[0].momentum.items())
    assert any(bool(v.any()) for v in joiner.momentum.values())


def test_diloco_bf16_halves_the_gradient_bytes(tiny_config):
    outs = {}
    for bf16 in (False, True):
        cfg = _cfg(tiny_config, SyncConfig(mode="diloco", diloco=DiLoCoConfig(inner_steps=1, bf16=bf16)))
        group = ThreadGroup(2)
        models, steppers = _steppers(cfg, group, tiers=(0, 1))
        outs[bf16] = _round(steppers, group, 0, [[(0, 2)], [(2, 2)]])[0]
        assert len({parameter_checksum(m) for m in models}) == 1
    layout = steppers[0].layout
    counts = layout.total_numel - layout.grad_numel
    # at W = 2 a ring sends 2 (W - 1) / W = all of it: gradients (bf16: 2 bytes each), counts, norm partials
    assert outs[False].bytes_sent == layout.grad_numel * 4 + counts * 4 + 16
    assert outs[True].bytes_sent == layout.grad_numel * 2 + counts * 4 + 16


# --------------------------------------------------------------------------- plumbing

def test_every_sync_mode_has_a_strategy_and_a_stepper():
    assert SYNC_MODES == sync_names() == tuple(STEPPERS)


def test_round_work_cuts_each_range_into_inner_steps():
    seen = []
    work = build_round_work(10, [(100, 7), (200, 0)], 3, lambda s, c: (seen.append((s, c)), torch.zeros(c, 2))[1],
                            lambda step: NeuronSet(prefix_width=1))
    assert [(u.start, u.count) for u in work.units] == [(100, 7), (200, 0)]
    assert seen == [(100, 3), (103, 2), (105, 2)]
    assert [b.step for b in work.units[0].batches] == [10, 11, 12]
    assert all(b.tokens is None for b in work.units[1].batches)
    assert isinstance(work, RoundWork) and isinstance(work.units[0], RangeWork)

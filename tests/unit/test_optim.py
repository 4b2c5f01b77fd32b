"""LR schedule, clipping helpers and MaskedAdamW (against torch.optim.AdamW, and its masking)."""

from __future__ import annotations

import pytest
import torch

from hetero_testnet.config import LRScheduleConfig, OptimizerConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.matformer import expand_neuron_vector, ffn_neuron_axis, is_ffn_param
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.optim import MaskedAdamW, clip_coefficient, lr_at, step_lr

OPT = OptimizerConfig(betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


# --------------------------------------------------------------------------- lr_at

def test_lr_at_known_points():
    cfg = LRScheduleConfig(base_lr=6e-4, warmup_steps=50, warmup_init_lr=0.0, total_steps=100, final_lr=6e-5)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(25, cfg) == pytest.approx(3e-4)
    assert lr_at(50, cfg) == pytest.approx(6e-4)  # end of warmup: cos(0) = 1
    assert lr_at(75, cfg) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_at(100, cfg) == pytest.approx(6e-5)
    assert lr_at(250, cfg) == pytest.approx(6e-5)  # clamped past total_steps
    lrs = [lr_at(s, cfg) for s in range(50, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_0_trains_at_the_references_step_1_rate():
    """Steps count from 0 here and from 1 in Psyche: step s takes lr_at(s + 1), so the first step
    moves the weights even when warmup starts at 0, and the last step reaches final_lr."""
    cfg = LRScheduleConfig(base_lr=6e-4, warmup_steps=50, warmup_init_lr=0.0, total_steps=100, final_lr=6e-5)
    assert step_lr(0, cfg) == pytest.approx(6e-4 / 50) and step_lr(0, cfg) > 0
    assert step_lr(49, cfg) == pytest.approx(6e-4)
    assert step_lr(99, cfg) == pytest.approx(6e-5)
    assert [step_lr(s, cfg) for s in range(120)] == [lr_at(s + 1, cfg) for s in range(120)]


def test_lr_at_edge_cases():
    no_warmup = LRScheduleConfig(base_lr=1.0, warmup_steps=0, warmup_init_lr=0.0, total_steps=10, final_lr=0.0)
    assert lr_at(0, no_warmup) == 1.0 and lr_at(10, no_warmup) == pytest.approx(0.0, abs=1e-12)
    init = LRScheduleConfig(base_lr=1.0, warmup_steps=4, warmup_init_lr=0.2, total_steps=10, final_lr=0.0)
    assert lr_at(0, init) == pytest.approx(0.2) and lr_at(2, init) == pytest.approx(0.6)
    short = LRScheduleConfig(base_lr=1.0, warmup_steps=10, warmup_init_lr=0.0, total_steps=5, final_lr=0.1)
    assert lr_at(5, short) == pytest.approx(0.5) and lr_at(10, short) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_at(-1, init)


# --------------------------------------------------------------------------- clipping helpers

def test_clip_coefficient():
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25)
    assert clip_coefficient(100.0, 0.0) == 1.0  # disabled
    # same coefficient as torch's clip_grad_norm_ (the reducer's whole clip: tests/unit/test_reducer.py)
    a = torch.zeros(3, requires_grad=True)
    a.grad = torch.tensor([1.0, 2.0, 2.0])
    torch.nn.utils.clip_grad_norm_([a], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([1.0, 2.0, 2.0]) * clip_coefficient(3.0, 1.0))


# --------------------------------------------------------------------------- MaskedAdamW

def _prefix_masks(model, width, intermediate_size):
    """Update masks of a client computing the first `width` FFN neurons (None off the FFN)."""
    held = torch.arange(intermediate_size) < width
    return {n: expand_neuron_vector(held, ffn_neuron_axis(n)) if is_ffn_param(n) else None
            for n, _ in model.named_parameters()}


def _model_pair(tiny_config):
    a = build_model(tiny_config.model, seed=0)
    b = build_model(tiny_config.model, seed=0)
    return a, b


def _random_grads(model, gen, zero_outside=None):
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
        if zero_outside is not None and zero_outside[name] is not None:
            p.grad = p.grad * zero_outside[name]


def _torch_adamw(model, lr):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=OPT.betas, eps=OPT.eps, foreach=False)


def test_unmasked_equals_torch_adamw(tiny_config):
    ours, ref = _model_pair(tiny_config)
    opt = MaskedAdamW(list(ours.named_parameters()), OPT)
    ref_opt = _torch_adamw(ref, 1e-3)
    gen = torch.Generator().manual_seed(0)
    for step, lr in enumerate([1e-3, 3e-3, 2e-3, 5e-4, 1e-3]):
        _random_grads(ours, gen)
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step(lr, {})
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
        st, rst = opt.state[name], ref_opt.state[q]
        torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        assert torch.all(st["step"] == 5)
    norm = dict(ours.named_parameters())["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))  # norms trained ...
    # ... but not decayed: with zero gradients only the matrices move
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    fresh = MaskedAdamW(list(ours.named_parameters()), OPT)
    for p in ours.parameters():
        p.grad = torch.zeros_like(p)
    fresh.step(1e-2, {})
    for name, p in ours.named_parameters():
        assert torch.equal(p, before[name]) == (p.dim() < 2), name


def test_masked_elements_untouched_and_others_equal_adamw(tiny_config):
    ours, ref = _model_pair(tiny_config)
    masks = _prefix_masks(ours, 16, tiny_config.model.intermediate_size)
    opt = MaskedAdamW(list(ours.named_parameters()), OPT)
    ref_opt = _torch_adamw(ref, 2e-3)
    initial = {n: p.detach().clone() for n, p in ours.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        _random_grads(ours, gen)  # nonzero everywhere: masking must not rely on zero gradients
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step(2e-3, masks)
        ref_opt.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        mask = masks[name]
        if mask is None:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
            continue
        keep = mask.expand_as(p)
        assert torch.equal(p[~keep], initial[name][~keep]), name  # no decay, no update: bit-identical
        assert torch.count_nonzero(opt.state[name]["exp_avg"][~keep]) == 0
        assert torch.count_nonzero(opt.state[name]["exp_avg_sq"][~keep]) == 0
        assert opt.state[name]["step"].shape == mask.shape
        assert torch.equal(opt.state[name]["step"], mask.float() * 4)
        torch.testing.assert_close(p[keep], q[keep], rtol=1e-6, atol=1e-6, msg=name)


def test_per_neuron_step_counts_with_rotating_masks():
    """A neuron updated only at steps 2 and 3 ends exactly as AdamW run for two steps on those grads."""
    p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    name = "model.layers.0.mlp.gate_proj.weight"
    opt = MaskedAdamW([(name, p)], OPT)
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    masks = [torch.tensor([[True], [True], [False], [False]]),
             torch.tensor([[True], [False], [True], [False]]),
             torch.tensor([[True], [False], [True], [False]])]
    ref = torch.nn.Parameter(p.detach()[2:3].clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=OPT.betas, eps=OPT.eps, weight_decay=OPT.weight_decay,
                                foreach=False)
    start = p.detach().clone()
    for g, mask in zip(grads, masks):
        p.grad = g
        opt.step(1e-2, {name: mask})
    for g in grads[1:]:
        ref.grad = g[2:3].clone()
        ref_opt.step()
    assert opt.state[name]["step"].flatten().tolist() == [3.0, 1.0, 2.0, 0.0]
    torch.testing.assert_close(p.detach()[2:3], ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(p.detach()[3], start[3])


def test_update_is_bit_identical_across_thread_counts(tiny_config):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            model = build_model(tiny_config.model, seed=0)
            masks = _prefix_masks(model, 24, tiny_config.model.intermediate_size)
            opt = MaskedAdamW(list(model.named_parameters()), OPT)
            gen = torch.Generator().manual_seed(2)
            for _ in range(3):
                _random_grads(model, gen)
                opt.step(1e-3, masks)
            results.append({**{k: v.detach().clone() for k, v in model.state_dict().items()},
                            **opt.state_dict()})
    finally:
        torch.set_num_threads(threads)
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_state_dict_round_trip_and_errors(tiny_config):
    a, b = _model_pair(tiny_config)
    opt_a = MaskedAdamW(list(a.named_parameters()), OPT)
    gen = torch.Generator().manual_seed(3)
    _random_grads(a, gen)
    opt_a.step(1e-3, {})
    b.load_state_dict(a.state_dict())
    opt_b = MaskedAdamW(list(b.named_parameters()), OPT)
    opt_b.load_state_dict(opt_a.state_dict())
    _random_grads(a, torch.Generator().manual_seed(4))
    _random_grads(b, torch.Generator().manual_seed(4))
    opt_a.step(1e-3, {})
    opt_b.step(1e-3, {})
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sd = opt_a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    with pytest.raises(ConfigError, match="unknown"):
        opt_b.load_state_dict({**sd, "nope.exp_avg": torch.zeros(1)})
    bad = dict(sd)
    bad["lm_head.weight.exp_avg"] = torch.zeros(3)
    with pytest.raises(ConfigError, match="shape"):
        opt_b.load_state_dict(bad)
    with pytest.raises(ConfigError, match="lacks"):
        opt_b.load_state_dict({k: v for k, v in sd.items() if not k.startswith("lm_head")})

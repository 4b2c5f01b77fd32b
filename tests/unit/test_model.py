"""NanoGPT: sizes and names, deterministic init, causal LLaMA math, the chunked loss, MatFormer FFN slicing."""

from __future__ import annotations

import math

import pytest
import torch

from hetero_testnet.config import ModelConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.matformer import NeuronSet, build_neuron_set, ffn_width, slice_ffn_state_dict
from hetero_testnet.model.nanogpt import NanoGPT, RMSNorm, apply_rope, build_model, count_parameters, rope_cache


def _tokens(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)  # (B, T+1)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- 20M model

@pytest.fixture(scope="module")
def model_20m():
    return build_model(ModelConfig(), seed=1337)


def test_20m_parameter_count(model_20m):
    n = count_parameters(model_20m)
    print(f"NanoGPT-20M parameters: {n:,}")
    # 2 * 50257 * 256 (embedding + head) + 8 * (4 * 256^2 + 3 * 256 * 1024 + 2 * 256) + 256
    assert n == 2 * 50257 * 256 + 8 * (4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256) + 256 == 34_124_544


def test_20m_initial_loss_near_uniform(model_20m):
    tokens = _tokens(model_20m.config, batch=2, seq=64)
    with torch.no_grad():
        loss = float(model_20m.loss(tokens))
    assert abs(loss - math.log(50257)) < 0.15


# --------------------------------------------------------------------------- names and init

def test_hugging_face_llama_names(tiny_model, tiny_config):
    L = tiny_config.model.num_hidden_layers
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(L):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(tiny_model.state_dict()) == expected  # RoPE tables are not persistent
    assert not any(n.endswith("bias") for n, _ in tiny_model.named_parameters())


def test_init_is_deterministic_and_leaves_global_rng_alone(tiny_config):
    before = torch.get_rng_state()
    a = build_model(tiny_config.model, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(tiny_config.model, seed=5)
    c = build_model(tiny_config.model, seed=6)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name


def test_init_distribution(tiny_model, tiny_config):
    std = tiny_config.model.init_std
    for name, p in tiny_model.state_dict().items():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(float(p.mean())) < 5 * std / math.sqrt(p.numel()), name
            assert abs(float(p.std()) - std) < 0.1 * std, name


# --------------------------------------------------------------------------- building blocks

def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    expected = norm.weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)


def test_rope_rotates_pairs_i_and_i_plus_half():
    hs, T = 8, 5
    cos, sin = rope_cache(hs, T, 10000.0)
    x = torch.randn(1, 1, T, hs, generator=torch.Generator().manual_seed(0))
    y = apply_rope(x, cos, sin)
    for t in range(T):
        for i in range(hs // 2):
            angle = t * 10000.0 ** (-2 * i / hs)
            a, b = x[0, 0, t, i], x[0, 0, t, i + hs // 2]
            torch.testing.assert_close(y[0, 0, t, i], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(y[0, 0, t, i + hs // 2], b * math.cos(angle) + a * math.sin(angle))


def test_forward_shape_dtype_and_causality(tiny_model, tiny_config):
    tokens = _tokens(tiny_config.model, 2, 16)[:, :-1]  # (2, 16)
    with torch.no_grad():
        logits = tiny_model(tokens)
        changed = tokens.clone()
        changed[:, 10] = (changed[:, 10] + 1) % tiny_config.model.vocab_size
        logits2 = tiny_model(changed)
    assert logits.shape == (2, 16, tiny_config.model.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, :10], logits2[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_sequence_longer_than_max_seq_len_is_config_error(tiny_model, tiny_config):
    tokens = _tokens(tiny_config.model, 1, tiny_config.model.max_seq_len + 1)
    with pytest.raises(ConfigError, match="max_seq_len"):
        tiny_model.loss(tokens)


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("neurons", [None, NeuronSet(prefix_width=16)])
def test_chunked_loss_matches_plain_loss_and_grads(tiny_model, tiny_config, neurons):
    tokens = _tokens(tiny_config.model, 3, 32)  # 96 targets: chunks of 40 leave a partial one
    tiny_model.zero_grad()
    plain = tiny_model.loss(tokens, neurons, chunk_tokens=0)
    plain.backward()
    g_plain = _grads(tiny_model)
    tiny_model.zero_grad()
    chunked = tiny_model.loss(tokens, neurons, chunk_tokens=40)
    (chunked * 0.5).backward()  # the incoming gradient is honoured, not assumed 1
    g_chunked = _grads(tiny_model)
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-6 * abs(float(plain.detach()))
    for name in g_plain:
        if g_plain[name].abs().sum() > 0:
            assert _rel_err(2 * g_chunked[name], g_plain[name]) < 1e-6, name
        else:
            assert torch.equal(g_chunked[name], g_plain[name]), name


def test_loss_equals_cross_entropy_of_forward(tiny_model, tiny_config):
    tokens = _tokens(tiny_config.model, 2, 20)
    with torch.no_grad():
        logits = tiny_model(tokens[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        assert abs(float(tiny_model.loss(tokens)) - float(expected)) < 1e-5


# --------------------------------------------------------------------------- MatFormer FFN

def test_tier0_neuron_set_is_the_plain_model(tiny_model, tiny_config):
    tokens = _tokens(tiny_config.model, 2, 16)[:, :-1]
    full = NeuronSet(prefix_width=tiny_config.model.intermediate_size)
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), tiny_model(tokens, full))


def test_tier1_gradient_is_exactly_zero_outside_the_prefix(tiny_model, tiny_config):
    m = tiny_config.model
    w = ffn_width(m.intermediate_size, 1)
    tiny_model.loss(_tokens(m, 2, 16), NeuronSet(prefix_width=w)).backward()
    for i, layer in enumerate(tiny_model.model.layers):
        mlp = layer.mlp
        for g in (mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad):  # (I, C): neurons are rows
            assert torch.count_nonzero(g[w:]) == 0, i
            assert torch.count_nonzero(g[:w]) > 0.9 * g[:w].numel(), i
        g = mlp.down_proj.weight.grad  # (C, I): neurons are columns
        assert torch.count_nonzero(g[:, w:]) == 0, i
        assert torch.count_nonzero(g[:, :w]) > 0.9 * g[:, :w].numel(), i
    for name, p in tiny_model.named_parameters():
        if ".mlp." not in name:
            assert torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_tier_equals_physically_sliced_model(tiny_model, tiny_config, tier):
    m = tiny_config.model
    w = ffn_width(m.intermediate_size, tier)
    small = NanoGPT(ModelConfig(**{**{f: getattr(m, f) for f in m.__slots__}, "intermediate_size": w}))
    small.load_state_dict(slice_ffn_state_dict(tiny_model.state_dict(), w))
    tokens = _tokens(m, 2, 24)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens[:, :-1], NeuronSet(prefix_width=w)), small(tokens[:, :-1]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiny_model.loss(tokens, NeuronSet(prefix_width=w)), small.loss(tokens),
                                   rtol=1e-6, atol=1e-6)


def test_helpers_get_gradient_and_other_suffix_neurons_none(tiny_model, tiny_config):
    m = tiny_config.model
    neurons = build_neuron_set(m, tier=2, helper_fraction=0.5, rotation_interval=4, seed=1, step=0)
    w = neurons.prefix_width
    assert neurons.num_helpers == w // 2
    tiny_model.loss(_tokens(m, 2, 16), neurons).backward()
    for i, layer in enumerate(tiny_model.model.layers):
        computed = torch.zeros(m.intermediate_size, dtype=torch.bool)
        computed[:w] = True
        computed[neurons.helpers[i]] = True
        row_has_grad = layer.mlp.gate_proj.weight.grad.abs().sum(1) > 0
        col_has_grad = layer.mlp.down_proj.weight.grad.abs().sum(0) > 0
        assert torch.equal(row_has_grad, computed), i
        assert torch.equal(col_has_grad, computed), i
        assert torch.equal(layer.mlp.up_proj.weight.grad.abs().sum(1) > 0, computed), i


def test_helper_output_equals_model_of_selected_neurons(tiny_model, tiny_config):
    """Helpers compute exactly the FFN made of the chosen rows/columns (order does not matter)."""
    m = tiny_config.model
    neurons = build_neuron_set(m, tier=1, helper_fraction=0.25, rotation_interval=1, seed=3, step=7)
    k = neurons.prefix_width + neurons.num_helpers
    small = NanoGPT(ModelConfig(**{**{f: getattr(m, f) for f in m.__slots__}, "intermediate_size": k}))
    state = dict(tiny_model.state_dict())
    for i in range(m.num_hidden_layers):
        idx = neurons.layer_selection(i)
        for p in ("gate", "up"):
            state[f"model.layers.{i}.mlp.{p}_proj.weight"] = state[f"model.layers.{i}.mlp.{p}_proj.weight"][idx]
        state[f"model.layers.{i}.mlp.down_proj.weight"] = state[f"model.layers.{i}.mlp.down_proj.weight"][:, idx]
    small.load_state_dict(state)
    tokens = _tokens(m, 2, 16)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens, neurons), small(tokens), rtol=1e-5, atol=1e-5)

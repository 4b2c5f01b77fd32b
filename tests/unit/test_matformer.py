"""MatFormer tiers: widths, helper sampling, neuron sets, masks and parameter-name helpers."""

from __future__ import annotations

import pytest
import torch

from hetero_testnet.errors import ConfigError
from hetero_testnet.model.matformer import (NeuronSet, build_neuron_masks, build_neuron_set, expand_neuron_vector,
                                            ffn_layer, ffn_neuron_axis, ffn_width, is_ffn_param, neuron_mask,
                                            sample_helpers, slice_ffn_state_dict)

I = 1024


def test_ffn_width_halves_per_tier():
    assert [ffn_width(I, t) for t in range(4)] == [1024, 512, 256, 128]
    assert ffn_width(I, 10) == 1


@pytest.mark.parametrize("tier", [-1, 11, 1.0, "1", True, None])
def test_ffn_width_rejects_bad_tiers(tier):
    with pytest.raises(ConfigError) as e:
        ffn_width(I, tier)
    message = str(e.value)
    assert "\n" not in message and "tier" in message and repr(tier).strip("'") in message


def _helpers(prefix, fraction=0.25, step=0, interval=16, seed=1, layers=4, inter=I):
    return sample_helpers(inter, prefix, fraction, seed=seed, step=step, rotation_interval=interval, num_layers=layers)


def test_sample_helpers_counts_range_and_order():
    hs = _helpers(512, 0.3)
    assert len(hs) == 4
    for h in hs:
        assert h.dtype == torch.long and h.numel() == int(512 * 0.3)  # floor
        assert int(h.min()) >= 512 and int(h.max()) < I
        assert torch.equal(h, torch.sort(h).values) and torch.unique(h).numel() == h.numel()
    assert not torch.equal(hs[0], hs[1])  # layers draw independently


def test_sample_helpers_capped_at_suffix_and_empty_at_tier0():
    assert all(torch.equal(h, torch.arange(512, 1024)) for h in _helpers(512, 1.0))  # 512 of a 512 suffix
    assert all(h.numel() == 256 for h in _helpers(768, 1.0))  # floor(768) capped at 256
    assert all(h.numel() == 0 for h in _helpers(I, 0.5))  # tier 0: no suffix
    assert all(h.numel() == 0 for h in _helpers(512, 0.0))


def test_sample_helpers_deterministic_and_rotating():
    a = _helpers(256, step=0, interval=16)
    assert all(torch.equal(x, y) for x, y in zip(a, _helpers(256, step=15, interval=16)))  # same window
    b = _helpers(256, step=16, interval=16)
    assert not any(torch.equal(x, y) for x, y in zip(a, b))  # next window: new draw
    assert all(torch.equal(x, y) for x, y in zip(b, _helpers(256, step=31, interval=16)))
    assert not torch.equal(a[0], _helpers(256, step=0, seed=2)[0])  # depends on the run seed
    before = torch.get_rng_state()
    _helpers(256)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "0.5", True])
def test_sample_helpers_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        _helpers(512, fraction)


@pytest.mark.parametrize("interval", [0, -3, 1.5])
def test_sample_helpers_rejects_bad_interval(interval):
    with pytest.raises(ConfigError, match="rotation interval"):
        _helpers(512, interval=interval)


def test_build_neuron_set(tiny_config):
    m = tiny_config.model
    full = build_neuron_set(m, 0, 0.5, 16, 1, 0)
    assert full.helpers is None and full.prefix_width == m.intermediate_size and full.is_full(m.intermediate_size)
    plain = build_neuron_set(m, 1, 0.0, 16, 1, 0)
    assert plain == NeuronSet(prefix_width=m.intermediate_size // 2) and plain.num_helpers == 0
    assert not plain.is_full(m.intermediate_size)
    helped = build_neuron_set(m, 1, 0.5, 16, 1, 0)
    assert helped.num_helpers == m.intermediate_size // 4 and len(helped.helpers) == m.num_hidden_layers
    assert helped == build_neuron_set(m, 1, 0.5, 16, 1, 15)
    assert hash(helped) == hash(build_neuron_set(m, 1, 0.5, 16, 1, 15))
    assert helped != build_neuron_set(m, 1, 0.5, 16, 1, 16)
    with pytest.raises(ConfigError, match="tier"):
        build_neuron_set(m, 7, 0.0, 16, 1, 0)


def test_neuron_mask_and_selection():
    ns = NeuronSet(prefix_width=4, helpers=(torch.tensor([5, 7]), torch.tensor([4, 6])))
    assert neuron_mask(ns, 8, 0).tolist() == [True] * 4 + [False, True, False, True]
    assert neuron_mask(ns, 8, 1).tolist() == [True] * 4 + [True, False, True, False]
    assert ns.layer_selection(0).tolist() == [0, 1, 2, 3, 5, 7]
    assert NeuronSet(prefix_width=4).layer_selection(0) == 4
    with pytest.raises(ValueError):
        NeuronSet(prefix_width=4, helpers=(torch.tensor([3]),))  # not in the suffix


def test_parameter_name_helpers():
    assert is_ffn_param("model.layers.3.mlp.gate_proj.weight")
    assert not is_ffn_param("model.layers.3.self_attn.q_proj.weight")
    assert not is_ffn_param("lm_head.weight")
    assert ffn_layer("model.layers.12.mlp.down_proj.weight") == 12
    assert ffn_neuron_axis("model.layers.0.mlp.gate_proj.weight") == 0
    assert ffn_neuron_axis("model.layers.0.mlp.up_proj.weight") == 0
    assert ffn_neuron_axis("model.layers.0.mlp.down_proj.weight") == 1
    with pytest.raises(ValueError):
        ffn_neuron_axis("model.norm.weight")
    v = torch.arange(6)
    assert expand_neuron_vector(v, ffn_neuron_axis("model.layers.0.mlp.up_proj.weight")).shape == (6, 1)
    assert expand_neuron_vector(v, ffn_neuron_axis("model.layers.0.mlp.down_proj.weight")).shape == (1, 6)


def test_neuron_masks_stack_every_layer():
    helpers = (torch.tensor([5]), torch.tensor([7]))
    masks = build_neuron_masks(NeuronSet(prefix_width=2, helpers=helpers), 8, 2)
    assert masks.shape == (2, 8) and masks.dtype == torch.bool
    assert masks[0].nonzero().flatten().tolist() == [0, 1, 5]
    assert masks[1].nonzero().flatten().tolist() == [0, 1, 7]
    assert torch.equal(masks[1], neuron_mask(NeuronSet(prefix_width=2, helpers=helpers), 8, 1))


def test_slicing(tiny_model, tiny_config):
    m = tiny_config.model
    sliced = slice_ffn_state_dict(tiny_model.state_dict(), 16)
    assert sliced["model.layers.0.mlp.gate_proj.weight"].shape == (16, m.hidden_size)
    assert sliced["model.layers.1.mlp.down_proj.weight"].shape == (m.hidden_size, 16)
    assert sliced["lm_head.weight"].shape == tiny_model.lm_head.weight.shape

"""MaskedGradientReducer, its sync strategies and NetworkFaults, without processes.

Old math: before the reducer, `train_single` clipped by `sqrt(sum_p sum(g_p.double() ** 2))` and
masked by the neuron set; the distributed client packed, summed, divided and clipped by hand.
"""

from __future__ import annotations

import math
import random
from unittest.mock import MagicMock

import pytest
import torch

from hetero_testnet.errors import ConfigError, PeerLostError, ProtocolError
from hetero_testnet.exchange.aggregation import (apply_average, build_layout, grad_views, layout_for_model,
                                                 pack_contribution, shard_bounds, sum_of_squares)
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.exchange.group import GradientExchange
from hetero_testnet.exchange.reducer import MaskedGradientReducer
from hetero_testnet.exchange.strategies import (AllReduceSync, NoSync, SingleProcess, SyncStrategy, build_sync,
                                                sync_names)
from hetero_testnet.model.checkpoint import parameter_checksum
from hetero_testnet.model.matformer import (build_neuron_masks, build_neuron_set, expand_neuron_vector, ffn_layer,
                                            ffn_neuron_axis, is_ffn_param, neuron_mask)
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.optim import MaskedAdamW, clip_coefficient
from hetero_testnet.model.train import forward_backward

L, I, C = 2, 4, 3  # layers, FFN width, hidden (plain-tensor layout)


def _layout():
    shapes = [("model.embed_tokens.weight", (5, C))]
    for i in range(L):
        shapes += [(f"model.layers.{i}.mlp.gate_proj.weight", (I, C)),
                   (f"model.layers.{i}.mlp.up_proj.weight", (I, C)),
                   (f"model.layers.{i}.mlp.down_proj.weight", (C, I))]
    return build_layout(shapes, L, I)


def _client_grads(layout, gen, width):
    """A buffer of random gradients, zero outside the first `width` neurons; and its neuron masks."""
    buf = torch.zeros(layout.total_numel)
    for slot in layout.slots:
        g = torch.randn(slot.shape, generator=gen)
        if slot.ffn_layer is not None:
            g.narrow(slot.neuron_axis, width, I - width).zero_()
        grad_views(buf, layout)[slot.name].copy_(g)
    masks = torch.zeros(L, I, dtype=torch.bool)
    masks[:, :width] = True
    return buf, masks


def _sum_in_rank_order(parts):
    total = parts[0].clone()
    for p in parts[1:]:
        total.add_(p)
    return total


class SimulatedGroup(SyncStrategy):
    """Rank `rank` of a group whose other members' packed buffers are known: SUM in rank order.

    The norm partials of the other ranks are computed from the same averaged buffer, as each of
    them would on its own identical copy.
    """

    name = "simulated"

    def __init__(self, rank, packed):
        super().__init__()
        self.rank, self.packed = rank, packed
        self.buffer = None

    def group(self):
        return self.rank, len(self.packed)

    def exchange_buffer(self, buffer):
        parts = [buffer if q == self.rank else p for q, p in enumerate(self.packed)]
        buffer.copy_(_sum_in_rank_order(parts))
        self.buffer = buffer
        return 0.0

    def sum_partials(self, partial):
        numel = _layout().grad_numel
        for q in range(len(self.packed)):
            if q != self.rank:
                partial[q] = sum_of_squares(self.buffer, *shard_bounds(numel, q, len(self.packed)))


def test_simulated_ranks_equal_apply_average_bit_for_bit():
    layout = _layout()
    gen = torch.Generator().manual_seed(0)
    tokens, widths = [30, 10, 20], [4, 2, 2]  # tiers 0, 1, 1
    clients = [_client_grads(layout, gen, w) for w in widths]
    packed = [pack_contribution(b.clone(), layout, m, t) for (b, m), t in zip(clients, tokens)]
    expected = _sum_in_rank_order(packed)
    expected_masks = apply_average(expected, layout)
    partials = [sum_of_squares(expected, *shard_bounds(layout.grad_numel, r, 3)) for r in range(3)]
    norm = (partials[0] + partials[1] + partials[2]) ** 0.5
    coef = clip_coefficient(norm, 0.5)
    assert coef < 1.0
    expected[:layout.grad_numel].mul_(coef)
    for rank, ((buf, masks), t) in enumerate(zip(clients, tokens)):
        reducer = MaskedGradientReducer(layout, SimulatedGroup(rank, packed), max_grad_norm=0.5)
        reducer.buffer.copy_(buf)
        out = reducer.reduce(masks, t)
        assert torch.equal(reducer.buffer[:layout.grad_numel], expected[:layout.grad_numel])
        assert out.grad_norm == norm and out.clip_coefficient == coef and out.clipped
        assert out.update_masks.keys() == expected_masks.keys()
        for name, mask in expected_masks.items():
            assert (mask is None and out.update_masks[name] is None) or torch.equal(mask, out.update_masks[name])
        assert out.bytes_moved == layout.total_numel * 4 + 3 * 8
        assert out.bytes_sent == out.bytes_received == 2 * 2 * out.bytes_moved // 3


def _old_update_masks(model, neurons, intermediate_size):
    """The deleted `matformer.build_update_masks`."""
    full = neurons.is_full(intermediate_size)
    return {name: None if full or not is_ffn_param(name) else
            expand_neuron_vector(neuron_mask(neurons, intermediate_size, ffn_layer(name)), ffn_neuron_axis(name))
            for name, _ in model.named_parameters()}


def _old_step(model, max_norm):
    """The old `train_single` norm and per-parameter clip loop."""
    norm = math.sqrt(sum(float(torch.sum(torch.square(p.grad.double()))) for p in model.parameters()))
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0:
        for p in model.parameters():
            p.grad.mul_(coef)
    return norm


@pytest.mark.parametrize("tier,helpers,max_norm", [(1, 0.5, 0.05), (0, 0.0, 1.0)])
def test_world_size_one_equals_the_old_math(tiny_config, tier, helpers, max_norm):
    m = tiny_config.model
    new, old = build_model(m, 0), build_model(m, 0)
    reducer = MaskedGradientReducer.for_model(new, layout_for_model(new, m.num_hidden_layers, m.intermediate_size),
                                              SingleProcess(), max_grad_norm=max_norm)
    opt_new = MaskedAdamW(list(new.named_parameters()), tiny_config.optimizer)
    opt_old = MaskedAdamW(list(old.named_parameters()), tiny_config.optimizer)
    data = torch.randint(0, m.vocab_size, (12, m.max_seq_len + 1), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        neurons = build_neuron_set(m, tier, helpers, 1, 7, step)
        batch = data[step * 4:(step + 1) * 4]
        _, n_tokens = forward_backward(new, batch, neurons, 0)
        forward_backward(old, batch, neurons, 0)
        out = reducer.reduce(build_neuron_masks(neurons, m.intermediate_size, m.num_hidden_layers), n_tokens)
        norm = _old_step(old, max_norm)
        assert out.grad_norm == pytest.approx(norm, rel=1e-13, abs=0)
        assert out.clipped == (clip_coefficient(norm, max_norm) < 1.0) and out.bytes_moved == 0
        assert out.clipped or max_norm == 1.0  # the 0.05 case exercises the clip
        masks = _old_update_masks(old, neurons, m.intermediate_size)
        for name, p in new.named_parameters():
            assert torch.equal(p.grad, dict(old.named_parameters())[name].grad), name
            a, b = out.update_masks[name], masks[name]
            assert (a is None and b is None) or torch.equal(a, b), name
        opt_new.step(1e-3, out.update_masks)
        opt_old.step(1e-3, masks)
        assert parameter_checksum(new) == parameter_checksum(old)


def test_world_size_one_clip_and_masks(tiny_model, tiny_config):
    m = tiny_config.model
    reducer = MaskedGradientReducer.for_model(
        tiny_model, layout_for_model(tiny_model, m.num_hidden_layers, m.intermediate_size), SingleProcess(),
        max_grad_norm=1.0)
    reducer.buffer[:reducer.layout.grad_numel].normal_(generator=torch.Generator().manual_seed(0))
    params = list(tiny_model.parameters())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    total = float(torch.nn.utils.clip_grad_norm_(copies, 1.0))
    held = torch.zeros(m.num_hidden_layers, m.intermediate_size, dtype=torch.bool)
    held[:, :16] = True
    out = reducer.reduce(held, 100)
    assert out.grad_norm == pytest.approx(total, rel=1e-4)  # torch sums the squares in float32
    for c, p in zip(copies, params):
        torch.testing.assert_close(p.grad, c.grad)  # same clip as torch's clip_grad_norm_
    for name, p in tiny_model.named_parameters():
        mask = out.update_masks[name]
        if not is_ffn_param(name):
            assert mask is None
            continue
        assert mask.dtype == torch.bool and torch.broadcast_shapes(mask.shape, p.shape) == p.shape
        assert int(mask.sum()) == 16
    assert all(v is None for v in reducer.reduce(torch.ones_like(held), 100).update_masks.values())
    nothing = reducer.reduce(held, 0)  # trained nothing: zero gradient, no FFN neuron updated
    assert torch.count_nonzero(reducer.buffer[:reducer.layout.grad_numel]) == 0
    assert all(not bool(v.any()) for k, v in nothing.update_masks.items() if is_ffn_param(k))


def _exchange(world_size=3, rank=1):
    ex = MagicMock(spec=GradientExchange)
    ex.world_size, ex.rank, ex.active = world_size, rank, True
    return ex


def test_none_strategy_does_no_collective_and_keeps_todays_ops(monkeypatch):
    sleeps = []
    monkeypatch.setattr("hetero_testnet.exchange.strategies.time.sleep", sleeps.append)
    layout = _layout()
    buf, masks = _client_grads(layout, torch.Generator().manual_seed(3), 2)
    ex = _exchange()
    reducer = MaskedGradientReducer(layout, build_sync("none", ex, NetworkFaults(latency_ms=50.0)), max_grad_norm=0.0)
    reducer.buffer.copy_(buf)
    out = reducer.reduce(masks, 7)
    ex.all_reduce_sum.assert_not_called()
    ex.broadcast.assert_not_called()
    assert sleeps == [] and out.bytes_moved == 0 and out.fault_delay_s == 0.0
    expected = pack_contribution(buf.clone(), layout, masks, 7)
    apply_average(expected, layout)
    assert torch.equal(reducer.buffer[:layout.grad_numel], expected[:layout.grad_numel])
    assert out.grad_norm == sum_of_squares(expected, 0, layout.grad_numel) ** 0.5


def test_allreduce_charges_the_fault_delay_then_sums(monkeypatch):
    sleeps = []
    monkeypatch.setattr("hetero_testnet.exchange.strategies.time.sleep", sleeps.append)
    layout = _layout()
    buf, masks = _client_grads(layout, torch.Generator().manual_seed(4), 4)
    ex = _exchange()
    sync = AllReduceSync(ex, NetworkFaults(latency_ms=20.0, latency_jitter_ms=10.0, bandwidth_bytes_per_s=1e6))
    sync.rng = random.Random(0)
    jitter = random.Random(0).uniform(0, 10.0)
    reducer = MaskedGradientReducer(layout, sync, max_grad_norm=0.0)
    reducer.buffer.copy_(buf)
    out = reducer.reduce(masks, 5)
    sent = 2 * (3 - 1) * layout.total_numel * 4 // 3  # what one of 3 ranks sends in a ring all-reduce
    delay = 20.0 / 1000.0 + jitter / 1000.0 + sent / 1e6
    assert sleeps == [delay] and out.fault_delay_s == delay
    assert ex.all_reduce_sum.call_count == 2  # the buffer, then the norm partials
    assert ex.all_reduce_sum.call_args_list[0].args[0] is reducer.buffer
    assert ex.all_reduce_sum.call_args_list[1].args[0].dtype == torch.float64


def test_lost_peer_raises_peer_lost():
    layout = _layout()
    buf, masks = _client_grads(layout, torch.Generator().manual_seed(5), 4)
    ex = _exchange()
    ex.all_reduce_sum.side_effect = PeerLostError("all_reduce failed in generation 3: connection reset")
    reducer = MaskedGradientReducer(layout, AllReduceSync(ex), max_grad_norm=1.0)
    reducer.buffer.copy_(buf)
    with pytest.raises(PeerLostError, match="generation 3"):
        reducer.reduce(masks, 5)


def test_registry():
    assert sync_names() == ("allreduce", "none", "demo", "diloco")
    assert isinstance(build_sync("none"), NoSync)
    assert isinstance(build_sync("allreduce", _exchange()), AllReduceSync)
    with pytest.raises(ConfigError, match="allreduce, none"):
        build_sync("ring")
    with pytest.raises(ConfigError, match="exchange"):
        build_sync("allreduce")


def test_network_faults_wire_round_trip():
    f = NetworkFaults(latency_ms=5, latency_jitter_ms=2.5, bandwidth_bytes_per_s=1e6)
    assert f.to_wire() == {"latency_ms": 5.0, "latency_jitter_ms": 2.5, "bandwidth_bytes_per_s": 1e6,
                           "packet_loss": 0.0, "uplink_bytes_per_s": 0.0, "downlink_bytes_per_s": 0.0}
    assert NetworkFaults.from_wire(f.to_wire()) == f
    assert NetworkFaults.from_wire({}) == NetworkFaults.from_wire(None) == NetworkFaults()
    assert isinstance(NetworkFaults.from_wire({"latency_ms": 3}).latency_ms, float)


@pytest.mark.parametrize("raw", ["latency", [1.0], {"latency_ms": "5"}, {"latency_ms": True},
                                 {"latency_ms": None}, {"latency_jitter_ms": -1.0},
                                 {"bandwidth_bytes_per_s": float("nan")}, {"latency_ms": float("inf")},
                                 {"latency_ms": 1.0, "loss_rate": 0.1}])
def test_network_faults_from_wire_rejects_bad_input(raw):
    with pytest.raises(ProtocolError):
        NetworkFaults.from_wire(raw)

"""The exact masked average on plain tensors, against hand-computed averages."""

import torch

from hetero_testnet.exchange.aggregation import (apply_average, build_layout, grad_views, pack_contribution,
                                                 shard_bounds, sum_of_squares, update_masks_for)

L, I, C = 2, 4, 3  # layers, FFN width, hidden


def _layout():
    shapes = [("model.embed_tokens.weight", (5, C))]
    for i in range(L):
        shapes += [(f"model.layers.{i}.mlp.gate_proj.weight", (I, C)),
                   (f"model.layers.{i}.mlp.up_proj.weight", (I, C)),
                   (f"model.layers.{i}.mlp.down_proj.weight", (C, I))]
    return build_layout(shapes, L, I)


def _client_grads(layout, gen, width):
    """Random gradients, zero outside the first `width` neurons (as the model guarantees)."""
    buf = torch.zeros(layout.total_numel)
    views = grad_views(buf, layout)
    for slot in layout.slots:
        g = torch.randn(slot.shape, generator=gen)
        if slot.ffn_layer is not None:
            if slot.neuron_axis == 0:
                g[width:, :] = 0
            else:
                g[:, width:] = 0
        views[slot.name].copy_(g)
    masks = torch.zeros(L, I, dtype=torch.bool)
    masks[:, :width] = True
    return buf, masks


def test_masked_average_matches_hand_computation():
    layout = _layout()
    gen = torch.Generator().manual_seed(0)
    tokens = [30, 10]
    widths = [4, 2]  # a tier-0 and a tier-1 client
    bufs, originals = [], []
    for t, w in zip(tokens, widths):
        buf, masks = _client_grads(layout, gen, w)
        originals.append({k: v.clone() for k, v in grad_views(buf, layout).items()})
        bufs.append(pack_contribution(buf, layout, masks, t))
    summed = bufs[0] + bufs[1]
    masks = apply_average(summed, layout)
    avg = grad_views(summed, layout)
    g0, g1 = originals
    # Non-FFN: token-weighted mean over both clients.
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(avg[name], (30 * g0[name] + 10 * g1[name]) / 40)
    assert masks[name] is None
    # FFN prefix (neurons 0..1): both computed. Suffix (2..3): only the tier-0 client.
    gate = "model.layers.1.mlp.gate_proj.weight"
    torch.testing.assert_close(avg[gate][:2], (30 * g0[gate][:2] + 10 * g1[gate][:2]) / 40)
    torch.testing.assert_close(avg[gate][2:], g0[gate][2:])
    down = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(avg[down][:, 2:], g0[down][:, 2:])
    assert masks[gate] is None and masks[down] is None  # someone computed every neuron


def test_uncomputed_neurons_get_zero_and_a_false_mask():
    layout = _layout()
    gen = torch.Generator().manual_seed(1)
    bufs = []
    for t in (7, 9):
        buf, masks = _client_grads(layout, gen, 2)
        bufs.append(pack_contribution(buf, layout, masks, t))
    summed = bufs[0] + bufs[1]
    masks = apply_average(summed, layout)
    avg = grad_views(summed, layout)
    gate, down = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(avg[gate][2:], torch.zeros(2, C))
    assert masks[gate].shape == (I, 1) and masks[gate].squeeze().tolist() == [True, True, False, False]
    assert masks[down].shape == (1, I) and masks[down].squeeze().tolist() == [True, True, False, False]


def test_single_full_client_average_is_its_own_gradient():
    layout = _layout()
    buf, masks = _client_grads(layout, torch.Generator().manual_seed(2), I)
    original = buf.clone()
    pack_contribution(buf, layout, masks, 13)
    apply_average(buf, layout)
    torch.testing.assert_close(buf[:layout.grad_numel], original[:layout.grad_numel])


def test_shards_cover_everything_once():
    for n, w in [(10, 3), (3, 5), (1000, 7)]:
        bounds = [shard_bounds(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    x = torch.randn(1000)
    total = sum(sum_of_squares(x, *shard_bounds(1000, r, 3)) for r in range(3))
    assert abs(total - float((x.double() ** 2).sum())) < 1e-9


def test_update_masks_for_held_neurons():
    layout = _layout()
    held = torch.ones(L, I, dtype=torch.bool)
    held[1, 3] = False
    masks = update_masks_for(layout, held)
    assert masks["model.embed_tokens.weight"] is None
    assert all(masks[f"model.layers.0.mlp.{k}_proj.weight"] is None for k in ("gate", "up", "down"))
    assert masks["model.layers.1.mlp.up_proj.weight"].shape == (I, 1)
    assert masks["model.layers.1.mlp.down_proj.weight"].shape == (1, I)
    assert masks["model.layers.1.mlp.down_proj.weight"].squeeze().tolist() == [True, True, True, False]

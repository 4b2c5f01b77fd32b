"""`--sync demo` math without processes: the DCT, encode/decode, ownership across tiers, bytes, bit-identity."""

from __future__ import annotations

import math

import pytest
import torch

import hetero_testnet.exchange.dct as dct_mod

from hetero_testnet.errors import ConfigError, ProtocolError
from hetero_testnet.exchange.aggregation import apply_average, build_layout, grad_views, pack_contribution
from hetero_testnet.exchange.dct import (dct_basis, dct_blocks, idct_blocks, idct_blocks_exact, largest_divisor,
                                         plan_blocks)
from hetero_testnet.exchange.demo_codec import apply_momentum, decode, encode, init_momentum
from hetero_testnet.exchange.demo_layout import (HEADER_BYTES, DemoConfig, allreduce_bytes, build_demo_layout,
                                                 check_tier_alignment, check_whole_blocks, owned_neuron_blocks,
                                                 pack_bits, sample_block_helpers, unpack_bits)
from hetero_testnet.model.matformer import (NeuronSet, build_neuron_masks, expand_neuron_vector, ffn_width,
                                            sample_helpers)

# A small model: L layers, hidden C, FFN I, vocab V (= 29 * 4, blocks of 4 rows at chunk 8).
L, C, I, V, CHUNK = 2, 16, 64, 116, 8


def _named_shapes(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama parameter names and shapes, in `named_parameters` order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.append((p + "input_layernorm.weight", (hidden,)))
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes.append((p + "post_attention_layernorm.weight", (hidden,)))
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _layouts(cfg: DemoConfig, vocab=V, hidden=C, inter=I, layers=L):
    buffer_layout = build_layout(_named_shapes(vocab, hidden, inter, layers), layers, inter)
    return buffer_layout, build_demo_layout(buffer_layout, cfg)


def _prefix_masks(width: int, inter: int = I, layers: int = L) -> torch.Tensor:
    return build_neuron_masks(NeuronSet(prefix_width=width), inter, layers)


def _delta(demo, masks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random momentum, exactly zero outside the client's neurons (as its gradients are)."""
    delta = init_momentum(demo)
    for slot in demo.slots:
        d = torch.randn(slot.plan.shape, generator=gen)
        if slot.ffn_layer is not None:
            d *= expand_neuron_vector(masks[slot.ffn_layer].float(), slot.neuron_axis)
        delta[slot.name].copy_(d)
    return delta


def _masked_average(buffer_layout, deltas, masks, tokens) -> dict[str, torch.Tensor]:
    """`aggregation.apply_average` of the deltas: the holders-only, token-weighted mean."""
    total = torch.zeros(buffer_layout.total_numel)
    for d, m, t in zip(deltas, masks, tokens):
        buf = torch.zeros(buffer_layout.total_numel)
        for name, view in grad_views(buf, buffer_layout).items():
            view.copy_(d[name])
        total += pack_contribution(buf, buffer_layout, m, t)
    apply_average(total, buffer_layout)
    return {k: v.clone() for k, v in grad_views(total, buffer_layout).items()}


def _encode_clients(demo, widths, tokens, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    masks = [_prefix_masks(w) for w in widths]
    deltas = [_delta(demo, m, gen) for m in masks]
    originals = [{k: v.clone() for k, v in d.items()} for d in deltas]
    payloads = [encode(d, demo, m, t, **kw).payload for d, m, t in zip(deltas, masks, tokens)]
    return originals, deltas, masks, payloads


# --------------------------------------------------------------------------- DCT

@pytest.mark.parametrize("shape", [(1024, 256), (256, 1024), (50257, 256), (256,)])
def test_dct_round_trip(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    plan = plan_blocks(shape, 64)
    back = idct_blocks(dct_blocks(x, plan), plan)
    torch.testing.assert_close(back, x.double(), rtol=1e-6, atol=1e-9)
    if shape == (50257, 256):
        assert (plan.h, plan.w, plan.num_blocks) == (29, 64, 6932)  # 50257 = 29 * 1733


def test_exact_inverse_agrees_with_matmul_inverse():
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(2))
    plan = plan_blocks(x.shape, 64)
    coef = dct_blocks(x, plan)
    exact = idct_blocks_exact(coef, plan)
    torch.testing.assert_close(exact, x.double(), rtol=0, atol=2e-6 * float(x.abs().max()))
    # Bits depend only on each block's coefficients: a different batch (other BLAS shapes) agrees.
    part = plan_blocks((64, 256), 64)
    assert torch.equal(idct_blocks_exact(coef[:4], part), exact[:64])


def test_exact_inverse_matmuls_are_integer_exact():
    """The claim behind bit-identity: on the grids, the float64 matmul equals int64 arithmetic
    (exact by definition), so no summation order can change it."""
    coef = dct_blocks(torch.randn(256, 1024, generator=torch.Generator().manual_seed(11)) * 1e3,
                      plan_blocks((256, 1024), 64))
    for k in (64, 29, 1):
        q, _ = dct_mod._to_grid(coef[..., :k], dct_mod._grid_bits(k))
        basis = dct_mod._grid_basis(k)
        assert float(q.abs().max()) <= 2 ** dct_mod._grid_bits(k)
        assert float(basis.abs().max()) <= 2 ** dct_mod.BASIS_BITS
        assert torch.equal((q @ basis).to(torch.int64), q.to(torch.int64) @ basis.to(torch.int64))


def test_dct_of_eye4_is_the_dct_matrix():
    d = dct_basis(4)
    assert torch.equal(d[0], torch.full((4,), 0.5, dtype=torch.float64))  # sqrt(1/4) * cos(0)
    torch.testing.assert_close(d @ d.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-15)
    a, b = 0.6532814824381883, 0.2705980500730985  # sqrt(1/2) cos(pi/8), sqrt(1/2) cos(3 pi/8)
    truth = torch.tensor([[0.5, 0.5, 0.5, 0.5], [a, b, -b, -a], [0.5, -0.5, -0.5, 0.5], [b, -a, a, -b]],
                         dtype=torch.float64)
    torch.testing.assert_close(d, truth, rtol=0, atol=1e-15)
    rows = plan_blocks((4,), 4)  # the 1-D DCT of each row of eye(4): row i = column i of D
    dct_eye = torch.stack([dct_blocks(torch.eye(4)[i], rows).reshape(4) for i in range(4)])
    torch.testing.assert_close(dct_eye.T, truth, rtol=0, atol=1e-15)
    torch.testing.assert_close(dct_blocks(torch.eye(4), plan_blocks((4, 4), 4))[0], truth @ truth.T,
                               rtol=0, atol=1e-15)  # 2-D: D I D^T = I
    assert largest_divisor(50257, 64) == 29 and largest_divisor(1024, 64) == 64


# --------------------------------------------------------------------------- encode

@pytest.mark.parametrize("cfg", [DemoConfig(topk=4, chunk=CHUNK),
                                 DemoConfig(topk=4, chunk=CHUNK, value_dtype="bfloat16"),
                                 DemoConfig(topk=4, chunk=CHUNK, quantize_1bit=True)])
def test_error_feedback_removes_exactly_what_is_sent(cfg):
    _, demo = _layouts(cfg)
    masks = _prefix_masks(I // 2)  # tier 1
    delta = _delta(demo, masks, torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in delta.items()}
    step = encode(delta, demo, masks, tokens=100, keep_removed=True)
    assert step.removed is not None and step.coefficients_sent > 0
    for slot in demo.slots:
        b, a, r = before[slot.name], delta[slot.name], step.removed[slot.name]
        torch.testing.assert_close(a + r, b, rtol=1e-6, atol=1e-6)
        assert float((a.double() ** 2).sum()) < float((b.double() ** 2).sum())  # energy left delta
        if slot.ffn_layer is not None:  # the unowned suffix: nothing taken, delta bit-identical
            tail = (slice(I // 2, None), slice(None)) if slot.neuron_axis == 0 else (slice(None), slice(I // 2, None))
            assert torch.equal(a[tail], b[tail]) and not bool(r[tail].any())
    if not cfg.quantize_1bit:  # a receiver of this payload alone sees exactly what left delta
        got = decode([step.payload], demo, apply="raw").updates
        for name, r in step.removed.items():
            torch.testing.assert_close(got[name], r, rtol=0, atol=1e-6)


def test_momentum_update():
    _, demo = _layouts(DemoConfig(chunk=CHUNK))
    delta = init_momentum(demo)
    grads = {k: torch.ones_like(v) for k, v in delta.items()}
    apply_momentum(delta, grads, lr=0.5, decay=0.9)
    apply_momentum(delta, grads, lr=0.5, decay=0.9)
    assert all(torch.allclose(v, torch.full_like(v, 0.9 * 0.5 + 0.5)) for v in delta.values())


# --------------------------------------------------------------------------- decode across tiers

@pytest.mark.parametrize("tokens,weighted", [([50, 50, 50], False), ([30, 10, 20], True)])
def test_full_k_decode_is_the_exact_masked_average(tokens, weighted):
    cfg = DemoConfig(topk=CHUNK * CHUNK, chunk=CHUNK)  # k = every coefficient, float32 values
    buffer_layout, demo = _layouts(cfg)
    widths = [ffn_width(I, t) for t in (0, 1, 2)]
    originals, deltas, masks, payloads = _encode_clients(demo, widths, tokens)
    for d in deltas:  # momentum fully sent: only float32 rounding is left behind
        assert all(float(v.abs().max()) < 1e-6 for v in d.values())
    exact = _masked_average(buffer_layout, originals, masks, tokens)
    raw = decode(payloads, demo, apply="raw", token_weighted=weighted)
    sign = decode(payloads, demo, apply="sign", token_weighted=weighted)
    assert raw.senders == 3 and torch.equal(raw.owners[:, 0], torch.full((L,), 3))
    for name, avg in exact.items():
        torch.testing.assert_close(raw.updates[name], avg, rtol=1e-6, atol=2e-6)
        clear = avg.abs() > 1e-4 * float(avg.abs().max())
        assert torch.equal(sign.updates[name][clear], torch.sign(avg)[clear])
        assert raw.update_masks[name] is None  # tier 0 owns everything


def test_helper_blocks_are_owned_and_averaged():
    cfg = DemoConfig(topk=CHUNK * CHUNK, chunk=CHUNK)
    buffer_layout, demo = _layouts(cfg)
    helpers = sample_block_helpers(I, 16, 0.5, demo.neuron_block, seed=7, step=0, rotation_interval=1, num_layers=L)
    assert all(h.numel() == CHUNK for h in helpers)  # floor(16 * 0.5) = 8 neurons: one whole block
    sets = [NeuronSet(prefix_width=32), NeuronSet(prefix_width=16, helpers=helpers)]
    masks = [build_neuron_masks(s, I, L) for s in sets]
    for m in masks:
        check_whole_blocks(m, demo.neuron_block)
    gen = torch.Generator().manual_seed(4)
    deltas = [_delta(demo, m, gen) for m in masks]
    originals = [{k: v.clone() for k, v in d.items()} for d in deltas]
    payloads = [encode(d, demo, m, 10).payload for d, m in zip(deltas, masks)]
    raw = decode(payloads, demo, apply="raw")
    exact = _masked_average(buffer_layout, originals, masks, [10, 10])
    held = masks[0] | masks[1]
    for slot in demo.slots:
        torch.testing.assert_close(raw.updates[slot.name], exact[slot.name], rtol=1e-6, atol=2e-6)
        if slot.ffn_layer is not None:
            want = expand_neuron_vector(held[slot.ffn_layer], slot.neuron_axis).expand(slot.plan.shape)
            assert torch.equal(raw.update_masks[slot.name].expand(slot.plan.shape), want)


@pytest.mark.parametrize("one_bit", [False, True])
def test_block_owned_by_nobody_gets_no_update(one_bit):
    cfg = DemoConfig(topk=3, chunk=CHUNK, quantize_1bit=one_bit)
    _, demo = _layouts(cfg)
    _, _, _, payloads = _encode_clients(demo, [I // 2, I // 4], [5, 5])  # tiers 1 and 2: [32, 64) unowned
    for apply in ("sign", "raw"):
        out = decode(payloads, demo, apply=apply)
        assert torch.equal(out.owners[:, 4:], torch.zeros(L, 4, dtype=torch.int64))
        for slot in demo.slots:
            if slot.ffn_layer is None:
                assert out.update_masks[slot.name] is None
                continue
            u, m = out.updates[slot.name], out.update_masks[slot.name].expand(slot.plan.shape)
            tail = (slice(I // 2, None), slice(None)) if slot.neuron_axis == 0 else (slice(None), slice(I // 2, None))
            want = torch.ones(slot.plan.shape, dtype=torch.bool)
            want[tail] = False
            assert torch.equal(m, want)
            assert torch.equal(u[tail], torch.zeros_like(u[tail])) and bool(u[want].ne(0).any())


def _unowned_records(demo, slot):
    """Block indices of `slot` that a tier-1 client (neurons [0, I/2)) does not own."""
    return (slot.neuron_block_of() >= I // 2 // demo.neuron_block).nonzero().view(-1)


@pytest.mark.parametrize("one_bit", [False, True])
def test_garbage_in_unowned_blocks_changes_nothing(one_bit):
    cfg = DemoConfig(topk=4, chunk=CHUNK, quantize_1bit=one_bit)
    _, demo = _layouts(cfg)
    _, _, _, payloads = _encode_clients(demo, [I, I // 2, I // 4], [8, 8, 8])
    clean = decode(payloads, demo, apply="raw")
    for fill in ("nan", "plus_one", "random"):
        bad = payloads[1].clone()  # the tier-1 sender
        for slot in demo.slots:
            if slot.ffn_layer is None:
                continue
            rec = demo.records(bad, slot)
            rows = _unowned_records(demo, slot)
            width = slot.k * slot.index_bytes
            idx = torch.arange(slot.k).repeat(rows.numel(), 1)  # valid, distinct indices
            rec[rows, :width] = torch.stack([(idx >> (8 * i)) & 0xFF for i in range(slot.index_bytes)],
                                            -1).to(torch.uint8).reshape(rows.numel(), -1)
            if fill == "nan" and not one_bit:
                rec[rows, width:] = torch.full((rows.numel(), slot.k), math.nan).view(torch.uint8)
            elif fill == "plus_one":
                rec[rows, width:] = (torch.ones(rows.numel(), slot.k).view(torch.uint8) if not one_bit
                                     else torch.zeros_like(rec[rows, width:]))  # sign bit 0 = +1
            else:
                rec[rows] = torch.randint(0, 256, rec[rows].shape, dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(5))
        fuzzed = decode([payloads[0], bad, payloads[2]], demo, apply="raw")
        for name in clean.updates:
            assert torch.equal(fuzzed.updates[name], clean.updates[name]), (fill, name)


def test_one_bit_zero_sends_nothing():
    cfg = DemoConfig(topk=4, chunk=CHUNK, quantize_1bit=True)
    _, demo = _layouts(cfg)
    masks = _prefix_masks(I)
    zero = init_momentum(demo)  # trained, owns everything, momentum exactly zero
    other = _delta(demo, masks, torch.Generator().manual_seed(6))
    p_zero = encode(zero, demo, masks, 10)
    p_other = encode(other, demo, masks, 10).payload
    assert p_zero.coefficients_sent == 0
    both = decode([p_zero.payload, p_other], demo, apply="raw")
    alone = decode([p_other], demo, apply="raw")
    for name in both.updates:  # zeros would have pushed +1 into the mean (psyche-elastic's hazard)
        assert torch.equal(both.updates[name], alone.updates[name]), name


# --------------------------------------------------------------------------- bytes

@pytest.mark.parametrize("cfg", [DemoConfig(topk=5, chunk=CHUNK),
                                 DemoConfig(topk=5, chunk=CHUNK, value_dtype="bfloat16"),
                                 DemoConfig(topk=5, chunk=CHUNK, quantize_1bit=True)])
def test_payload_length_is_the_layout_formula(cfg):
    _, demo = _layouts(cfg)
    value_bytes = {0: 4 * 5, 1: 2 * 5, 2: 1}[cfg.value_code]
    formula = HEADER_BYTES + math.ceil(L * (I // CHUNK) / 8)
    for slot in demo.slots:
        width = 1 if slot.block_numel < 256 else 2
        formula += slot.num_blocks * (5 * width + value_bytes)
    payload = encode(init_momentum(demo), demo, _prefix_masks(I), 1).payload
    assert demo.payload_bytes == formula == payload.numel()


def test_20m_payload_is_a_hundredth_of_allreduce():
    buffer_layout = build_layout(_named_shapes(50257, 256, 1024, 8), 8, 1024)
    assert buffer_layout.grad_numel == 34_124_544
    full = allreduce_bytes(buffer_layout)  # (34.1 M gradients + 1 + 8 * 1024 counts) * 4 B
    sizes = {name: build_demo_layout(buffer_layout, cfg).payload_bytes for name, cfg in {
        "k8_1bit": DemoConfig(topk=8, quantize_1bit=True), "k32_fp32": DemoConfig(topk=32),
        "k32_bf16": DemoConfig(topk=32, value_dtype="bfloat16")}.items()}
    assert sizes["k8_1bit"] <= full / 100
    assert sizes["k32_fp32"] == pytest.approx(3.07e6, rel=0.01)  # sync-notes 1.4
    assert sizes["k32_bf16"] == pytest.approx(2.04e6, rel=0.01)
    assert build_demo_layout(buffer_layout, DemoConfig(topk=8, quantize_1bit=True)).bitmap_bytes == 16


# --------------------------------------------------------------------------- determinism

def test_decode_is_bit_identical_across_thread_counts():
    layers, inter = 1, 512  # big enough for the elementwise kernels and matmuls to split over threads
    for cfg in (DemoConfig(topk=8), DemoConfig(topk=8, quantize_1bit=True)):
        buffer_layout = build_layout(_named_shapes(29 * 8, 128, inter, layers), layers, inter)
        demo = build_demo_layout(buffer_layout, cfg)
        gen = torch.Generator().manual_seed(8)
        payloads = []
        for width in (512, 256, 128):
            masks = _prefix_masks(width, inter, layers)
            payloads.append(encode(_delta(demo, masks, gen), demo, masks, 100).payload)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = decode(payloads, demo, apply="raw", token_weighted=True)
            torch.set_num_threads(2)
            two = decode(payloads, demo, apply="raw", token_weighted=True)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(one.updates[n], two.updates[n]) for n in one.updates)


# --------------------------------------------------------------------------- validation

def test_tier_alignment_and_whole_blocks():
    assert check_tier_alignment(DemoConfig(), 1024, [0, 1, 2, 3, 4]) == 64
    with pytest.raises(ConfigError, match="do not divide the smallest tier's FFN width 32") as err:
        check_tier_alignment(DemoConfig(), 1024, [0, 5])
    assert "\n" not in str(err.value) and "chunk <= 32" in str(err.value)
    assert check_tier_alignment(DemoConfig(chunk=32), 1024, [0, 5]) == 32
    scattered = sample_helpers(1024, 256, 0.5, seed=0, step=0, rotation_interval=1, num_layers=2)
    masks = build_neuron_masks(NeuronSet(prefix_width=256, helpers=scattered), 1024, 2)
    with pytest.raises(ConfigError, match="whole 64-neuron blocks"):
        check_whole_blocks(masks, 64)
    owned = owned_neuron_blocks(masks, 64)  # partial blocks are never owned
    assert bool(owned[:, :4].all()) and int(owned.sum()) == 2 * 4 + int(
        sum(masks.view(2, 16, 64).all(dim=2)[:, 4:].sum(dim=1)))
    with pytest.raises(ConfigError):
        DemoConfig(topk=0)
    with pytest.raises(ConfigError):
        DemoConfig(value_dtype="float16")


def test_bits_round_trip():
    bits = torch.rand(3, 13, generator=torch.Generator().manual_seed(9)) > 0.5
    packed = pack_bits(bits)
    assert packed.shape == (3, 2) and torch.equal(unpack_bits(packed, 13), bits)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist() == [1, 1]


def test_bad_payloads_are_protocol_errors():
    _, demo = _layouts(DemoConfig(topk=4, chunk=CHUNK))
    masks = _prefix_masks(I)
    good = encode(_delta(demo, masks, torch.Generator().manual_seed(10)), demo, masks, 3).payload
    with pytest.raises(ProtocolError):
        decode([good[:-1]], demo)
    other = good.clone()
    other[2] = 2  # says 1-bit
    with pytest.raises(ProtocolError, match="header"):
        decode([other], demo)
    slot = demo.slots[0]
    broken = good.clone()
    demo.records(broken, slot)[0, 0] = 255  # index 255 > block size 32 in an owned block
    with pytest.raises(ProtocolError, match="index"):
        decode([broken], demo)


def test_senders_that_did_not_train_own_nothing():
    _, demo = _layouts(DemoConfig(topk=4, chunk=CHUNK))
    masks = _prefix_masks(I)
    delta = _delta(demo, masks, torch.Generator().manual_seed(12))
    before = {k: v.clone() for k, v in delta.items()}
    step = encode(delta, demo, masks, tokens=0)
    assert step.coefficients_sent == 0 and all(torch.equal(delta[k], before[k]) for k in delta)
    out = decode([step.payload, step.payload], demo)
    assert out.senders == 0 and not bool(out.owners.any())
    for slot in demo.slots:
        mask = out.update_masks[slot.name]
        assert mask is not None and not bool(mask.any()) and not bool(out.updates[slot.name].any())

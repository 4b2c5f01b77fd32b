"""`--sync demo` tensor math: decoupled momentum, encode to one uint8 payload, decode all payloads.

DeMo (Peng et al., arXiv:2411.19870; bloc97/DeMo `demo.py`) as Psyche runs it (DisTrO, `distro.rs`),
made exact across MatFormer tiers. One step of one client, with `layout = build_demo_layout(...)`:

    apply_momentum(delta, grads, lr, decay)      delta = decay * delta + lr * g   (local, never sent)
    sent = encode(delta, layout, masks, tokens)  DCT per block, top-k by |c| in owned blocks,
                                                 delta -= IDCT(what was taken)    (error feedback)
    payloads = all_gather(sent.payload)          equal lengths: layout.payload_bytes
    out = decode(payloads, layout)               per coefficient mean over owning senders that picked
                                                 it, IDCT, sign (or raw); masks for blocks nobody owns
    p -= lr * out.updates[name]  where out.update_masks[name] allows (and weight decay only there)

What a value means on the wire. float32 / bfloat16: the coefficient rounded to that dtype; the
encoder subtracts exactly that rounded value, so what receivers see is what left delta. One bit:
the sign (DeMo's and Psyche's apply reads it as +-1); error feedback subtracts the unquantized
coefficient, as Psyche does. A coefficient of exactly 0 has no sign, so in 1-bit mode it is not sent:
its slot holds the empty index (`block_numel`) and counts for no one's mean (psyche-elastic turned
such zeros into +1). Float modes do send zeros, so that with k = every coefficient the decode is
the exact masked average. Blocks a sender does not own are written as empty slots, but receivers
never read them: ownership comes from the sender's bitmap, not from the record's bytes.

Bit-identity of `decode` across replicas (decode is given the payloads in rank order, the order of
all_gather). Every step is either exact or elementwise: (1) each sender's values are scattered into
dense float64 accumulators with unique positions (`acc[pos] = acc[pos] + w * v`: a gather, one IEEE
multiply and add per element, a scatter that writes each position once), senders taken in rank
order; (2) the mean is one division per element; (3) the IDCT is `dct.idct_blocks_exact`, whose
matmuls act on integer grids small enough that float64 sums them exactly in any order; (4) the
cast to float32 and `sign` are elementwise. Elementwise IEEE operations give the same bits for
every element however the work is split over threads or vectorized, and no step reduces in a
thread-dependent order (the IDCT's per-block peak is a max, exact in any order), so the result
does not depend on thread count, BLAS or batching. Measured check: tests/unit/test_demo_codec.py
(threads 1 vs 2; the grid matmuls equal int64 arithmetic). On this CPU build a plain float64
matmul IDCT also happened to agree across thread counts; the grid makes that a guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hetero_testnet.errors import ProtocolError
from hetero_testnet.exchange.dct import dct_blocks, idct_blocks, idct_blocks_exact
from hetero_testnet.exchange.demo_layout import (HEADER_BYTES, MAGIC, VERSION, DemoLayout, DemoSlot,
                                                 owned_neuron_blocks, pack_bits, unpack_bits)
from hetero_testnet.model.matformer import expand_neuron_vector

APPLY_MODES = ("sign", "raw")


def init_momentum(layout: DemoLayout) -> dict[str, torch.Tensor]:
    """Zero float32 momentum per parameter: a fresh client's (or a rejoining client's) delta."""
    return {s.name: torch.zeros(s.plan.shape, dtype=torch.float32) for s in layout.slots}


def apply_momentum(delta: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], lr: float,
                   decay: float) -> None:
    """In place: delta = decay * delta + lr * g (DeMo's decoupled momentum; g already averaged
    over the client's own tokens and, outside its neurons, exactly zero)."""
    for name, d in delta.items():
        d.mul_(decay).add_(grads[name].to(d.dtype), alpha=lr)


# --------------------------------------------------------------------------- encode

@dataclass(frozen=True)
class EncodedStep:
    """One client's contribution to a step."""

    payload: torch.Tensor
    """uint8 (layout.payload_bytes,): what this client all_gathers."""
    coefficients_sent: int
    """Non-empty slots in owned blocks (for logging)."""
    removed: dict[str, torch.Tensor] | None
    """IDCT of what error feedback took out of delta, per parameter (float32); only with keep_removed."""


def _write_header(payload: torch.Tensor, layout: DemoLayout, tokens: int, owned: torch.Tensor) -> None:
    if not 0 <= tokens < 1 << 32:
        raise ValueError(f"tokens must fit in a u32 (got {tokens})")
    payload[0:4] = torch.tensor([MAGIC, VERSION, layout.config.value_code, 0], dtype=torch.uint8)
    payload[4:8] = torch.tensor([(tokens >> (8 * i)) & 0xFF for i in range(4)], dtype=torch.uint8)
    payload[HEADER_BYTES: layout.slots_offset] = pack_bits(owned.reshape(-1))


def _pack_indices(idx: torch.Tensor, width: int) -> torch.Tensor:
    """int64 (nb, k) -> uint8 (nb, k * width), little-endian per index."""
    parts = [(idx >> (8 * i)) & 0xFF for i in range(width)]
    return torch.stack(parts, dim=-1).to(torch.uint8).reshape(idx.shape[0], -1)


def _block_ownership(slot: DemoSlot, owned: torch.Tensor, trained: bool) -> torch.Tensor:
    """Bool (num_blocks,): which of `slot`'s blocks a sender with neuron-block ownership `owned` owns."""
    if not trained:
        return torch.zeros(slot.num_blocks, dtype=torch.bool)
    if slot.ffn_layer is None:
        return torch.ones(slot.num_blocks, dtype=torch.bool)
    return owned[slot.ffn_layer][slot.neuron_block_of()]


def _encode_slot(d: torch.Tensor, slot: DemoSlot, own: torch.Tensor, layout: DemoLayout,
                 records: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Top-k of one parameter's owned blocks into `records` (num_blocks, record_bytes); returns the
    taken coefficients (num_blocks, block_numel) float64, to subtract, and how many were sent."""
    cfg = layout.config
    coef = dct_blocks(d, slot.plan).reshape(slot.num_blocks, slot.block_numel)  # (nb, bn) float64
    coef[~own] = 0.0
    idx = coef.abs().topk(slot.k, dim=1).indices  # (nb, k), unique per row
    val = coef.gather(1, idx)
    if cfg.quantize_1bit:
        live = own.view(-1, 1) & (val != 0)  # a zero has no sign: send nothing
        taken = val
        wire = pack_bits(torch.signbit(val) & live)
    else:
        live = own.view(-1, 1).expand_as(idx)
        rounded = val.to(cfg.torch_value_dtype)
        taken = rounded.to(torch.float64)
        wire = torch.where(live, rounded, 0).contiguous().view(torch.uint8)
    taken = torch.where(live, taken, 0.0)
    records[:, : slot.k * slot.index_bytes] = _pack_indices(torch.where(live, idx, slot.block_numel),
                                                            slot.index_bytes)
    records[:, slot.k * slot.index_bytes:] = wire
    removed = torch.zeros_like(coef).scatter_(1, idx, taken)
    return removed, int(live.sum())


def encode(delta: Mapping[str, torch.Tensor], layout: DemoLayout, neuron_masks: torch.Tensor, tokens: int, *,
           keep_removed: bool = False) -> EncodedStep:
    """Encode this client's momentum into its payload and subtract what was taken (in place).

    `neuron_masks` (L, I) bool: the neurons this client computed this step (`build_neuron_masks`);
    blocks it computed only partly are not owned (reject such sets earlier with
    `check_whole_blocks`). `tokens` = tokens trained this step; 0 means the client did not train,
    owns nothing and sends an empty payload. Where nothing is taken (unowned blocks) delta is left
    bit-identical. `ValueError` for tokens outside u32.
    """
    owned = owned_neuron_blocks(neuron_masks, layout.neuron_block) & (tokens > 0)
    payload = torch.zeros(layout.payload_bytes, dtype=torch.uint8)
    _write_header(payload, layout, tokens, owned)
    removed_all: dict[str, torch.Tensor] | None = {} if keep_removed else None
    sent = 0
    for slot in layout.slots:
        d = delta[slot.name]
        own = _block_ownership(slot, owned, tokens > 0)
        taken, count = _encode_slot(d, slot, own, layout, layout.records(payload, slot))
        sent += count
        removed = idct_blocks(taken, slot.plan).to(d.dtype)  # exactly 0 in blocks with nothing taken
        d.sub_(removed)
        if removed_all is not None:
            removed_all[slot.name] = removed
    return EncodedStep(payload, sent, removed_all)


# --------------------------------------------------------------------------- decode

@dataclass(frozen=True)
class DecodedStep:
    """The step's update direction, the same bits on every replica."""

    updates: dict[str, torch.Tensor]
    """float32, parameter-shaped: sign(G) ("sign", Psyche's apply) or G ("raw")."""
    update_masks: dict[str, torch.Tensor | None]
    """None (update every element) or bool broadcastable to the parameter, False where no sender owned
    the block: leave those elements, and their weight decay, untouched (`MaskedAdamW` convention)."""
    owners: torch.Tensor
    """int64 (L, NB): how many senders owned each FFN neuron block (for logging)."""
    senders: int
    """Senders that trained this step (tokens > 0)."""


@dataclass(frozen=True)
class _Sender:
    rank: int
    tokens: int
    owned: torch.Tensor  # (L, NB) bool; all False for a sender that did not train
    payload: torch.Tensor


def _parse_sender(rank: int, payload: torch.Tensor, layout: DemoLayout) -> _Sender:
    """Header and bitmap of one payload; `ProtocolError` if it was not made with this layout."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != layout.payload_bytes:
        raise ProtocolError(f"demo payload of rank {rank} is {tuple(payload.shape)} {payload.dtype}, "
                            f"expected ({layout.payload_bytes},) uint8")
    head = payload[:HEADER_BYTES].tolist()
    if head[0] != MAGIC or head[1] != VERSION or head[2] != layout.config.value_code:
        raise ProtocolError(f"demo payload of rank {rank} has header {head[:3]}, expected "
                            f"[{MAGIC}, {VERSION}, {layout.config.value_code}] (another version or config)")
    tokens = sum(b << (8 * i) for i, b in enumerate(head[4:8]))
    nb = layout.num_layers * layout.neuron_blocks_per_layer
    owned = unpack_bits(payload[HEADER_BYTES: layout.slots_offset], nb).view(layout.num_layers, -1)
    return _Sender(rank, tokens, owned & (tokens > 0), payload)


def _unpack_records(records: torch.Tensor, slot: DemoSlot, layout: DemoLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Owned records (n, record_bytes) -> indices int64 (n, k) and values float64 (n, k)."""
    n, k, width = records.shape[0], slot.k, slot.index_bytes
    raw = records[:, : k * width].to(torch.int64).view(n, k, width)
    idx = sum(raw[..., i] << (8 * i) for i in range(width))
    vals = records[:, k * width:]
    if layout.config.quantize_1bit:
        negative = unpack_bits(vals, k)
        return idx, torch.where(negative, -1.0, 1.0).to(torch.float64)
    dtype = layout.config.torch_value_dtype
    return idx, vals.contiguous().view(dtype).to(torch.float64)


def _check_indices(idx: torch.Tensor, slot: DemoSlot, rank: int) -> None:
    """`ProtocolError` for an index past the empty-slot value or picked twice within a block."""
    if bool((idx > slot.block_numel).any()):
        raise ProtocolError(f"demo payload of rank {rank}: {slot.name} has a coefficient index "
                            f"> block size {slot.block_numel}")
    s = idx.sort(dim=1).values
    if bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] != slot.block_numel)).any()):
        raise ProtocolError(f"demo payload of rank {rank}: {slot.name} picks a coefficient twice in one block")


def _mean_coefficients(slot: DemoSlot, senders: Sequence[_Sender], layout: DemoLayout,
                       token_weighted: bool) -> torch.Tensor:
    """(num_blocks, block_numel) float64: per coefficient, the (weighted) mean over the senders that
    own its block and picked it; 0 where none did. Senders are taken in the given (rank) order."""
    total = torch.zeros(slot.num_blocks * slot.block_numel, dtype=torch.float64)
    weight = torch.zeros_like(total)
    for sender in senders:
        own = _block_ownership(slot, sender.owned, sender.tokens > 0)
        if not bool(own.any()):
            continue
        blocks = own.nonzero().view(-1)  # only owned records are ever read
        idx, val = _unpack_records(layout.records(sender.payload, slot)[blocks], slot, layout)
        _check_indices(idx, slot, sender.rank)
        live = idx != slot.block_numel
        pos = (blocks.view(-1, 1) * slot.block_numel + idx)[live]  # unique within one sender
        w = float(sender.tokens) if token_weighted else 1.0
        total[pos] = total[pos] + val[live] * w
        weight[pos] = weight[pos] + w
    mean = torch.where(weight > 0, total / weight.clamp(min=1e-300), 0.0)
    return mean.view(slot.num_blocks, slot.block_numel)


def _update_mask(slot: DemoSlot, held: torch.Tensor, layout: DemoLayout, any_trained: bool) -> torch.Tensor | None:
    """Like `aggregation.update_masks_for`, from neuron-block ownership `held` (L, NB) bool."""
    if slot.ffn_layer is None:
        return None if any_trained else torch.zeros(slot.plan.shape, dtype=torch.bool)
    layer = held[slot.ffn_layer]
    if bool(layer.all()):
        return None
    return expand_neuron_vector(layer.repeat_interleave(layout.neuron_block), slot.neuron_axis)


def decode(payloads: Sequence[torch.Tensor], layout: DemoLayout, *, apply: str = "sign",
           token_weighted: bool = False) -> DecodedStep:
    """The update direction from every client's payload, given in rank order (all_gather's order).

    `apply`: "sign" (Psyche's sign-SGD apply) or "raw" (the decoded mean itself: for tests and the
    `raw` ablation). `token_weighted`: weight each sender's values by its tokens (as the allreduce
    average weights by T_i) instead of equally (DeMo). A block owned by no sender decodes to exactly
    0 with its mask False. `ProtocolError` for a payload of another layout, version or config, or an
    owned record with an invalid index; `ValueError` for an unknown `apply`.
    """
    if apply not in APPLY_MODES:
        raise ValueError(f"apply must be one of {', '.join(APPLY_MODES)} (got {apply!r})")
    senders = [_parse_sender(rank, p, layout) for rank, p in enumerate(payloads)]
    held_counts = torch.zeros(layout.num_layers, layout.neuron_blocks_per_layer, dtype=torch.int64)
    for sender in senders:
        held_counts += sender.owned.to(torch.int64)
    any_trained = any(s.tokens > 0 for s in senders)
    updates: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}
    for slot in layout.slots:
        mean = _mean_coefficients(slot, senders, layout, token_weighted)
        g = idct_blocks_exact(mean, slot.plan).to(torch.float32)  # exactly 0 in blocks nobody owns
        updates[slot.name] = torch.sign(g) if apply == "sign" else g
        masks[slot.name] = _update_mask(slot, held_counts > 0, layout, any_trained)
    return DecodedStep(updates, masks, held_counts, sum(1 for s in senders if s.tokens > 0))

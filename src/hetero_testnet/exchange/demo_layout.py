"""`--sync demo`: its config, the fixed payload layout, and which DCT blocks a client owns.

A DeMo client sends one flat uint8 payload per step. Its layout depends only on the model's
parameter shapes and the `DemoConfig`, never on the client's tier, so every payload of a run has
the same length and one gloo all_gather of uint8 tensors carries them. Layout, in bytes:

    header   8       magic 0xDE, version 1, value code (0 float32, 1 bfloat16, 2 one bit), 0,
                     tokens trained this step (u32, little-endian; 0 = did not train)
    bitmap   ceil(L * NB / 8)   bit l * NB + n (LSB first): the sender owns neuron block n of layer l
    slots    one section per parameter, in `BufferLayout` (named_parameters) order; a section is
             num_blocks records, one per DCT block in grid order, each record
                 k indices   u8 / u16 / u32 little-endian, the smallest width that holds the block size
                 k values    float32 or bfloat16 (native little-endian), or ceil(k / 8) bytes of sign
                             bits (1 = negative, LSB first)

k = min(topk, block size). Index value `block_numel` (hence "holds the block size") is the empty
slot: the sender sends nothing there. Records are whole bytes, so one block's bytes never share a
byte with another block's, and a receiver reads only the records of blocks the sender owns.

Ownership (after psyche-elastic's MatFormer alignment, made exact): an FFN DCT block is owned by a
client only if the client computed every neuron in it. gate/up blocks have h = `neuron_block` rows
(neurons), down blocks w = `neuron_block` columns, so DCT block rows of gate/up and block columns
of down are the *neuron blocks* of width `neuron_block` = largest divisor of intermediate_size <=
chunk. A partly computed block has no exact decode, so it counts as not owned; `check_whole_blocks`
rejects such neuron sets outright and `sample_block_helpers` draws helpers that never make one.
Every non-FFN block is owned by every client that trained (tokens > 0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hetero_testnet.errors import ConfigError
from hetero_testnet.exchange.aggregation import BufferLayout
from hetero_testnet.exchange.dct import BlockPlan, largest_divisor, plan_blocks
from hetero_testnet.model.matformer import ffn_width

VALUE_DTYPES = ("float32", "bfloat16")
HEADER_BYTES = 8
MAGIC = 0xDE
VERSION = 1
VALUE_CODE_1BIT = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """DeMo / DisTrO settings (names after DeMo's `compression_*` and Psyche's `quantize_1bit`)."""

    topk: int = 32
    """Coefficients sent per DCT block (compression_topk); capped at the block's size."""
    chunk: int = 64
    """Largest block side (compression_chunk): each dimension is cut at its largest divisor <= chunk."""
    decay: float = 0.999
    """beta of the local decoupled momentum `delta = beta * delta + lr * g` (compression_decay)."""
    quantize_1bit: bool = False
    """Send only the sign of each picked coefficient (Psyche); exact zeros are then not sent at all."""
    value_dtype: str = "float32"
    """Wire dtype of values without 1-bit: "float32" or "bfloat16"."""

    def __post_init__(self) -> None:
        for name in ("topk", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"demo.{name} must be an integer >= 1 (got {value!r})")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"demo.decay must be in [0, 1) (got {self.decay!r})")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"demo.value_dtype must be one of {', '.join(VALUE_DTYPES)} (got {self.value_dtype!r})")

    @property
    def value_code(self) -> int:
        """The header's value code: 0 float32, 1 bfloat16, 2 one bit."""
        return VALUE_CODE_1BIT if self.quantize_1bit else VALUE_DTYPES.index(self.value_dtype)

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.value_dtype == "bfloat16" else torch.float32


def index_bytes(block_numel: int) -> int:
    """Bytes per index: the smallest unsigned width holding `block_numel` (the empty-slot value)."""
    for width in (1, 2, 4):
        if block_numel < 1 << (8 * width):
            return width
    raise ValueError(f"a DCT block of {block_numel} coefficients needs indices wider than 32 bits")


@dataclass(frozen=True)
class DemoSlot:
    """One parameter's section of the payload."""

    name: str
    plan: BlockPlan
    k: int
    """Coefficients per block record: min(topk, block_numel)."""
    index_bytes: int
    value_bytes: int
    """Bytes of one record's values: 4k, 2k or ceil(k / 8)."""
    offset: int
    """Byte offset of the section in the payload."""
    ffn_layer: int | None
    neuron_axis: int
    """0: block rows are neuron blocks (gate/up); 1: block columns (down); 0 for non-FFN."""

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    @property
    def block_numel(self) -> int:
        return self.plan.block_numel

    @property
    def record_bytes(self) -> int:
        return self.k * self.index_bytes + self.value_bytes

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.record_bytes

    def neuron_block_of(self) -> torch.Tensor:
        """LongTensor (num_blocks,): the neuron block each DCT block covers (FFN slots only)."""
        gx = self.plan.grid[1]
        b = torch.arange(self.num_blocks)
        return b % gx if self.neuron_axis == 1 else b // gx


@dataclass(frozen=True)
class DemoLayout:
    """Where everything lives in a DeMo payload; identical on every client of a run."""

    config: DemoConfig
    slots: tuple[DemoSlot, ...]
    num_layers: int
    intermediate_size: int
    neuron_block: int
    """Neurons per FFN DCT block: largest_divisor(intermediate_size, chunk)."""

    @property
    def neuron_blocks_per_layer(self) -> int:
        return self.intermediate_size // self.neuron_block

    @property
    def bitmap_bytes(self) -> int:
        return math.ceil(self.num_layers * self.neuron_blocks_per_layer / 8)

    @property
    def slots_offset(self) -> int:
        return HEADER_BYTES + self.bitmap_bytes

    @property
    def payload_bytes(self) -> int:
        """Length of every payload: header + bitmap + sum over parameters of num_blocks * record_bytes."""
        return self.slots_offset + sum(s.nbytes for s in self.slots)

    @property
    def coefficients_per_payload(self) -> int:
        return sum(s.num_blocks * s.k for s in self.slots)

    def records(self, payload: torch.Tensor, slot: DemoSlot) -> torch.Tensor:
        """View (num_blocks, record_bytes) uint8 of `slot`'s section of `payload`."""
        return payload[slot.offset: slot.offset + slot.nbytes].view(slot.num_blocks, slot.record_bytes)


def build_demo_layout(layout: BufferLayout, config: DemoConfig) -> DemoLayout:
    """The payload layout for the parameters of `layout` (the allreduce buffer's, so names,
    order, FFN layers and neuron axes come from one place). `ValueError` for a parameter the DCT
    cannot cut (not 1-D or 2-D)."""
    neuron_block = largest_divisor(layout.intermediate_size, config.chunk)
    slots = []
    offset = HEADER_BYTES + math.ceil(layout.num_layers * (layout.intermediate_size // neuron_block) / 8)
    for s in layout.slots:
        plan = plan_blocks(s.shape, config.chunk)
        k = min(config.topk, plan.block_numel)
        vbytes = math.ceil(k / 8) if config.quantize_1bit else k * config.torch_value_dtype.itemsize
        slot = DemoSlot(s.name, plan, k, index_bytes(plan.block_numel), vbytes, offset, s.ffn_layer, s.neuron_axis)
        slots.append(slot)
        offset += slot.nbytes
    return DemoLayout(config, tuple(slots), layout.num_layers, layout.intermediate_size, neuron_block)


def allreduce_bytes(layout: BufferLayout) -> int:
    """Bytes of the allreduce strategy's float32 buffer (gradients + counts), for comparison."""
    return layout.total_numel * 4


# --------------------------------------------------------------------------- ownership

def check_tier_alignment(config: DemoConfig, intermediate_size: int, tiers: Iterable[int]) -> int:
    """Reject a run whose smallest tier does not end on a neuron-block boundary; returns neuron_block.

    A tier-t client owns neuron blocks [0, width_t / neuron_block); if neuron_block does not divide
    width_t, its last block is partly computed and has no exact decode. `ConfigError` otherwise
    (also for an invalid tier, from `ffn_width`).
    """
    tiers = list(tiers)
    if not tiers:
        raise ConfigError("demo sync needs at least one tier to check block alignment against")
    block = largest_divisor(intermediate_size, config.chunk)
    width = min(ffn_width(intermediate_size, t) for t in tiers)
    if width % block:
        fit = math.gcd(intermediate_size, width)
        raise ConfigError(f"demo chunk {config.chunk} makes {block}-neuron FFN blocks, which do not divide "
                          f"the smallest tier's FFN width {width}; use a demo chunk <= {fit} "
                          f"or only tiers whose FFN width is a multiple of {block}")
    return block


def owned_neuron_blocks(neuron_masks: torch.Tensor, neuron_block: int) -> torch.Tensor:
    """Bool (L, NB): neuron block n of layer l is owned iff every one of its neurons was computed.

    `neuron_masks` is (L, I) bool, as `matformer.build_neuron_masks`; `ValueError` if I is not a
    multiple of `neuron_block`.
    """
    num_layers, inter = neuron_masks.shape
    if inter % neuron_block:
        raise ValueError(f"neuron masks of width {inter} do not split into blocks of {neuron_block}")
    return neuron_masks.view(num_layers, inter // neuron_block, neuron_block).all(dim=2)


def check_whole_blocks(neuron_masks: torch.Tensor, neuron_block: int) -> None:
    """`ConfigError` if some neuron block is computed only in part (helpers not drawn in whole blocks):
    those neurons would be trained but their block could never be sent."""
    num_layers, inter = neuron_masks.shape
    blocks = neuron_masks.view(num_layers, inter // neuron_block, neuron_block)
    partial = blocks.any(dim=2) & ~blocks.all(dim=2)
    if bool(partial.any()):
        layer, block = (int(v) for v in partial.nonzero()[0])
        raise ConfigError(f"demo sync: layer {layer} computes part of neuron block {block} "
                          f"(neurons {block * neuron_block}..{(block + 1) * neuron_block - 1}); "
                          f"draw helper neurons in whole {neuron_block}-neuron blocks (sample_block_helpers)")


def _block_seed(seed: int, rotation_epoch: int, layer: int) -> int:
    digest = hashlib.blake2b(f"demo-helper-blocks:{seed}:{rotation_epoch}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_block_helpers(intermediate_size: int, prefix_width: int, fraction: float, neuron_block: int, *,
                         seed: int, step: int, rotation_interval: int, num_layers: int) -> tuple[torch.Tensor, ...]:
    """Helper neurons in whole blocks: `floor(floor(prefix_width * fraction) / neuron_block)` suffix blocks
    per layer (capped at the suffix), drawn like `matformer.sample_helpers` from (seed, step //
    rotation_interval, layer) only, so every process agrees without talking. Returns sorted
    LongTensors of neuron ids for `NeuronSet.helpers`. `ConfigError` if `prefix_width` is not a
    multiple of `neuron_block` or the fraction/interval are invalid.
    """
    if not 0.0 <= fraction <= 1.0 or rotation_interval < 1:
        raise ConfigError(f"helper fraction must be in [0, 1] and rotation interval >= 1 "
                          f"(got {fraction!r}, {rotation_interval!r})")
    if prefix_width % neuron_block or intermediate_size % neuron_block:
        raise ConfigError(f"FFN width {prefix_width} is not a whole number of {neuron_block}-neuron blocks")
    first, total = prefix_width // neuron_block, intermediate_size // neuron_block
    count = min(math.floor(prefix_width * fraction) // neuron_block, total - first)
    helpers = []
    for layer in range(num_layers):
        if count == 0:
            helpers.append(torch.empty(0, dtype=torch.long))
            continue
        g = torch.Generator().manual_seed(_block_seed(seed, step // rotation_interval, layer))
        blocks = torch.sort(torch.randperm(total - first, generator=g)[:count] + first).values
        helpers.append((blocks.view(-1, 1) * neuron_block + torch.arange(neuron_block)).reshape(-1))
    return tuple(helpers)


# --------------------------------------------------------------------------- bits

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool (..., n) -> uint8 (..., ceil(n / 8)), bit i of a row at byte i // 8, bit i % 8 (LSB first)."""
    n = bits.shape[-1]
    padded = torch.zeros(*bits.shape[:-1], math.ceil(n / 8) * 8, dtype=torch.uint8)
    padded[..., :n] = bits.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    grouped = padded.view(*bits.shape[:-1], -1, 8) * weights  # values <= 128, no overflow
    return grouped.sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., m) -> bool (..., n): the inverse of `pack_bits` (n <= 8 m)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (..., m, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.bool)

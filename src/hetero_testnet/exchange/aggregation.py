"""The exact masked average of heterogeneous gradients, on plain tensors (no processes).

Rule (HeteroFL's holders-only average, weighted by tokens as in FjORD): every element of every
parameter is averaged over the clients that computed it, weighted by the number of tokens each
trained. A client that trained T_i tokens holds the gradient g_i of its *mean* loss, so it
contributes T_i * g_i; the average is

    g = sum_i T_i * m_i * g_i  /  sum_i T_i * m_i          (m_i = 1 where client i computed)

which is exactly the gradient of the mean loss over every token that computed that element,
whatever the batch split. Where no client computed an element (count 0) the average is 0 and the
element's update mask is False: the optimizer leaves it, and its moments, untouched.

Only FFN neurons differ between clients, so the counts are small: one total token count for
every non-FFN parameter and one count per (layer, FFN neuron). Gradients and counts travel in one
float32 buffer, so a step needs a single all-reduce (SUM); float32 counts are exact up to 2**24
tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero_testnet.model.matformer import expand_neuron_vector, ffn_layer, ffn_neuron_axis, is_ffn_param


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    ffn_layer: int | None
    """Layer index for FFN matrices (their neurons can differ between clients), else None."""
    neuron_axis: int
    """`matformer.ffn_neuron_axis`: 0 for gate/up (neurons are rows), 1 for down (columns); 0 otherwise."""


@dataclass(frozen=True)
class BufferLayout:
    """Where each parameter's gradient and the counts live in the flat exchange buffer.

    Buffer: [grads of every parameter, in `named_parameters` order][total tokens][per-layer
    per-neuron token counts, (num_layers * intermediate)]. Identical on every client because
    every client holds the same full-shape model.
    """

    slots: tuple[ParamSlot, ...]
    num_layers: int
    intermediate_size: int
    grad_numel: int

    @property
    def count_offset(self) -> int:
        return self.grad_numel

    @property
    def total_numel(self) -> int:
        return self.grad_numel + 1 + self.num_layers * self.intermediate_size


def build_layout(named_shapes: list[tuple[str, tuple[int, ...]]], num_layers: int,
                 intermediate_size: int) -> BufferLayout:
    slots = []
    offset = 0
    for name, shape in named_shapes:
        numel = 1
        for d in shape:
            numel *= d
        ffn = is_ffn_param(name)
        slots.append(ParamSlot(name, tuple(shape), offset, numel, ffn_layer(name) if ffn else None,
                               ffn_neuron_axis(name) if ffn else 0))
        offset += numel
    return BufferLayout(tuple(slots), num_layers, intermediate_size, offset)


def layout_for_model(model: torch.nn.Module, num_layers: int, intermediate_size: int) -> BufferLayout:
    return build_layout([(n, tuple(p.shape)) for n, p in model.named_parameters()], num_layers,
                        intermediate_size)


def grad_views(buffer: torch.Tensor, layout: BufferLayout) -> dict[str, torch.Tensor]:
    """Views of the buffer shaped like each parameter: install them as `p.grad` so backward
    accumulates straight into the exchange buffer (no copy before or after the all-reduce)."""
    return {s.name: buffer[s.offset: s.offset + s.numel].view(s.shape) for s in layout.slots}


def pack_contribution(buffer: torch.Tensor, layout: BufferLayout, neuron_masks: torch.Tensor,
                      tokens: int) -> torch.Tensor:
    """Scale the gradients in `buffer` by this client's token count T and write its counts.

    `buffer[:grad_numel]` holds the gradient of the client's mean loss (via `grad_views`).
    `neuron_masks` is (num_layers, intermediate) bool: which FFN neurons this client computed;
    its gradients outside the mask are already exactly zero (the model guarantees it).
    """
    scale = float(tokens)
    buffer[:layout.grad_numel].mul_(scale)
    c = layout.count_offset
    buffer[c] = scale
    buffer[c + 1:layout.total_numel].copy_(neuron_masks.reshape(-1).to(buffer.dtype) * scale)
    return buffer


def apply_average(buffer: torch.Tensor, layout: BufferLayout) -> dict[str, torch.Tensor | None]:
    """Turn an all-reduced (summed) buffer into averaged gradients, in place.

    Returns the update mask per parameter: None where every element was computed by someone,
    else a bool tensor broadcastable to the parameter (False = nobody computed it this step).
    """
    c = layout.count_offset
    total = float(buffer[c])
    neuron_counts = buffer[c + 1:layout.total_numel].view(layout.num_layers, layout.intermediate_size).clone()
    for slot in layout.slots:
        grad = buffer[slot.offset: slot.offset + slot.numel].view(slot.shape)
        if slot.ffn_layer is None:
            if total > 0:
                grad.div_(total)
            else:
                grad.zero_()
            continue
        # Elements nobody computed have a summed gradient of exactly 0: dividing by max(count, 1)
        # leaves them 0, so one division serves both cases.
        grad.div_(expand_neuron_vector(neuron_counts[slot.ffn_layer].clamp(min=1.0), slot.neuron_axis))
    return update_masks_for(layout, neuron_counts > 0)


def update_masks_for(layout: BufferLayout, held: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Per-parameter update masks from `held` (num_layers, intermediate) bool: who computed each neuron.

    Non-FFN parameters map to None (every client computes them); so does an FFN matrix whose
    neurons were all held; otherwise a bool view broadcastable to the matrix.
    """
    masks: dict[str, torch.Tensor | None] = {}
    for slot in layout.slots:
        if slot.ffn_layer is None:
            masks[slot.name] = None
            continue
        layer_held = held[slot.ffn_layer]
        masks[slot.name] = None if bool(layer_held.all()) else expand_neuron_vector(layer_held, slot.neuron_axis)
    return masks


def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, deterministic split of `numel` elements over ranks (for the norm computation)."""
    per = numel // world_size
    extra = numel % world_size
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 math on a tensor of `device` runs: there, except on MPS (no float64), the host."""
    return torch.device("cpu") if device.type == "mps" else device


def sum_of_squares(buffer: torch.Tensor, start: int, end: int) -> float:
    """Sum of squares in float64 of a slice, chunked to bound the temporary."""
    total = 0.0
    chunk = 1 << 22
    for s in range(start, end, chunk):
        piece = buffer[s:min(end, s + chunk)].to(float64_device(buffer.device), torch.float64)
        total += float(torch.dot(piece, piece))
    return total

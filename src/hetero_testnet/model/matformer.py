"""MatFormer tiers: which FFN neurons a client computes, as pure functions on shapes and indices.

Only the FFN hidden dimension is elastic (MatFormer, Devvrit et al. 2023, arXiv:2310.07707): tier t
computes the first `intermediate_size >> t` neurons of every layer, i.e. the first rows of
`gate_proj` and `up_proj` and the first columns of `down_proj`. Attention, embeddings, norms and the
head are full width at every tier. A client of tier t > 0 may also train "helper" neurons: a few
suffix neurons per layer, drawn afresh every `rotation_interval` steps, so that the suffix (which
only tier-0 clients otherwise reach) gets gradient from small clients too.

Vocabulary (used across the package):
- `tier`: an int >= 0; `ffn_width` (or `prefix_width`) = `intermediate_size >> tier`.
- a *neuron* is one index of the FFN hidden dimension; its parameters are row i of gate/up and
  column i of down in every layer.
- a `NeuronSet` is the neurons one client computes in one step: the prefix plus per-layer helpers.

Nothing here touches process groups or the model; `model.py` consumes `NeuronSet`, `optim.py` and
the aggregation code consume the per-neuron masks built here. Which axis of an FFN matrix indexes
neurons is decided here only (`ffn_neuron_axis`, `expand_neuron_vector`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from hetero_testnet.config import ModelConfig
from hetero_testnet.errors import ConfigError

# `model.layers.{i}.mlp.{gate,up,down}_proj.weight` (Hugging Face Llama names)
_FFN_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")


def ffn_width(intermediate_size: int, tier: int) -> int:
    """FFN width of `tier`: `intermediate_size >> tier` (MatFormer's nested halvings)."""
    if isinstance(tier, bool) or not isinstance(tier, int):
        raise ConfigError(f"tier must be an integer >= 0 (got {tier!r})")
    if tier < 0:
        raise ConfigError(f"tier must be >= 0 (got {tier})")
    width = intermediate_size >> tier
    if width < 1:
        max_tier = intermediate_size.bit_length() - 1
        raise ConfigError(f"tier {tier} leaves no FFN neurons (intermediate_size {intermediate_size}); "
                          f"use a tier <= {max_tier}")
    return width


@dataclass(frozen=True)
class NeuronSet:
    """The FFN neurons one client computes: `[0, prefix_width)` plus `helpers[layer]` per layer.

    `helpers` is None (prefix only: the fast slicing path in `model.py`) or one sorted LongTensor
    per layer of suffix neuron ids in `[prefix_width, intermediate_size)`, all of the same length.
    Equality and hashing compare the ids, not tensor identity.
    """

    prefix_width: int
    helpers: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        if self.prefix_width < 1:
            raise ConfigError(f"NeuronSet.prefix_width must be >= 1 (got {self.prefix_width})")
        if self.helpers is not None:
            sizes = {int(h.numel()) for h in self.helpers}
            if len(sizes) > 1:
                raise ValueError(f"helpers must have the same count in every layer (got {sorted(sizes)})")
            for h in self.helpers:
                if h.dtype != torch.long or h.dim() != 1:
                    raise ValueError("helpers must be 1-D LongTensors")
                if h.numel() and int(h.min()) < self.prefix_width:
                    raise ValueError("helper neuron ids must lie in the suffix [prefix_width, intermediate)")

    @property
    def num_helpers(self) -> int:
        """Helper neurons per layer (0 without helpers)."""
        return 0 if not self.helpers else int(self.helpers[0].numel())

    def is_full(self, intermediate_size: int) -> bool:
        """True when every neuron is computed (tier 0): the plain, unmasked model."""
        return self.prefix_width + self.num_helpers >= intermediate_size

    def layer_selection(self, layer: int) -> int | torch.Tensor:
        """What the FFN of `layer` computes: an int width (prefix only) or the neuron ids (with helpers)."""
        if self.num_helpers == 0:
            return self.prefix_width
        assert self.helpers is not None
        prefix = torch.arange(self.prefix_width, dtype=torch.long)
        return torch.cat([prefix, self.helpers[layer]])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        if self.prefix_width != other.prefix_width or self.num_helpers != other.num_helpers:
            return False
        if self.num_helpers == 0:
            return True
        assert self.helpers is not None and other.helpers is not None
        return len(self.helpers) == len(other.helpers) and all(
            torch.equal(a, b) for a, b in zip(self.helpers, other.helpers))

    def __hash__(self) -> int:
        ids = tuple(tuple(h.tolist()) for h in self.helpers) if self.num_helpers else ()
        return hash((self.prefix_width, ids))


def _helper_seed(seed: int, rotation_epoch: int, layer: int) -> int:
    """A 63-bit generator seed from (run seed, rotation epoch, layer), the same in every process.

    blake2b rather than Python's `hash()` (salted per process) or arithmetic (collides easily).
    """
    digest = hashlib.blake2b(f"helpers:{seed}:{rotation_epoch}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"helper fraction must be a number in [0, 1] (got {fraction!r})")
    return float(fraction)


def sample_helpers(intermediate_size: int, prefix_width: int, fraction: float, *, seed: int, step: int,
                   rotation_interval: int, num_layers: int) -> tuple[torch.Tensor, ...]:
    """Helper neurons per layer: `floor(prefix_width * fraction)` suffix ids drawn without replacement.

    The count is capped at the suffix size `intermediate_size - prefix_width` (0 at tier 0). The draw
    depends only on (seed, step // rotation_interval, layer), through a local generator, so every
    client and the coordinator agree on it without communicating, and it changes every
    `rotation_interval` steps. Returns sorted LongTensors (possibly empty), one per layer.
    """
    fraction = _check_fraction(fraction)
    if isinstance(rotation_interval, bool) or not isinstance(rotation_interval, int) or rotation_interval < 1:
        raise ConfigError(f"helper rotation interval must be an integer >= 1 (got {rotation_interval!r})")
    if not 1 <= prefix_width <= intermediate_size:
        raise ConfigError(f"prefix width {prefix_width} must be in [1, {intermediate_size}]")
    suffix = intermediate_size - prefix_width
    count = min(math.floor(prefix_width * fraction), suffix)
    rotation_epoch = step // rotation_interval
    helpers = []
    for layer in range(num_layers):
        if count == 0:
            helpers.append(torch.empty(0, dtype=torch.long))
            continue
        g = torch.Generator().manual_seed(_helper_seed(seed, rotation_epoch, layer))
        ids = torch.randperm(suffix, generator=g)[:count] + prefix_width
        helpers.append(torch.sort(ids).values)
    return tuple(helpers)


def build_neuron_set(model_cfg: ModelConfig, tier: int, helper_fraction: float, rotation_interval: int,
                     seed: int, step: int) -> NeuronSet:
    """The neurons a client of `tier` computes at `step` (helpers None when there are none)."""
    width = ffn_width(model_cfg.intermediate_size, tier)
    helpers = sample_helpers(model_cfg.intermediate_size, width, helper_fraction, seed=seed, step=step,
                             rotation_interval=rotation_interval, num_layers=model_cfg.num_hidden_layers)
    if all(h.numel() == 0 for h in helpers):
        return NeuronSet(prefix_width=width)
    return NeuronSet(prefix_width=width, helpers=helpers)


def neuron_mask(neurons: NeuronSet, intermediate_size: int, layer: int) -> torch.Tensor:
    """BoolTensor (intermediate_size,): True for the neurons of `layer` in the set."""
    mask = torch.zeros(intermediate_size, dtype=torch.bool)
    mask[: neurons.prefix_width] = True
    if neurons.num_helpers:
        assert neurons.helpers is not None
        mask[neurons.helpers[layer]] = True
    return mask


def build_neuron_masks(neurons: NeuronSet, intermediate_size: int, num_layers: int) -> torch.Tensor:
    """BoolTensor (num_layers, intermediate_size): `neuron_mask` of every layer, stacked."""
    return torch.stack([neuron_mask(neurons, intermediate_size, layer) for layer in range(num_layers)])


# --------------------------------------------------------------------------- parameter names

def is_ffn_param(name: str) -> bool:
    """True for `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, the only tier-dependent tensors."""
    return _FFN_PARAM.match(name) is not None


def _parse_ffn_param(name: str) -> tuple[int, str]:
    m = _FFN_PARAM.match(name)
    if m is None:
        raise ValueError(f"{name} is not an FFN parameter")
    return int(m.group(1)), m.group(2)


def ffn_layer(name: str) -> int:
    """The layer index of an FFN parameter name."""
    return _parse_ffn_param(name)[0]


def ffn_neuron_axis(name: str) -> int:
    """The dimension that indexes neurons: rows (0) of gate/up (I, C), columns (1) of down (C, I)."""
    return 1 if _parse_ffn_param(name)[1] == "down" else 0


def expand_neuron_vector(vector: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-neuron vector (I,) as a view broadcastable to an FFN matrix whose neuron axis is `axis`
    (`ffn_neuron_axis(name)`): (I, 1) for gate/up (axis 0), (1, I) for down (axis 1)."""
    return vector.view(1, -1) if axis == 1 else vector.view(-1, 1)


def slice_ffn_state_dict(state: Mapping[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """A copy of `state` with every FFN tensor cut to its first `width` neurons (a standalone tier model)."""
    out = {}
    for name, t in state.items():
        if is_ffn_param(name):
            t = t.narrow(ffn_neuron_axis(name), 0, width)
        out[name] = t.clone()
    return out

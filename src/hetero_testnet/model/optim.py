"""Learning-rate schedule, the gradient clipping coefficient, a masked AdamW and a masked SGD.

`MaskedAdamW` is AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101; the same update as
`torch.optim.AdamW`) that updates each parameter only where a per-neuron mask is True. A MatFormer
client of tier t > 0 never computes the FFN suffix, so it must not touch it at all: no weight decay,
no moment decay, no step count. Otherwise a small client would shrink neurons it never saw, and
the Adam state of replicas that see different neuron sets would drift apart.

Determinism: every replica of a run applies the same averaged gradient and must end bit-identical.
The update therefore uses only elementwise ops that are correctly rounded one at a time (add, sub,
mul, div, sqrt, where): no reductions, no fused ops (lerp, addcmul, addcdiv may contract to FMA in
vectorised loops but not in scalar tails, so their last bit can depend on how a tensor is split
over threads), and bias corrections computed in Python from the integer step counts.

`MaskedSGD` is plain SGD under the same rules (`optimizer: {SGD: ...}`): `p = p (1 - lr wd) - lr g`
where the mask allows; `build_optimizer` picks one of the two from `OptimizerConfig.kind`.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable, Mapping

import torch

from hetero_testnet.config import LRScheduleConfig, OptimizerConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.matformer import ffn_neuron_axis, is_ffn_param

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def lr_at(step: int, cfg: LRScheduleConfig) -> float:
    """Psyche's learning rate at `step` (psyche_core `definitions.rs`); every kind warms up linearly,
    `step < warmup`: `init + (base - init) * step / warmup`, and then:

    - Cosine: `final + (base - final) * 0.5 * (1 + cos(pi * progress))`, with
      `progress = (step - warmup) / (total - warmup)` clamped to [0, 1], so steps past `total_steps`
      (a run extended beyond its schedule) stay at `final_lr` instead of climbing the cosine back up.
      When `total <= warmup` the decay has no length and progress is 1.
    - Constant: `base`. Linear: `base + (final - base) * progress` (the same clamped progress).
    - WarmupStableDecay: `base` for `stable_steps`, a cosine to `cosine_decay_final_lr` over
      `cosine_decay_steps`, a line to `linear_decay_final_lr` over `linear_decay_steps`, then that.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    warmup, total = cfg.warmup_steps, cfg.total_steps
    if step < warmup:
        return cfg.warmup_init_lr + (cfg.base_lr - cfg.warmup_init_lr) * step / warmup
    if cfg.kind != "Cosine":
        return _lr_after_warmup(step - warmup, cfg)
    progress = 1.0 if total <= warmup else min(1.0, (step - warmup) / (total - warmup))
    return cfg.final_lr + (cfg.base_lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_lr(step: int, cfg: LRScheduleConfig) -> float:
    """The learning rate of this tool's step `step`, counted from 0: Psyche's `lr_at(step + 1)`.

    Why +1: the reference counts steps from 1, so its first optimizer step already takes
    `init + (base - init) / warmup`. Indexing the schedule by a 0-based step made every run's
    first step use `warmup_init_lr` (0.0 in every shipped config), i.e. move no weight at all,
    and shifted the whole schedule one step late. The last step (`total - 1`) takes `lr_at(total)`
    (`final_lr` for Cosine). Every trainer (coordinator, `testnet train`, DeMo, DiLoCo inner steps)
    asks this function, so resume and single-process runs agree.
    """
    return lr_at(step + 1, cfg)


def _lr_after_warmup(s: int, cfg: LRScheduleConfig) -> float:
    """Constant, Linear and WarmupStableDecay at `s` steps after the warmup (see `lr_at`)."""
    if cfg.kind == "Constant":
        return cfg.base_lr
    if cfg.kind == "Linear":
        length = cfg.total_steps - cfg.warmup_steps
        progress = 1.0 if length <= 0 else min(1.0, s / length)
        return cfg.base_lr + (cfg.final_lr - cfg.base_lr) * progress
    if s < cfg.stable_steps:
        return cfg.base_lr
    s -= cfg.stable_steps
    if s < cfg.cosine_decay_steps:
        decay = 0.5 * (1.0 + math.cos(math.pi * s / cfg.cosine_decay_steps))
        return cfg.cosine_decay_final_lr + (cfg.base_lr - cfg.cosine_decay_final_lr) * decay
    s -= cfg.cosine_decay_steps
    if s < cfg.linear_decay_steps:
        drop = cfg.cosine_decay_final_lr - cfg.linear_decay_final_lr
        return cfg.cosine_decay_final_lr - drop * s / cfg.linear_decay_steps
    return cfg.linear_decay_final_lr


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Factor to multiply gradients by so their global norm is at most `max_norm` (0 = no clipping).

    Same formula as `torch.nn.utils.clip_grad_norm_`: `min(1, max_norm / (total_norm + 1e-6))`.
    A non-finite `total_norm` gives a non-finite coefficient (NaN/0), which the caller must treat
    as a diverged step rather than apply.
    """
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def _fp32(x: float) -> float:
    """`x` rounded to the nearest float32 (as a tensor stores it), back as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _per_neuron_factors(step: torch.Tensor, lr: float, b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`lr / (1 - b1**n)`, `sqrt(1 - b2**n)`) per neuron for step counts `n`, float32 on `step`'s device.

    Computed in Python doubles for each distinct integer count (a tensor `pow` is not correctly
    rounded, and MPS has no float64 tensors): each bias correction is rounded to float32 first, as the
    float32 tensor this once was, then the quotient and the square root are rounded to float32. So
    the bits equal the former float64-tensor computation on every device, and
    `torch.optim.AdamW`'s for a count shared by all neurons.
    """
    step_size = torch.empty_like(step)
    bc2_sqrt = torch.empty_like(step)
    for n in torch.unique(step).tolist():
        where = step == n
        step_size[where] = lr / _fp32(1.0 - b1 ** n)
        bc2_sqrt[where] = math.sqrt(_fp32(1.0 - b2 ** n))
    return step_size, bc2_sqrt


class MaskedAdamW:
    """AdamW whose `step` changes each parameter only where its update mask is True.

    Weight decay (decoupled) applies only to parameters with dim >= 2 (matrices: embeddings,
    projections, head), never to norm weights: the nanoGPT `configure_optimizers` convention.
    State per parameter name: `exp_avg`, `exp_avg_sq` (full shape) and `step`, a float tensor of
    the mask's broadcast shape ((I, 1) for gate/up, (1, I) for down, so each neuron has its own
    count and bias correction) or () for every other (never masked) parameter.

    Usage per step: the caller fills `p.grad` (averaged, clipped), then `step(lr, masks)`.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig) -> None:
        self.params: dict[str, torch.nn.Parameter] = dict(named_params)
        self.beta1, self.beta2 = float(cfg.betas[0]), float(cfg.betas[1])
        self.eps = float(cfg.eps)
        self.weight_decay = float(cfg.weight_decay)
        # Created eagerly with fixed shapes, so every replica's state has the same keys and sizes
        # from the start (state broadcasts and checkpoints need no special first-step case).
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: self._init_state(name, p) for name, p in self.params.items()}

    @staticmethod
    def _init_state(name: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero moments; step count per neuron for FFN weights ((I, 1) or (1, I)), else a scalar."""
        if is_ffn_param(name):
            step_shape = [1] * p.dim()
            axis = ffn_neuron_axis(name)
            step_shape[axis] = p.shape[axis]
        else:
            step_shape = []
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format),
                "step": torch.zeros(step_shape, dtype=torch.float32, device=p.device)}

    @torch.no_grad()
    def step(self, lr: float, update_masks: Mapping[str, torch.Tensor | None] | None = None) -> None:
        """One AdamW update from `p.grad` (already averaged and clipped by the caller).

        `update_masks[name]` is a BoolTensor broadcastable to the parameter, or None (or absent) to
        update every element. Masked-out elements keep parameter and state bit-identical.
        Parameters whose `grad` is None are skipped entirely.
        """
        masks = update_masks or {}
        for name, p in self.params.items():
            if p.grad is None:
                continue
            mask = masks.get(name)
            state = self.state[name]
            if mask is not None and mask.dim() > 0 and state["step"].shape != mask.shape:
                if state["step"].dim() != 0:
                    raise ValueError(f"mask shape {tuple(mask.shape)} for {name} differs from its "
                                     f"step count shape {tuple(state['step'].shape)}")
                state["step"] = state["step"].expand(mask.shape).clone()
            self._update(p, p.grad, state, lr, mask)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
                mask: torch.Tensor | None) -> None:
        b1, b2 = self.beta1, self.beta2
        m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        new_step = step + 1.0
        if new_step.dim() == 0:  # Python's pow of the count: exactly torch.optim.AdamW's scalar step
            count = float(new_step)
            step_size: torch.Tensor | float = lr / (1.0 - b1 ** count)
            bc2_sqrt: torch.Tensor | float = (1.0 - b2 ** count) ** 0.5
        else:
            step_size, bc2_sqrt = _per_neuron_factors(new_step, lr, b1, b2)
        # Unmasked: update in place (the embedding and head are 12.9 M elements each, so every
        # temporary counts). Masked: compute on copies, then keep them only where the mask is True.
        new_p, new_m, new_v = (p, m, v) if mask is None else (p.detach().clone(), m.clone(), v.clone())
        if p.dim() >= 2:
            new_p.mul_(1.0 - lr * self.weight_decay)  # decoupled weight decay, matrices only
        tmp = torch.sub(grad, new_m)
        new_m.add_(tmp.mul_(1.0 - b1))  # m + (g - m)(1 - b1): torch's exp_avg.lerp_(g, 1 - b1)
        torch.mul(grad, 1.0 - b2, out=tmp)
        new_v.mul_(b2).add_(tmp.mul_(grad))  # v b2 + ((1 - b2) g) g: torch's addcmul_
        denom = torch.sqrt(new_v).div_(bc2_sqrt).add_(self.eps)
        new_p.sub_(torch.div(new_m, denom, out=denom).mul_(step_size))  # p - step_size * m / denom
        if mask is None:
            step.copy_(new_step)
        else:
            p.copy_(torch.where(mask, new_p, p))
            m.copy_(torch.where(mask, new_m, m))
            v.copy_(torch.where(mask, new_v, v))
            step.copy_(torch.where(mask, new_step, step))

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat `{"<param>.exp_avg" | ".exp_avg_sq" | ".step": tensor}`, ready for safetensors."""
        return {f"{name}.{key}": t for name, state in self.state.items() for key, t in state.items()}

    def load_state_dict(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `state_dict`; `ConfigError` on unknown, missing or misshapen entries."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            name, _, kind = key.rpartition(".")
            if name not in self.params or kind not in _STATE_KEYS:
                raise ConfigError(f"optimizer state has unknown entry {key!r}")
            state.setdefault(name, {})[kind] = t
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ConfigError(f"optimizer state lacks parameter {missing[0]}" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        new_state = {}
        for name, s in state.items():
            if set(s) != set(_STATE_KEYS):
                raise ConfigError(f"optimizer state for {name} lacks {sorted(set(_STATE_KEYS) - set(s))}")
            p = self.params[name]
            for kind in ("exp_avg", "exp_avg_sq"):
                if s[kind].shape != p.shape:
                    raise ConfigError(f"optimizer state {name}.{kind} has shape {tuple(s[kind].shape)}, "
                                      f"parameter has {tuple(p.shape)}")
            step_shape = self.state[name]["step"].shape
            try:
                step = s["step"].to(torch.float32).expand(step_shape)
            except RuntimeError as e:
                raise ConfigError(f"optimizer state {name}.step has shape {tuple(s['step'].shape)}, "
                                  f"expected {tuple(step_shape)}") from e
            new_state[name] = {
                "exp_avg": s["exp_avg"].detach().to(p.device, torch.float32).clone().contiguous(),
                "exp_avg_sq": s["exp_avg_sq"].detach().to(p.device, torch.float32).clone().contiguous(),
                "step": step.detach().to(p.device).clone().contiguous(),
            }
        self.state = new_state


class MaskedSGD:
    """Plain SGD (no momentum) with MaskedAdamW's conventions: decoupled weight decay on matrices
    only, and elements outside the update mask keep their parameter bit-identical. No state.

    `p = p * (1 - lr * wd) - lr * g`: the decay first, as MaskedAdamW does, then the step, each a
    correctly rounded elementwise op (no fused multiply-add), so replicas agree bit for bit.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig) -> None:
        self.params: dict[str, torch.nn.Parameter] = dict(named_params)
        self.weight_decay = float(cfg.weight_decay)

    @torch.no_grad()
    def step(self, lr: float, update_masks: Mapping[str, torch.Tensor | None] | None = None) -> None:
        """One SGD update from `p.grad`; `update_masks` as in `MaskedAdamW.step`."""
        masks = update_masks or {}
        for name, p in self.params.items():
            if p.grad is None:
                continue
            mask = masks.get(name)
            new_p = p if mask is None else p.detach().clone()
            if p.dim() >= 2 and self.weight_decay:
                new_p.mul_(1.0 - lr * self.weight_decay)
            new_p.sub_(torch.mul(p.grad, lr))
            if mask is not None:
                p.copy_(torch.where(mask, new_p, p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No state: `{}` (checkpoints and state broadcasts carry nothing for SGD)."""
        return {}

    def load_state_dict(self, flat: Mapping[str, torch.Tensor]) -> None:
        if flat:
            raise ConfigError(f"SGD has no optimizer state, but the checkpoint holds {len(flat)} entries "
                              f"(e.g. {next(iter(flat))!r}); was it saved with AdamW?")


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    cfg: OptimizerConfig) -> "MaskedAdamW | MaskedSGD":
    """The optimizer `cfg.kind` names: MaskedAdamW ("AdamW") or MaskedSGD ("SGD")."""
    return MaskedSGD(named_params, cfg) if cfg.kind == "SGD" else MaskedAdamW(named_params, cfg)

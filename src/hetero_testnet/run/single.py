"""`testnet train`: one client alone on the whole global batch, the baseline a distributed run
with any number of tier-0 clients must match. It is the client at world size 1: the same
`forward_backward`, the same `exchange.reducer.MaskedGradientReducer` (strategy `SingleProcess`),
the same `MaskedAdamW`. It follows the run's conventions exactly:

- steps are numbered from 0; step s trains on sample ids `[s * B, (s + 1) * B)` of the training
  split (B = `config.timing.global_batch_size(tokens_seen)` sequences) at `step_lr(s)`;
- the gradient is the mean over every token of the batch, clipped by its global L2 norm;
- `MaskedAdamW` updates only the neurons the client computed (the tier prefix plus helpers), so
  neurons outside the set keep their initial values and optimizer state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetero_testnet.config import RunConfig
from hetero_testnet.errors import RunFailedError
from hetero_testnet.exchange.aggregation import layout_for_model
from hetero_testnet.exchange.reducer import MaskedGradientReducer
from hetero_testnet.exchange.strategies import SingleProcess
from hetero_testnet.model.checkpoint import save_checkpoint
from hetero_testnet.model.matformer import NeuronSet, build_neuron_masks, build_neuron_set, ffn_width
from hetero_testnet.model.nanogpt import NanoGPT, build_model, count_parameters
from hetero_testnet.model.optim import MaskedAdamW, MaskedSGD, build_optimizer, step_lr
from hetero_testnet.model.train import Samples, evaluate, forward_backward


@dataclass
class TrainResult:
    """What a single-client run did; the CLI prints it."""

    num_parameters: int
    tier: int
    ffn_width: int
    steps: int
    initial_val_loss: float
    final_val_loss: float
    final_train_loss: float
    wall_time_s: float
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _splits(config: RunConfig, train_data: Samples | None, val_data: Samples | None) -> tuple[Samples, Samples]:
    """The given datasets, or the config's train and val splits where one is None."""
    m = config.model
    if train_data is None or val_data is None:
        from hetero_testnet.data.shards import open_split

        if train_data is None:
            train_data = open_split(config.data, "train", m.max_seq_len, m.vocab_size, config.data_order_seed)
        if val_data is None:
            val_data = open_split(config.data, "val", m.max_seq_len, m.vocab_size)
    return train_data, val_data


def _train_step(model: NanoGPT, optimizer: MaskedAdamW | MaskedSGD, reducer: MaskedGradientReducer, config: RunConfig,
                tokens: torch.Tensor, neurons: NeuronSet, step: int) -> tuple[float, int, float]:
    """forward/backward, reduce (world size 1: norm, clip, masks), AdamW at `step_lr(step)`.

    Returns (loss, target tokens, grad_norm); `RunFailedError` if the loss or norm is not finite.
    """
    m = config.model
    loss, num_tokens = forward_backward(model, tokens, neurons, config.micro_batch_size)
    reduced = reducer.reduce(build_neuron_masks(neurons, m.intermediate_size, m.num_hidden_layers), num_tokens)
    if not (math.isfinite(loss) and math.isfinite(reduced.grad_norm)):
        raise RunFailedError(f"step {step}: loss {loss} / gradient norm {reduced.grad_norm} is not finite; "
                             f"lower lr_schedule.base_lr or check the data")
    optimizer.step(step_lr(step, config.lr_schedule), reduced.update_masks)
    return loss, num_tokens, reduced.grad_norm


def _single_process_reducer(model: NanoGPT, config: RunConfig) -> MaskedGradientReducer:
    """The distributed client's reducer at world size 1 (`SingleProcess`): `p.grad` become its buffer.

    The norm is the reducer's: one float64 dot product per 4M-element chunk of the flat buffer,
    where this baseline used to add `torch.sum(g.double() ** 2)` per parameter. The two orders
    differ in the last float64 bits of `grad_norm` (up to ~1e-15 relative on the tiny config).
    That reaches the weights only through the clip coefficient, which `Tensor.mul_` rounds to
    float32 (its ulp is ~1e-7), so the weights stay identical unless a coefficient falls within
    ~1e-15 of a float32 rounding boundary; `tests/unit/test_reducer.py` checks a clipping run.
    """
    m = config.model
    layout = layout_for_model(model, m.num_hidden_layers, m.intermediate_size)
    return MaskedGradientReducer.for_model(model, layout, SingleProcess(),
                                           max_grad_norm=config.optimizer.clip_grad_norm)


def train_single(config: RunConfig, tier: int, helper_fraction: float, rotation_interval: int, steps: int,
                 out_dir: Path, on_step: Callable[[dict[str, Any]], None] | None = None, *,
                 seed: int | None = None, on_eval: Callable[[dict[str, Any]], None] | None = None,
                 train_data: Samples | None = None, val_data: Samples | None = None) -> TrainResult:
    """Train one client alone on the whole global batch for `steps` steps; checkpoint at the end.

    Starts from `build_model(config.model, seed)` (the weights `testnet init --seed` writes; seed
    defaults to `config.seed`). Validation runs at the start, every `config.data.eval_every` steps
    and at the end, at the client's tier without helpers. `on_step` receives a dict per step: step,
    loss, lr, grad_norm, tokens, step_time_s, tokens_per_sec (plus tier, ffn_width, helpers);
    `on_eval` a dict with step and val_loss. Datasets default to the config's splits.
    Raises `RunFailedError` if the loss or gradient norm stops being finite.
    """
    seed = config.seed if seed is None else seed
    m = config.model
    width = ffn_width(m.intermediate_size, tier)
    train_data, val_data = _splits(config, train_data, val_data)
    t_start = time.perf_counter()
    model = build_model(m, seed)
    optimizer = build_optimizer(list(model.named_parameters()), config.optimizer)  # AdamW, or SGD if configured
    reducer = _single_process_reducer(model, config)
    eval_neurons = NeuronSet(prefix_width=width)
    val_samples = config.data.val_samples
    eval_batch = max(1, min(8, val_samples))

    def validate(step: int) -> float:
        val = evaluate(model, val_data, eval_neurons, val_samples, eval_batch)
        if on_eval is not None:
            on_eval({"step": step, "val_loss": val, "tier": tier, "ffn_width": width, "num_samples": val_samples})
        return val

    initial_val = validate(0)
    history: list[dict[str, Any]] = []
    data_index, tokens_seen, loss = 0, 0, float("nan")
    for step in range(steps):
        t0 = time.perf_counter()
        batch_size = config.timing.global_batch_size(tokens_seen)
        neurons = build_neuron_set(m, tier, helper_fraction, rotation_interval, seed, step)
        tokens = train_data.batch(data_index, batch_size)  # (B, T+1)
        loss, num_tokens, grad_norm = _train_step(model, optimizer, reducer, config, tokens, neurons, step)
        lr = step_lr(step, config.lr_schedule)
        data_index += batch_size
        tokens_seen += num_tokens
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": num_tokens,
                  "step_time_s": dt, "tokens_per_sec": num_tokens / dt if dt > 0 else float("inf"),
                  "tier": tier, "ffn_width": width, "helpers": neurons.num_helpers}
        history.append(record)
        if on_step is not None:
            on_step(record)
        if config.data.eval_every and (step + 1) % config.data.eval_every == 0 and step + 1 < steps:
            validate(step + 1)
    final_val = validate(steps) if steps else initial_val
    meta = {"step": steps, "data_index": data_index, "epoch": 0, "tokens_seen": tokens_seen, "seed": seed,
            "run_id": config.run_id, "kind": "train_single", "tier": tier, "helper_fraction": helper_fraction,
            "helper_rotation_interval": rotation_interval, "val_loss": final_val}
    checkpoint = save_checkpoint(Path(out_dir) / "checkpoint", model, optimizer, meta)
    return TrainResult(num_parameters=count_parameters(model), tier=tier, ffn_width=width, steps=steps,
                       initial_val_loss=initial_val, final_val_loss=final_val, final_train_loss=loss,
                       wall_time_s=time.perf_counter() - t_start, checkpoint=checkpoint, history=history)

"""One client's compute: forward/backward over its batch, validation, and single-client training.

`forward_backward` and `evaluate` are what the distributed client (`client.py`) calls each step;
`train_single` is the whole-batch, one-process baseline (`testnet train`) that a distributed run
with any number of tier-0 clients must match. It follows the run's conventions exactly:

- steps are numbered from 0; step s trains on sample ids `[s * B, (s + 1) * B)` of the training
  split (B = `config.timing.global_batch_size(tokens_seen)` sequences) at `lr_at(s)`;
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
from typing import Any, Protocol

import torch

from hetero_testnet.model.checkpoint import save_checkpoint
from hetero_testnet.config import RunConfig
from hetero_testnet.errors import RunFailedError
from hetero_testnet.model.matformer import NeuronSet, build_neuron_set, build_update_masks, ffn_width
from hetero_testnet.model.nanogpt import NanoGPT, build_model, count_parameters
from hetero_testnet.model.optim import MaskedAdamW, clip_coefficient, grad_sq_sum, lr_at


class Samples(Protocol):
    """What training needs from a dataset (`data.SampleDataset`): fixed samples by id."""

    num_samples: int

    def batch(self, start: int, count: int) -> torch.Tensor: ...  # (count, T+1) int64


def forward_backward(model: NanoGPT, tokens: torch.Tensor, neurons: NeuronSet | None,
                     micro_batch_size: int) -> tuple[float, int]:
    """Set every `p.grad` to the gradient of the mean loss over all B*T tokens of `tokens` (B, T+1).

    Gradients are zeroed first (full shape, never None, so uncomputed neurons hold exact zeros).
    With `micro_batch_size` m > 0 the batch runs in slices of m sequences; each slice's mean loss is
    weighted by its share of the tokens, so the result equals one whole-batch pass up to rounding.
    Returns (mean loss, number of target tokens).
    """
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    B, T1 = tokens.shape
    num_tokens = B * (T1 - 1)
    step = B if micro_batch_size <= 0 else micro_batch_size
    total = 0.0
    for s in range(0, B, step):
        mb = tokens[s:s + step]
        weight = mb.shape[0] / B  # share of the tokens: every row has T targets
        loss = model.loss(mb, neurons)
        (loss * weight).backward()
        total += float(loss.detach()) * weight
    return total, num_tokens


@torch.no_grad()
def evaluate(model: NanoGPT, dataset: Samples, neurons: NeuronSet | None, num_samples: int,
             batch_size: int) -> float:
    """Mean loss over validation samples `[0, num_samples)`: the same tokens every call.

    Batches go to the model's device. Runs in eval mode under `no_grad` and restores the
    model's previous train/eval mode.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        total, count = 0.0, 0
        for start in range(0, num_samples, max(1, batch_size)):
            n = min(batch_size, num_samples - start)
            tokens = dataset.batch(start, n).to(device)  # (n, T+1)
            total += float(model.loss(tokens, neurons)) * n
            count += n
        return total / max(count, 1)
    finally:
        model.train(was_training)


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
    if train_data is None or val_data is None:
        from hetero_testnet.data.shards import open_split

        if train_data is None:
            train_data = open_split(config.data, "train", m.max_seq_len, m.vocab_size)
        if val_data is None:
            val_data = open_split(config.data, "val", m.max_seq_len, m.vocab_size)
    t_start = time.perf_counter()
    model = build_model(m, seed)
    optimizer = MaskedAdamW(list(model.named_parameters()), config.optimizer)
    names = [name for name, _ in model.named_parameters()]
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
        loss, num_tokens = forward_backward(model, tokens, neurons, config.micro_batch_size)
        grad_norm = math.sqrt(grad_sq_sum(model.parameters()))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RunFailedError(f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; "
                                 f"lower lr_schedule.base_lr or check the data")
        coef = clip_coefficient(grad_norm, config.optimizer.clip_grad_norm)
        if coef < 1.0:
            for p in model.parameters():
                p.grad.mul_(coef)
        lr = lr_at(step, config.lr_schedule)
        optimizer.step(lr, build_update_masks(names, neurons, m.intermediate_size))
        data_index += batch_size
        tokens_seen += num_tokens
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": num_tokens,
                  "step_time_s": dt, "tokens_per_sec": num_tokens / dt if dt > 0 else float("inf"),
                  "tier": tier, "ffn_width": width, "helpers": neurons.num_helpers}
        history.append(record)
        if on_step is not None:
            on_step(record)
        every = config.data.eval_every
        if every and (step + 1) % every == 0 and step + 1 < steps:
            validate(step + 1)
    final_val = validate(steps) if steps else initial_val
    meta = {"step": steps, "data_index": data_index, "epoch": 0, "tokens_seen": tokens_seen, "seed": seed,
            "run_id": config.run_id, "kind": "train_single", "tier": tier, "helper_fraction": helper_fraction,
            "helper_rotation_interval": rotation_interval, "val_loss": final_val}
    checkpoint = save_checkpoint(Path(out_dir) / "checkpoint", model, optimizer, meta)
    return TrainResult(num_parameters=count_parameters(model), tier=tier, ffn_width=width, steps=steps,
                       initial_val_loss=initial_val, final_val_loss=final_val, final_train_loss=loss,
                       wall_time_s=time.perf_counter() - t_start, checkpoint=checkpoint, history=history)

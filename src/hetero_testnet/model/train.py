"""One client's compute: forward/backward over its batch, and validation.

`forward_backward` and `evaluate` are what the distributed client (`run/client.py`) and the
one-process baseline (`run/single.py`, `testnet train`) call each step.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from hetero_testnet.config import RunConfig
from hetero_testnet.model.matformer import NeuronSet, build_neuron_set
from hetero_testnet.model.nanogpt import NanoGPT


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


def evaluate_tiers(model: NanoGPT, dataset: Samples, cfg: RunConfig, tiers: list[int], step: int) -> list[dict]:
    """Validation loss of each tier's submodel (its FFN prefix, no helpers) on the config's first
    `val_samples` samples, as `EvalResult.results` carries them (with the time each took)."""
    results = []
    n = cfg.data.val_samples
    for tier in tiers:
        neurons = build_neuron_set(cfg.model, tier, 0.0, 1, cfg.seed, step)
        t0 = time.perf_counter()
        val = evaluate(model, dataset, neurons, n, batch_size=max(1, min(8, n)))
        results.append({"tier": tier, "ffn_width": neurons.prefix_width, "val_loss": val, "num_samples": n,
                        "eval_time_s": round(time.perf_counter() - t0, 3)})
    return results

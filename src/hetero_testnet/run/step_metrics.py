"""What a step reports: one client's witness metrics, and the mean train loss per tier.

Pure functions of the clients' `Reduced` messages, so the numbers that reach `events.jsonl` (and
from there the TUI, headless lines and reports) can be tested without a run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from hetero_testnet.run import protocol as P
def tokens_per_sec(r: P.Reduced) -> float:
    """The client's own rate: its tokens over its compute (with the emulated hold of its device
    profile) and exchange time (0 when unmeasured)."""
    step_time = r.compute_time_s + r.throttle_s + r.exchange_time_s
    return r.tokens / step_time if step_time > 0 else 0.0


def witness_line(client_id: int, tier: int, r: P.Reduced) -> str:
    """The reference's `received_witness_metadata` log line for one client's step."""
    loss = "nan" if r.loss is None else f"{r.loss:.4f}"
    return (f"received_witness_metadata client_id={client_id} matformer_tier={tier} step={r.step} "
            f"loss={loss} tokens_per_sec={tokens_per_sec(r):.1f}")


def witness_metrics(r: P.Reduced, *, tier: int, epoch: int, lr: float) -> dict[str, Any]:
    """Fields of the `client_step` event (docs/events.md), recorded once the step is applied."""
    return dict(
        epoch=epoch, generation=r.generation, tier=tier, ffn_width=r.ffn_width,
        helper_neurons=r.helper_neurons, loss=r.loss, tokens=r.tokens, trained_batches=r.trained_batches,
        step_time_s=round(r.compute_time_s + r.throttle_s + r.exchange_time_s, 6),
        compute_time_s=round(r.compute_time_s, 6), emulated_s=round(r.throttle_s, 6),
        exchange_time_s=round(r.exchange_time_s, 6), grad_norm=r.grad_norm, lr=lr, nan_inf=r.nan_inf,
        rss_mb=r.rss_mb, tokens_per_sec=round(tokens_per_sec(r), 1), inner_steps=r.inner_steps,
        bytes_sent=r.bytes_sent, bytes_received=r.bytes_received)


def loss_by_tier(reduced: Mapping[int, P.Reduced], tier_of: Mapping[int, int]) -> dict[str, float]:
    """Mean train loss of each tier's clients (keys are tier strings, as JSON needs); a client whose
    loss is missing is left out of its tier's mean."""
    by_tier: dict[int, list[float]] = defaultdict(list)
    for client_id, r in reduced.items():
        if r.loss is not None:
            by_tier[tier_of[client_id]].append(r.loss)
    return {str(t): sum(v) / len(v) for t, v in sorted(by_tier.items())}

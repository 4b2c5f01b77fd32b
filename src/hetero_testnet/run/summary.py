"""`summary.json`: what a run reports about itself when it ends, from its `RunTotals` and members.

Every number says what it is: `tokens_per_sec` is over the whole wall time (start-up and validation
included), `train_tokens_per_sec` over the time spent in committed rounds only; losses are train
losses unless the key says `val`; `final_val_loss` is keyed by tier (`tier<t>`) for a shared model,
and by client and tier (`client<k>_tier<t>`) for `--sync none`, where every client has its own model.
The launcher later adds what only it knows (client exit codes, kills and restarts).
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.config import RunConfig, shares_model
from hetero_testnet.run.capacity import CapacityLedger
from hetero_testnet.run.membership import Member
from hetero_testnet.rundir import RunDir


@dataclass
class RunTotals:
    """The run's running totals: the coordinator keeps them up to date, `build_summary` reports them."""

    step: int = 0
    """The next step to train: committed steps so far, those before a resume included."""
    data_index: int = 0
    """Sample id where the next batch starts; it advances only when a step is committed."""
    tokens_seen: int = 0
    """Tokens of every committed batch, before a resume included (drives the batch-size ramp)."""
    tokens_trained: int = 0
    """Tokens the clients trained on in the committed steps of this session."""
    train_time_s: float = 0.0
    """Wall time of the committed rounds."""
    lost_time_s: float = 0.0
    """Wall time of the discarded rounds."""
    generation: int = -1
    """The current generation (process group); -1 before the first is formed."""
    started: float = field(default_factory=time.time)
    """When the coordinator started (epoch seconds)."""
    counters: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """discarded_steps, clients_lost, clients_dropped, rejoins, rejected, nan_inf_steps, restores,
    replayed_steps, protocol_errors."""
    val_losses: dict[str, float] = field(default_factory=dict)
    """The final validation losses, keyed as the summary's `final_val_loss`."""
    replicas_identical: bool = True
    """False once two members reported different checksums after the same step."""
    saved_steps: set[int] = field(default_factory=set)
    """Steps whose checkpoint a member reported saved."""


def build_summary(totals: RunTotals, members: Iterable[Member], *, cfg: RunConfig, run_dir: RunDir, sync: str,
                  status: str, reason: str, capacity: CapacityLedger | None = None,
                  val_curve: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """summary.json (docs/events.md); `capacity` adds the per-client timings, shares, utilisation
    and FLOPs (`run/capacity.py`), `val_curve` the validation losses against wall time, tokens, FLOPs."""
    wall = time.time() - totals.started
    clients = {}
    finals = []
    for m in sorted(members, key=lambda m: m.client_id):
        clients[str(m.client_id)] = {
            "tier": m.tier, "ffn_width": m.ffn_width, "helper_fraction": m.helper_fraction,
            "steps_trained": m.steps_trained, "final_train_loss": m.last_loss, "nan_inf_count": m.nan_inf,
            "joins": m.joins, "connected_at_end": m.alive, "exit_code": None,
            **bytes_per_client(m),
            "profile": m.profile.to_dict() if m.profile is not None else None,
            **(capacity.member_summary(m.client_id) if capacity is not None else {}),
        }
        if m.last_loss is not None:
            finals.append(m.last_loss)
    counters = totals.counters
    return {
        "run_id": cfg.run_id, "name": run_dir.name, "status": status, "reason": reason,
        "seed": cfg.seed, "data_seed": cfg.data_order_seed,
        "steps_completed": totals.step, "total_steps": cfg.timing.total_steps, "sync": sync,
        "wall_time_s": round(wall, 3), "train_time_s": round(totals.train_time_s, 3),
        "tokens_trained": totals.tokens_trained,
        "tokens_per_sec": round(totals.tokens_trained / wall, 1) if wall > 0 else 0.0,
        "train_tokens_per_sec": (round(totals.tokens_trained / totals.train_time_s, 1)
                                 if totals.train_time_s > 0 else 0.0),
        "mean_final_train_loss": sum(finals) / len(finals) if finals else None,
        "final_val_loss": totals.val_losses,
        "val_num_samples": cfg.data.val_samples,
        "replicas_identical": totals.replicas_identical if shares_model(sync) else None,
        "generations": totals.generation + 1,
        "discarded_steps": counters["discarded_steps"], "clients_lost": counters["clients_lost"],
        "clients_dropped": counters["clients_dropped"], "rejoins": counters["rejoins"],
        "rejected_connections": counters["rejected"], "nan_inf_steps": counters["nan_inf_steps"],
        "restores": counters["restores"], "replayed_steps": counters["replayed_steps"],
        "time_lost_s": round(totals.lost_time_s, 3),
        "coordinator_cpu_s": round(time.process_time(), 3),
        "coordinator_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "checkpoint": str(run_dir.checkpoint) if totals.step in totals.saved_steps else None,
        "shares": capacity.shares.mode if capacity is not None else None,
        "utilisation": capacity.utilisation if capacity is not None else None,
        "flops_trained": capacity.flops_trained if capacity is not None else None,
        "val_curve": val_curve or [],
        "clients": clients,
    }


def bytes_per_client(m: Member) -> dict[str, Any]:
    """A client's bytes on the wire: totals over its committed rounds, and the mean per step it trained
    (a diloco round counts its inner steps, so the means compare across `--sync` modes)."""
    steps = m.steps_trained
    return {"bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received,
            "bytes_sent_per_step": round(m.bytes_sent / steps, 1) if steps else None,
            "bytes_received_per_step": round(m.bytes_received / steps, 1) if steps else None}

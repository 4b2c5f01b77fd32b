"""`summary.json`: what a run reports about itself when it ends, built from the coordinator's records.

Every number says what it is: `tokens_per_sec` is over the whole wall time (start-up and validation
included), `train_tokens_per_sec` over the time spent in committed rounds only; losses are train
losses unless the key says `val`; `final_val_loss` is keyed by tier (`tier<t>`) for a shared model,
and by client and tier (`client<k>_tier<t>`) for `--sync none`, where every client has its own model.
The launcher later adds what only it knows (client exit codes, kills and restarts).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetero_testnet.run.coordinator import Coordinator


def build_summary(c: "Coordinator", status: str, reason: str) -> dict[str, Any]:
    wall = time.time() - c.started
    clients = {}
    finals = []
    for m in sorted(c.members.values(), key=lambda m: m.client_id):
        clients[str(m.client_id)] = {
            "tier": m.tier, "ffn_width": m.ffn_width, "helper_fraction": m.helper_fraction,
            "steps_trained": m.steps_trained, "final_train_loss": m.last_loss, "nan_inf_count": m.nan_inf,
            "joins": m.joins, "connected_at_end": m.alive, "exit_code": None,
        }
        if m.last_loss is not None:
            finals.append(m.last_loss)
    counters = c.counters
    return {
        "run_id": c.cfg.run_id, "name": c.opts.run_dir.name, "status": status, "reason": reason,
        "steps_completed": c.step, "total_steps": c.t.total_steps, "sync": c.opts.sync,
        "wall_time_s": round(wall, 3), "train_time_s": round(c.train_time_s, 3),
        "tokens_trained": c.tokens_trained,
        "tokens_per_sec": round(c.tokens_trained / wall, 1) if wall > 0 else 0.0,
        "train_tokens_per_sec": round(c.tokens_trained / c.train_time_s, 1) if c.train_time_s > 0 else 0.0,
        "mean_final_train_loss": sum(finals) / len(finals) if finals else None,
        "final_val_loss": c.val_losses,
        "val_num_samples": c.cfg.data.val_samples,
        "replicas_identical": c.replicas_identical if c.opts.sync == "allreduce" else None,
        "generations": c.generation + 1,
        "discarded_steps": counters["discarded_steps"], "clients_lost": counters["clients_lost"],
        "clients_dropped": counters["clients_dropped"], "rejoins": counters["rejoins"],
        "rejected_connections": counters["rejected"], "nan_inf_steps": counters["nan_inf_steps"],
        "time_lost_s": round(c.lost_time_s, 3),
        "checkpoint": str(c.opts.run_dir / "checkpoint") if c.step in c.saved else None,
        "clients": clients,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file and a crash never leaves one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)

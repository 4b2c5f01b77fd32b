"""Throughput of `testnet start` vs a single process vs torch DDP, measured side by side in one run.

    .venv/bin/python benchmarks/throughput.py [--config configs/nanogpt-20m-run] [--steps 6]

All three train the same model on the same global batch (the config's, 12 x 512 tokens for the
20M config) with AdamW:
- testnet: `testnet start --num-clients 3 --tiers 0,0,0` (coordinator + 3 clients, masked exchange);
- single: one process, all cores, the whole batch per step (no exchange at all);
- ddp: torch DistributedDataParallel over gloo, 3 processes x (cores // 3, at least 1) threads.

Steady-state tokens/s skips the first step of each (allocations, lazy init). The testnet's
coordination overhead is the step period (commit to commit) minus the slowest client's compute +
exchange + apply time, averaged over steady steps: the wall time the control plane adds. The raw
mean can be slightly negative (a client's apply overlaps the coordinator's messaging); the
machine-readable figure is clipped at 0. The last line is
machine-readable: `ratio_vs_ddp=R ratio_vs_single=S overhead_pct=P first_step_s=F`.
These machines are shared and noisy: compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "GLIBC_TUNABLES": TUNED, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def bench_testnet(config: str, steps: int, clients: int, workdir: Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "hetero_testnet", "start", "--headless", "--config-path", config,
           "--num-clients", str(clients), "--tiers", ",".join(["0"] * clients), "--total-steps", str(steps),
           "--server-port", "0", "--logs-dir", str(workdir), "--name", "bench", "--min-clients", str(clients)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (workdir / "bench" / "events.jsonl").read_text().splitlines()]
    commits = [e for e in events if e["event"] == "step_committed"]
    per_client = {}
    for e in events:
        if e["event"] == "client_step":
            per_client.setdefault(e["step"], []).append(
                e["compute_time_s"] + e["exchange_time_s"] + e.get("apply_time_s", 0.0))
    periods, overheads = [], []
    for prev, cur in zip(commits, commits[1:]):
        period = cur["ts"] - prev["ts"]
        busy = max(per_client[cur["step"]])
        periods.append(period)
        overheads.append((period - busy) / period)  # can be slightly negative: apply overlaps messaging
    tokens = commits[-1]["tokens"]
    launch = next(e for e in events if e["event"] == "launch")["ts"]
    return {"tokens_per_sec": tokens / statistics.median(periods),
            "overhead_pct": 100 * max(0.0, statistics.mean(overheads)),
            "overhead_raw_pct": 100 * statistics.mean(overheads),
            "first_step_s": commits[0]["ts"] - launch, "step_s": statistics.median(periods),
            "wall_s": time.time() - t0}


_SINGLE = r"""
import sys, time, torch
from hetero_testnet.config import load_run_config
from hetero_testnet.data.shards import open_split
from hetero_testnet.model.nanogpt import build_model
cfg = load_run_config(sys.argv[1]); steps = int(sys.argv[2]); m = cfg.model
torch.set_num_threads(int(sys.argv[3]))
model = build_model(m, cfg.seed)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_schedule.base_lr, betas=cfg.optimizer.betas,
                        eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay, foreach=True)
data = open_split(cfg.data, "train", m.max_seq_len, m.vocab_size)
B = cfg.timing.global_batch_size(0); times = []
for step in range(steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    model.loss(data.batch(step * B, B)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad_norm)
    opt.step()
    times.append(time.perf_counter() - t)
print(B * m.max_seq_len / sorted(times[1:])[len(times[1:]) // 2])
"""

_DDP = r"""
import os, sys, time, datetime, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from hetero_testnet.config import load_run_config
from hetero_testnet.data.shards import open_split
from hetero_testnet.model.nanogpt import build_model
cfg = load_run_config(sys.argv[1]); steps = int(sys.argv[2]); m = cfg.model
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(int(sys.argv[3]))
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
model = build_model(m, cfg.seed)


class MeanLoss(torch.nn.Module):
    # DDP syncs the gradients of its module's forward: make that forward the same chunked loss
    # the other two systems use, so the comparison is of the exchange, not of the loss code.

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.loss(tokens)


ddp = DDP(MeanLoss(model))
opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_schedule.base_lr, betas=cfg.optimizer.betas,
                        eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay, foreach=True)
data = open_split(cfg.data, "train", m.max_seq_len, m.vocab_size)
B = cfg.timing.global_batch_size(0); per = B // world; times = []
for step in range(steps):
    dist.barrier(); t = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    ddp(data.batch(step * B + rank * per, per)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad_norm)
    opt.step()
    dist.barrier(); times.append(time.perf_counter() - t)
if rank == 0:
    print(per * world * m.max_seq_len / sorted(times[1:])[len(times[1:]) // 2])
dist.destroy_process_group()
"""


def bench_single(config: str, steps: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", _SINGLE, config, str(steps), str(threads)], check=True,
                         capture_output=True, text=True, cwd=ROOT, env=_env(threads))
    return float(out.stdout.strip().splitlines()[-1])


def bench_ddp(config: str, steps: int, world: int, threads: int) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**_env(threads), "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _DDP, config, str(steps), str(threads)],
                                      stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("DDP baseline failed")
    return float(outs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "nanogpt-20m-run"))
    parser.add_argument("--steps", type=int, default=6, help="steps per system (the first is not timed)")
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.clients)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        tn = bench_testnet(args.config, args.steps, args.clients, work)
        print(f"testnet: {tn['tokens_per_sec']:.0f} tok/s, {tn['step_s']:.2f} s/step, overhead "
              f"{tn['overhead_pct']:.2f}% of step (raw mean {tn['overhead_raw_pct']:+.2f}%), first step "
              f"committed {tn['first_step_s']:.1f} s after launch",
              flush=True)
        single = bench_single(args.config, args.steps, cores)
        print(f"single process ({cores} threads): {single:.0f} tok/s", flush=True)
        ddp = bench_ddp(args.config, args.steps, args.clients, threads)
        print(f"torch DDP gloo ({args.clients} x {threads} threads): {ddp:.0f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio_vs_ddp={tn['tokens_per_sec'] / ddp:.3f} ratio_vs_single={tn['tokens_per_sec'] / single:.3f} "
          f"overhead_pct={tn['overhead_pct']:.2f} first_step_s={tn['first_step_s']:.1f}")


if __name__ == "__main__":
    main()

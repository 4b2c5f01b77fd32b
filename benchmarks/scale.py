"""Many devices (issue 12, part 7): how the control plane, group formation, start-up and memory grow
with the number of clients, and where a 20M client's memory and start-up time go.

    .venv/bin/python benchmarks/scale.py clients [--clients 4,8,16,32] [--steps 10]
    .venv/bin/python benchmarks/scale.py memory [--sequences 4]
    .venv/bin/python benchmarks/scale.py startup [--steps 3]

clients: one `testnet start --headless` run of the tiny config per N (tiers half 0, half 1, one torch
thread per client, every client in the first generation: `--min-clients N`, global batch 2N so each
client trains 2 sequences per step whatever N). Per N, from `events.jsonl` and `summary.json`:
- ready s: launch -> coordinator listening; all ready s: launch -> the last `client_ready`;
- formation s: the first `generation` event -> its group formed (the state leaves Warmup);
- first commit s: launch -> the first `step_committed`;
- client start-up: the median client's seconds per phase (`run/startup.py`: process start and
  imports, connect, data, model, exchange), and its resident memory when ready and at its peak;
- step s: median `step_wall_s` after the first step; control s: the median of step wall minus the
  slowest member's compute + exchange (what the coordinator's decisions and messages add);
  coordinator CPU ms/step: `coordinator_cpu_s` between the first and last commit / steps;
- replicas identical (summary.json) and the run's status.
Then each figure as a ratio to the smallest N. Every process shares this machine's cores: at large
N the clients' compute and start-up are slowed by each other, which says nothing about a real
cluster; the control-plane figures are what grows with N.

memory: where a client of the 20M config (`configs/nanogpt-20m-run`) spends its memory, measured in
fresh processes (one per variant) with the client's own stepper (`--sync allreduce`, one rank):
resident MiB after importing torch, building the model, building the stepper (the reducer's flat
gradient buffer and the AdamW moments) and its peak during a round of `--sequences` sequences, with
the config's micro-batch (0: all of them in one pass) and with one sequence per pass; and what the
weights, gradients and moments need by count. Both variants run with the malloc tuning every run's
processes get (`run/engine.TUNED_MALLOC`: freed memory stays with the process, so its resident size
is its high-water mark), and the step time of each, side by side.

startup: one 3-client run of the 20M config: seconds from `testnet start` to the first commit,
against the first round's compute, and where the difference goes (coordinator ready, each client's
phases, waiting for the slowest client, formation, the first round's compute vs the later ones').

These machines are shared and noisy: compare only figures from one run of this script.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from capacity import derived_config  # noqa: E402

from hetero_testnet.events import read_events  # noqa: E402
from hetero_testnet.run.engine import TUNED_MALLOC  # noqa: E402
from hetero_testnet.run.startup import PHASES  # noqa: E402

TWENTY_M = ROOT / "configs" / "nanogpt-20m-run"


def start(config: Path, logs: Path, name: str, n: int, steps: int, *extra: str) -> Path:
    tiers = ",".join("0" if i < (n + 1) // 2 else "1" for i in range(n))
    cmd = [sys.executable, "-m", "hetero_testnet", "start", "--headless", "--config-path", str(config),
           "--num-clients", str(n), "--tiers", tiers, "--min-clients", str(n), "--total-steps", str(steps),
           "--threads", "1", "--server-port", "0", "--logs-dir", str(logs), "--name", name, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-400:]}", file=sys.stderr)
    return logs / name


def timeline(run_dir: Path) -> dict:
    """The start-up and per-step figures of one run (module docstring)."""
    events = read_events(run_dir / "events.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    t0 = events[0]["ts"]

    def first(kind: str, **match) -> dict | None:
        return next((e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())), None)

    ready = [e for e in events if e["event"] == "client_ready"]
    commits = [e for e in events if e["event"] == "step_committed"]
    generation = first("generation")
    formed = next((e for e in events if e["event"] == "state" and e.get("old") == "Warmup"
                   and generation and e["ts"] >= generation["ts"]), None)
    reduced: dict[int, list[dict]] = {}
    for e in events:
        if e["event"] == "client_reduced":
            reduced.setdefault(e["step"], []).append(e)
    control = [c["step_wall_s"] - max(r["compute_time_s"] + r["exchange_time_s"] for r in reduced[c["step"]])
               for c in commits[1:] if reduced.get(c["step"])]
    compute = {c["step"]: max(r["compute_time_s"] for r in reduced.get(c["step"], [])) for c in commits
               if reduced.get(c["step"])}
    cpu = [c.get("coordinator_cpu_s") for c in commits if c.get("coordinator_cpu_s") is not None]
    peaks = [e["rss_mb"] for e in events if e["event"] == "client_step" and e.get("rss_mb")]
    coordinator = first("run_started")
    return {
        "clients": len({e["client_id"] for e in ready}),
        "status": summary.get("status"), "replicas_identical": summary.get("replicas_identical"),
        "steps": len(commits),
        "ready_s": _rel(coordinator, t0),
        "all_ready_s": round(max(e["ts"] for e in ready) - t0, 2) if ready else None,
        "formation_s": round(formed["ts"] - generation["ts"], 3) if formed and generation else None,
        "first_commit_s": _rel(commits[0] if commits else None, t0),
        "phases_s": {p: _median([e["setup_s"][p] for e in ready if p in e.get("setup_s", {})]) for p in PHASES},
        "client_rss_ready_mb": _median([e["rss_mb"] for e in ready if e.get("rss_mb")]),
        "client_rss_peak_mb": round(max(peaks), 1) if peaks else None,
        "step_s": _median([c["step_wall_s"] for c in commits[1:]]),
        "control_s": _median(control),
        "coordinator_cpu_ms_per_step": round(1000 * (cpu[-1] - cpu[0]) / (len(cpu) - 1), 2) if len(cpu) > 1 else None,
        "coordinator_max_rss_mb": summary.get("coordinator_max_rss_mb"),
        "first_compute_s": compute.get(0), "later_compute_s": _median([v for s, v in compute.items() if s > 0]),
    }


def _rel(event: dict | None, t0: float) -> float | None:
    return round(event["ts"] - t0, 2) if event else None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def clients(args: argparse.Namespace, work: Path) -> dict:
    rows = []
    for n in [int(x) for x in args.clients.split(",")]:
        config = derived_config(str(ROOT / "configs" / "tiny"), 2 * n, 10**6, work / f"cfg-{n}")
        row = {"n": n, **timeline(start(config, work, f"n{n}", n, args.steps))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    keys = ("all_ready_s", "formation_s", "first_commit_s", "step_s", "control_s", "coordinator_cpu_ms_per_step",
            "client_rss_ready_mb", "coordinator_max_rss_mb")
    print(f"\n{'N':>4} " + " ".join(f"{k:>16.16}" for k in keys) + "  identical")
    for r in rows:
        cells = [f"{r[k]:>8}" + (f" ({r[k] / base[k]:4.1f}x)" if r[k] and base[k] else "        ") for k in keys]
        print(f"{r['n']:>4} " + " ".join(f"{c:>16}" for c in cells) + f"  {r['replicas_identical']}")
    return {"rows": rows}


PROBE = r"""
import json, resource, sys, time
import psutil, torch
torch.set_num_threads(1)
def rss(): return round(psutil.Process().memory_info().rss / 2**20, 1)
out = {"import_torch": rss()}
sys.path.insert(0, sys.argv[4])
from thread_group import ThreadGroup
from hetero_testnet.config import load_run_config
from hetero_testnet.data.shards import open_split
from hetero_testnet.exchange.modes import build_stepper
from hetero_testnet.exchange.stepper import build_round_work
from hetero_testnet.model.nanogpt import build_model, count_parameters
cfg = load_run_config(sys.argv[1])
if int(sys.argv[3]) >= 0:
    cfg = cfg.replace(micro_batch_size=int(sys.argv[3]))
m, seqs = cfg.model, int(sys.argv[2])
train = open_split(cfg.data, "train", m.max_seq_len, m.vocab_size, cfg.data_order_seed)
out["imports_and_data"] = rss()
model = build_model(m, cfg.seed)
out["params"] = count_parameters(model)
out["model"] = rss()
group = ThreadGroup(1)
(st,) = group.run(lambda r, ex: build_stepper("allreduce", model, cfg, ex, tier=0, helper_fraction=0.0,
                                                  rotation_interval=16))
out["stepper"] = rss()
times = []
for step in range(3):
    def one(rank, ex):
        st.sync.exchange = ex
        return st.run_round(build_round_work(step, [(step * seqs, seqs)], 1, train.batch, st.neurons))
    t = time.perf_counter(); group.run(one); st.commit(1e-4); times.append(time.perf_counter() - t)
out["after_rounds"] = rss()
out["peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
out["round_s"] = [round(t, 3) for t in times]
out["micro_batch_size"] = cfg.micro_batch_size
print(json.dumps(out))
"""


def memory(args: argparse.Namespace, work: Path) -> dict:
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", TUNED_MALLOC)}
    variants = {}
    for label, micro in (("config", -1), ("one sequence per pass", 1)):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(TWENTY_M), str(args.sequences), str(micro),
                               str(ROOT / "tests" / "unit")], cwd=ROOT, env=env, capture_output=True, text=True,
                              check=True)
        variants[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    params = variants["config"]["params"]
    need = {"weights": params * 4 / 2**20, "gradients (the reducer's flat buffer)": params * 4 / 2**20,
            "AdamW moments": 2 * params * 4 / 2**20}
    print(f"20M config: {params:,} parameters; by count (MiB): "
          + ", ".join(f"{k} {v:.0f}" for k, v in need.items()) + f"; total {sum(need.values()):.0f}")
    print(f"{'MiB resident after':<24}" + "".join(f"{k:>24}" for k in variants))
    for key in ("import_torch", "imports_and_data", "model", "stepper", "peak", "after_rounds"):
        print(f"{key:<24}" + "".join(f"{v[key]:>24}" for v in variants.values()))
    times = {k: statistics.median(v["round_s"][1:]) for k, v in variants.items()}
    base = times["config"]
    print(f"{'round s (median of 2)':<24}" + "".join(f"{t:>17.2f} ({t / base:.2f}x)" for t in times.values()))
    return {"variants": variants, "need_mib": need}


def startup(args: argparse.Namespace, work: Path) -> dict:
    run_dir = start(TWENTY_M, work, "startup", 3, args.steps)
    t = timeline(run_dir)
    overhead = t["first_commit_s"] - t["first_compute_s"] if t["first_commit_s"] and t["first_compute_s"] else None
    print(json.dumps(t, indent=1))
    print(f"first commit {t['first_commit_s']} s after `testnet start`; the first round's compute "
          f"{t['first_compute_s']} s (later rounds {t['later_compute_s']} s): start-up overhead {overhead:.1f} s")
    return {**t, "overhead_s": overhead}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("clients", "memory", "startup"))
    parser.add_argument("--clients", default="4,8,16,32")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=4, help="memory: sequences per round (the 20M config's "
                        "12 over 3 clients)")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args()
    args.steps = args.steps or (10 if args.mode == "clients" else 3)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{args.mode}-"))
    result = {"clients": clients, "memory": memory, "startup": startup}[args.mode](args, work)
    if args.keep:
        print(f"logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"mode": args.mode, **result}, default=str))


if __name__ == "__main__":
    main()

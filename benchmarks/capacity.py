"""Devices of unequal capacity side by side in one run: one fast and two half-speed clients, with
equal or proportional batch shares, at full width or with the slow ones at tier 2, against the fast
client alone. Step time, utilisation, and validation loss at a fixed wall-clock budget, as ratios
to (a).

    .venv/bin/python benchmarks/capacity.py [--config small] [--steps 40] [--global-batch 36]

Variants (every one a real `testnet start --headless` run of the same config, seed and steps):

    (a) speeds 1,0.5,0.5  tiers 0,0,0  --shares equal          the baseline
    (b) speeds 1,0.5,0.5  tiers 0,0,0  --shares proportional   the same model (exact average), faster
    (c) speeds 1,0.5,0.5  tiers 0,2,2  --shares equal          the slow devices train a quarter of the FFN
    (d) speed 1           tier 0       one client              the fast device alone, the whole batch

What is emulated: the half-speed clients hold each round's compute for as long again as they measured
it (`run/throttle.py`, a duty cycle). Every client runs one torch thread (so the fast device has the
same compute in every variant), and all share this machine's cores: three processes on 2 cores
slow each other, which the lone client of (d) does not suffer, and a sleeping client frees a core
for the others. The figures are what ran; on devices that do not share cores (d) would lose its
edge over (a)-(c) in step time. Measured per variant:

- step s: median wall time per committed step after the first (the coordinator's clock);
- utilisation: sum of the clients' compute (with the emulated hold) / (clients x round wall),
  and the fast client's idle share (summary.json);
- val loss @ budget: the full model's validation loss at the last validation at or before the
  budget, the shortest training time of the variants (`val_curve`, wall time counted from the first
  round's start, so start-up is not charged), so every variant is read at the same wall-clock; and
  the final val loss after all steps, with the training time it took.

These machines are shared and noisy: compare only numbers from one run of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    label: str
    flags: tuple[str, ...]


@dataclass
class Result:
    variant: Variant
    step_s: float | None = None
    utilisation: float | None = None
    fast_idle: float | None = None
    curve: list[dict] = field(default_factory=list)
    final_val: float | None = None
    final_wall: float | None = None
    notes: list[str] = field(default_factory=list)


VARIANTS = [
    Variant("(a) 0,0,0 equal", ("--num-clients", "3", "--tiers", "0,0,0", "--client-speeds", "1,0.5,0.5",
                                "--shares", "equal")),
    Variant("(b) 0,0,0 proportional", ("--num-clients", "3", "--tiers", "0,0,0", "--client-speeds", "1,0.5,0.5",
                                       "--shares", "proportional", "--replan-every", "5")),
    Variant("(c) 0,2,2 equal", ("--num-clients", "3", "--tiers", "0,2,2", "--client-speeds", "1,0.5,0.5",
                                "--shares", "equal")),
    Variant("(d) fast client alone", ("--num-clients", "1", "--tiers", "0")),
]


def derived_config(config: str, global_batch: int, eval_every: int, work: Path) -> Path:
    """The config with its global batch and validation interval changed, written under `work`."""
    from hetero_testnet.config import dump_yaml, load_run_config
    from hetero_testnet.experiments.derived import with_global_batch

    cfg = with_global_batch(load_run_config(config), global_batch)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_every=eval_every))
    out = work / "config"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
    return out


def run(v: Variant, *, config: Path, steps: int, seed: int, work: Path, name: str) -> Path:
    cmd = [sys.executable, "-m", "hetero_testnet", "start", "--headless", "--config-path", str(config),
           "--total-steps", str(steps), "--seed", str(seed), "--server-port", "0", "--logs-dir", str(work),
           "--name", name, "--threads", "1", *v.flags]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return work / name


def measure(v: Variant, run_dir: Path) -> Result:
    r = Result(v)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    commits = [e["step_wall_s"] for e in events if e["event"] == "step_committed"]
    r.step_s = statistics.median(commits[1:] or commits) if commits else None
    s = json.loads((run_dir / "summary.json").read_text())
    r.utilisation = s.get("utilisation")
    r.fast_idle = (s["clients"].get("1") or {}).get("idle_share")
    # val_curve's wall_s counts from the coordinator's start; read it from the first round's start instead,
    # so start-up (one process or three) is not charged to training
    started = next(e["ts"] for e in events if e["event"] == "run_started")
    first = next((e for e in events if e["event"] == "step_committed"), None)
    offset = (first["ts"] - first["step_wall_s"] - started) if first else 0.0
    r.curve = [{**p, "wall_s": round(p["wall_s"] - offset, 3)} for p in s.get("val_curve", [])
               if p.get("wall_s") is not None and "tier0" in p["val_loss"]]
    if r.curve:
        r.final_val, r.final_wall = r.curve[-1]["val_loss"]["tier0"], r.curve[-1]["wall_s"]
    return r


def val_at(r: Result, budget_s: float) -> float | None:
    """The full model's validation loss at the last validation at or before `budget_s`."""
    seen = [p for p in r.curve if p["wall_s"] <= budget_s + 1e-9]
    return seen[-1]["val_loss"]["tier0"] if seen else None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(results: list[Result], args: argparse.Namespace) -> str:
    ends = [r.final_wall for r in results if r.final_wall is not None]
    budget = min(ends) if ends else None
    base = results[0]
    lines = [f"config {args.config}, global batch {args.global_batch}, {args.steps} steps, validation every "
             f"{args.eval_every} steps, seed {args.seed}; budget = {_num(budget, '.1f')} s (the shortest run)",
             f"{'variant':<24} {'step s':>7} {'x (a)':>6} {'util':>5} {'fast idle':>9} "
             f"{'val@budget':>10} {'final val':>9} {'wall s':>7}"]
    for r in results:
        at = val_at(r, budget) if budget is not None else None
        lines.append(f"{r.variant.label:<24} {_num(r.step_s, '.3f'):>7} {_ratio(r.step_s, base.step_s):>6} "
                     f"{_num(r.utilisation, '.2f'):>5} {_num(r.fast_idle, '.2f'):>9} {_num(at, '.4f'):>10} "
                     f"{_num(r.final_val, '.4f'):>9} {_num(r.final_wall, '.1f'):>7}"
                     + (f"  {'; '.join(r.notes)}" if r.notes else ""))
    lines.append("step s: median per committed step after the first; util: clients' compute (emulated hold "
                 "included) / (clients x round wall); fast idle: client 1's idle share; val@budget: full-model "
                 "validation loss at the last validation within the budget (training wall time from the first "
                 "round's start); final val: after all steps.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="config name or path (small: tier 2 really is cheaper)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=36, help="sequences per step (large enough to split)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    try:
        config = derived_config(args.config, args.global_batch, args.eval_every, work)
        results = []
        for i, v in enumerate(VARIANTS):
            try:
                results.append(measure(v, run(v, config=config, steps=args.steps, seed=args.seed, work=work,
                                              name=f"v{i}")))
            except subprocess.CalledProcessError as e:
                results.append(Result(v, notes=[f"run failed: {(e.stderr or '').strip().splitlines()[-1:]}"]))
            print(f"done: {v.label}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, args))
    if args.out:
        args.out.write_text(json.dumps([{"variant": r.variant.label, "flags": list(r.variant.flags),
                                         "step_s": r.step_s, "utilisation": r.utilisation,
                                         "fast_idle_share": r.fast_idle, "val_curve": r.curve,
                                         "notes": r.notes} for r in results], indent=2))


if __name__ == "__main__":
    main()

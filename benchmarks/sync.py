"""Sync strategies side by side in one run: allreduce, DeMo (k in {8, 32}, 1-bit on and off), DiLoCo
(H in {4, 16}); MB per client per step, step time with and without a slow link, validation loss.

    .venv/bin/python benchmarks/sync.py [--config nanogpt-20m-run] [--steps 6] [--tiers 0,1,1]
    .venv/bin/python benchmarks/sync.py --config tiny          # a quick check of the plumbing

Every variant is a real `testnet start --headless` run of the same config, tiers and seed, once on a
perfect link and once with `--fault-bandwidth-limit` (default 1e7 B/s = 10 MB/s per client; the
fault charges the bytes each strategy puts on the wire, `exchange/strategies.py`). Reported per variant:

- MB/step: bytes each client sent per step (summary.json `bytes_sent_per_step`, mean over clients;
  a DiLoCo round's bytes are divided by its H steps), and the ratio allreduce / variant;
- step time: median wall time per step of the committed rounds after the first (DiLoCo: round
  time / H), unlimited and on the slow link, and the ratio variant / allreduce;
- val loss: the final validation loss of the full model (tier 0) of the unlimited run.

Run lengths: `--steps` steps per run (default 3), DiLoCo whole rounds covering them (at least one);
the slow-link runs are shorter (`--link-steps`, default 2; DiLoCo one round), since only their step
time is read. The first round of a run is not timed when it has more. Estimated for the 20M config
on 2 shared cores (its allreduce step is ~9 s there, a DeMo step ~20 s with encode and decode on one
thread, ~40 s start-up and cooldown per run): about 20-25 minutes; not measured, it is too heavy for
a shared machine. `--config tiny` took about 7 minutes on 2 cores shared with other jobs.
A few steps cannot show loss parity or its absence: the val loss column is a sanity check (nothing
diverged), not a comparison. These machines are shared and noisy: compare only numbers from one run.
"""

from __future__ import annotations

import argparse
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
    name: str
    flags: tuple[str, ...] = ()
    inner_steps: int = 1


@dataclass
class Result:
    variant: Variant
    mb_per_step: float | None = None
    step_s: float | None = None
    step_s_link: float | None = None
    val_loss: float | None = None
    notes: list[str] = field(default_factory=list)


def variants(demo_chunk: int) -> list[Variant]:
    demo = ("--sync", "demo", "--demo-chunk", str(demo_chunk))
    out = [Variant("allreduce", ("--sync", "allreduce"))]
    for k in (8, 32):
        for one_bit in (True, False):
            out.append(Variant(f"demo k={k}{' 1-bit' if one_bit else ''}",
                               (*demo, "--demo-topk", str(k), "--demo-1bit" if one_bit else "--no-demo-1bit")))
    out += [Variant(f"diloco H={h}", ("--sync", "diloco", "--inner-steps", str(h)), inner_steps=h) for h in (4, 16)]
    return out


def run_variant(v: Variant, *, config: str, tiers: list[int], steps: int, bandwidth: float, work: Path,
                name: str) -> Path:
    """One headless run; returns its run directory. Raises CalledProcessError when the run fails."""
    cmd = [sys.executable, "-m", "hetero_testnet", "start", "--headless", "--config-path", config,
           "--num-clients", str(len(tiers)), "--tiers", ",".join(map(str, tiers)), "--min-clients", str(len(tiers)),
           "--total-steps", str(steps), "--server-port", "0", "--logs-dir", str(work), "--name", name, *v.flags]
    if bandwidth:
        cmd += ["--fault-bandwidth-limit", f"{bandwidth:g}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return work / name


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def step_time(run: Path) -> float | None:
    """Median wall time per step of the committed rounds (a round's time / its steps), the first left
    out when there are more (it carries the lazy start-up work)."""
    commits = [e for e in _events(run) if e["event"] == "step_committed"]
    times = [e["step_wall_s"] / int(e.get("inner_steps") or 1) for e in commits[1:] or commits]
    return statistics.median(times) if times else None


def bytes_per_step(run: Path) -> float | None:
    clients = json.loads((run / "summary.json").read_text())["clients"].values()
    values = [c["bytes_sent_per_step"] for c in clients if c.get("bytes_sent_per_step") is not None]
    return statistics.mean(values) / 1e6 if values else None


def val_loss(run: Path) -> float | None:
    return json.loads((run / "summary.json").read_text())["final_val_loss"].get("tier0")


def run_length(v: Variant, steps: int) -> int:
    """`steps`, or for DiLoCo whole rounds covering them (at least one)."""
    return max(1, -(-steps // v.inner_steps)) * v.inner_steps


def measure(v: Variant, args: argparse.Namespace, work: Path, index: int) -> Result:
    r = Result(v)
    try:
        run = run_variant(v, config=args.config, tiers=args.tiers, steps=run_length(v, args.steps), bandwidth=0.0,
                          work=work, name=f"v{index}")
        r.mb_per_step, r.step_s, r.val_loss = bytes_per_step(run), step_time(run), val_loss(run)
        if args.bandwidth > 0:
            link_steps = v.inner_steps if v.inner_steps > 1 else max(2, args.link_steps)  # DiLoCo: one round
            slow = run_variant(v, config=args.config, tiers=args.tiers, steps=link_steps, bandwidth=args.bandwidth,
                               work=work, name=f"v{index}-link")
            r.step_s_link = step_time(slow)
    except subprocess.CalledProcessError as e:
        r.notes.append(f"run failed: {(e.stderr or '').strip().splitlines()[-1:]}")
    return r


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(results: list[Result], args: argparse.Namespace) -> str:
    base = results[0]
    link = f"{args.bandwidth / 1e6:g} MB/s"
    head = (f"{'variant':<18} {'MB/step':>10} {'vs allreduce':>12} {'step s':>8} {'x allreduce':>11} "
            f"{'step s @' + link:>16} {'x allreduce':>11} {'val loss':>9}")
    lines = [f"config {args.config}, tiers {','.join(map(str, args.tiers))}, {args.steps} steps per run", head]
    for r in results:
        lines.append(f"{r.variant.name:<18} {_num(r.mb_per_step, '.4g'):>10} "
                     f"{_ratio(base.mb_per_step, r.mb_per_step):>12} "
                     f"{_num(r.step_s, '.3f'):>8} {_ratio(r.step_s, base.step_s):>11} "
                     f"{_num(r.step_s_link, '.3f'):>16} {_ratio(r.step_s_link, base.step_s_link):>11} "
                     f"{_num(r.val_loss, '.4f'):>9}" + (f"  {'; '.join(r.notes)}" if r.notes else ""))
    lines.append("MB/step: sent per client per step (DiLoCo: a round's bytes / H); 'vs allreduce' = allreduce's MB / "
                 "this; step-time ratios = this / allreduce. Val loss after a few steps is a sanity check, not parity.")
    return "\n".join(lines)


def smallest_width_chunk(config: str, tiers: list[int]) -> int:
    """The DeMo chunk the tiers allow: min(64, the largest power of two dividing the smallest FFN width)."""
    from hetero_testnet.config import load_run_config  # the package this checkout's venv has installed

    inter = load_run_config(config).model.intermediate_size
    width = min(inter >> t for t in tiers)
    return min(64, width & -width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nanogpt-20m-run", help="config name or path (tiny for a quick check)")
    parser.add_argument("--tiers", default="0,1,1", help="one tier per client")
    parser.add_argument("--steps", type=int, default=3, help="steps per unlimited run (DiLoCo: whole rounds)")
    parser.add_argument("--link-steps", type=int, default=2, help="steps per slow-link run (DiLoCo: one round)")
    parser.add_argument("--bandwidth", type=float, default=1e7, help="slow link, bytes/s per client (0: skip)")
    parser.add_argument("--demo-chunk", type=int, default=None, help="DeMo chunk (default: what the tiers allow)")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (allreduce always runs)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    args.tiers = [int(t) for t in args.tiers.split(",")]
    chunk = args.demo_chunk or smallest_width_chunk(args.config, args.tiers)
    chosen = variants(chunk)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        chosen = [v for v in chosen if v.name == "allreduce" or v.name in keep]
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        results = []
        for i, v in enumerate(chosen):
            results.append(measure(v, args, work, i))
            print(f"done: {v.name}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, args))
    if args.out:
        args.out.write_text(json.dumps([{"variant": r.variant.name, "flags": list(r.variant.flags),
                                         "mb_per_step": r.mb_per_step, "step_s": r.step_s,
                                         "step_s_link": r.step_s_link, "val_loss_tier0": r.val_loss,
                                         "notes": r.notes} for r in results], indent=2))


if __name__ == "__main__":
    main()

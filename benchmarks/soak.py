"""Fault-tolerance soak (issue 11): churn vs calm, hang recovery, and a long run of many kills.

    .venv/bin/python benchmarks/soak.py churn [--steps 150] [--kill-interval 5] [--allowed 2,3] [--hooks]
    .venv/bin/python benchmarks/soak.py hang [--tries 5]
    .venv/bin/python benchmarks/soak.py long [--kills 1000] [--kill-interval 2.5]

churn: a calm run and a churn run of the tiny config (3 clients at 0,1,1), same steps; prints
steps/min of both, the time from each kill of a member to the next commit (p50/p95), the lineage
audit (`run/audit.py`: every step once, identical replicas, samples tiled), replays, and the
final validation loss of both. `--hooks` adds kills inside group formation and the state broadcast
(`run/testhooks.py`). `--allowed 1,2,3` lets the kills take every holder of the state at once (the
run then rewinds to its recovery checkpoint).
hang: SIGSTOPs client 3 of a run whose round deadline is 60 s (the 20M config's), `--tries` times,
and prints the time from the stop to the survivors' next commit (p50/p95); each try resumes the
client and waits until it trained again.
long: one run of 4 clients (0,1,1,1): client 1 is never killed, clients 2-4 die again and again,
by the launcher's kills every `--kill-interval` s and by test hooks (`LONG_HOOKS`: in compute, in
the collectives, in formation, in the state broadcast), so that the failures hit members, not
processes still starting; stopped once `--kills` member failures (hook deaths + launcher kills of a
member) happened, then the audit.
Every run writes to a temporary logs dir (kept with --keep). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hetero_testnet.events import read_events  # noqa: E402
from hetero_testnet.run.audit import audit, lineage  # noqa: E402

TINY = ROOT / "configs" / "tiny"
HOOKS = {"HETERO_TESTNET_DIE_AT": "forming:0.25,broadcast:0.5", "HETERO_TESTNET_DIE_CLIENTS": "2,3"}
LONG_HOOKS = {"HETERO_TESTNET_DIE_AT": "compute:0.3,exchange:0.1,forming:0.3,broadcast:0.5",
              "HETERO_TESTNET_DIE_CLIENTS": "2,3,4"}


def start_cmd(logs: Path, name: str, *extra: str, clients: int = 3) -> list[str]:
    return [sys.executable, "-m", "hetero_testnet", "start", "--headless", "--config-path", str(TINY),
            "--num-clients", str(clients), "--tiers", ",".join(["0"] + ["1"] * (clients - 1)), "--server-port", "0",
            "--threads", "1", "--logs-dir", str(logs), "--name", name, *extra]


def run(logs: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(start_cmd(logs, name, *extra), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=_sigint_default)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"code": proc.returncode, "wall_s": wall, **analyse(logs / name)}


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def member_failures(events: list[dict]) -> dict:
    """Failures that hit a member (hook deaths, launcher kills followed by the victim's loss)."""
    lost = [(e["ts"], e["client_id"]) for e in events if e["event"] == "client_lost"]
    kills = [k for k in events if k["event"] == "fault_kill"]
    member = sum(1 for k in kills if any(c == k["client_id"] and 0 <= ts - k["ts"] < 2.0 for ts, c in lost))
    hooks = sum(1 for e in events if e["event"] == "client_exited" and e.get("exit_code") == 76)
    return {"kills": len(kills), "member_kills": member, "hook_deaths": hooks, "member_failures": member + hooks,
            "commits": sum(1 for e in events if e["event"] == "step_committed")}


def analyse(run_dir: Path) -> dict:
    """Figures of one finished run, from its events and summary."""
    events = read_events(run_dir / "events.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    commits = [e for e in events if e["event"] == "step_committed"]
    first = commits[0]["ts"] if commits else 0.0
    span_min = (commits[-1]["ts"] - first) / 60 if len(commits) > 1 else 0.0
    lost = [(e["ts"], e["client_id"]) for e in events if e["event"] == "client_lost"]
    member_kills, to_commit = 0, []
    for k in (e for e in events if e["event"] == "fault_kill"):
        if not any(c == k["client_id"] and 0 <= ts - k["ts"] < 2.0 for ts, c in lost):
            continue  # the victim was still starting (never a member): nothing to recover from
        member_kills += 1  # time to the first commit of a group without the victim
        nxt = next((c["ts"] for c in commits if c["ts"] > k["ts"] and k["client_id"] not in c["members"]), None)
        if nxt is not None:
            to_commit.append(nxt - k["ts"])
    hook = sum(1 for e in events if e["event"] == "client_exited" and e.get("exit_code") == 76)
    hook_to_commit = [next((c["ts"] for c in commits if c["ts"] > e["ts"] and e["client_id"] not in c["members"]),
                           e["ts"]) - e["ts"] for e in events
                      if e["event"] == "client_exited" and e.get("exit_code") == 76]
    lin = lineage(events)
    steps = summary.get("steps_completed") or 0
    problems = audit(events, steps)
    if summary.get("status") != "finished":  # stopped mid-flight: the last step's checksums may not have come
        problems = [p for p in problems if p != f"step {steps - 1}: 0 distinct checksums"]
    return {"status": summary.get("status"), "steps": steps, "audit": problems,
            "steps_per_min": round(len(lin.commits) / span_min, 1) if span_min else None,
            "kills": (summary.get("faults") or {}).get("kills", 0), "member_kills": member_kills,
            "hook_deaths": hook, "hook_death_to_commit_p50_s": pct(hook_to_commit, 0.5),
            "hook_death_to_commit_p95_s": pct(hook_to_commit, 0.95), "kill_to_commit_p50_s": pct(to_commit, 0.5),
            "kill_to_commit_p95_s": pct(to_commit, 0.95), "restores": summary.get("restores"),
            "replayed_steps": summary.get("replayed_steps"), "discarded": summary.get("discarded_steps"),
            "val_loss": summary.get("final_val_loss"), "replicas_identical": summary.get("replicas_identical")}


def churn(args: argparse.Namespace, logs: Path) -> dict:
    steps = ["--total-steps", str(args.steps)]
    calm = run(logs, "calm", *steps)
    stress = run(logs, "churn", *steps, "--random-kill-num", "1", "--random-kill-interval", str(args.kill_interval),
                 "--allowed-to-kill", args.allowed, "--kill-restart-delay", "1", env=HOOKS if args.hooks else None)
    diff = {t: round(abs(stress["val_loss"][t] - v) / v * 100, 3) for t, v in (calm["val_loss"] or {}).items()}
    return {"calm": calm, "churn": stress, "val_loss_diff_pct": diff}


def _wait(run_dir: Path, predicate, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "events.jsonl"
        for e in read_events(path) if path.exists() else []:
            if predicate(e):
                return e
        time.sleep(0.1)
    return None


def hang(args: argparse.Namespace, logs: Path) -> dict:
    cfg = logs / "slow-deadline.yaml"
    cfg.write_text((TINY / "config.yaml").read_text().replace("max_round_train_time: 8", "max_round_train_time: 60")
                   .replace("../../data/sample", str(ROOT / "data" / "sample")))
    cmd = start_cmd(logs, "hang", "--total-steps", "100000", "--exit-after-secs", "1800")
    cmd[cmd.index(str(TINY))] = str(cfg)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    run_dir, recoveries = logs / "hang", []
    try:
        for attempt in range(args.tries):
            _wait(run_dir, lambda e: e["event"] == "step_committed" and e["members"] == [1, 2, 3], 300)
            pid = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "client_joined"
                   and e["client_id"] == 3][-1]["pid"]
            stopped = time.time()
            os.kill(pid, signal.SIGSTOP)
            after = _wait(run_dir, lambda e: e["event"] == "step_committed" and e["members"] == [1, 2]
                          and e["ts"] > stopped, 120)
            os.kill(pid, signal.SIGCONT)
            recoveries.append(after["ts"] - stopped if after else float("inf"))
            print(f"try {attempt + 1}: survivors committed {recoveries[-1]:.2f} s after the stop", flush=True)
            _wait(run_dir, lambda e: e["event"] == "step_committed" and e["members"] == [1, 2, 3]
                  and e["ts"] > stopped + recoveries[-1], 300)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    return {"stop_to_commit_s": [round(r, 3) for r in recoveries], "p50_s": pct(recoveries, 0.5),
            "p95_s": pct(recoveries, 0.95), **analyse(run_dir)}


def long(args: argparse.Namespace, logs: Path) -> dict:
    cmd = start_cmd(logs, "long", "--total-steps", "1000000", "--random-kill-num", "1", "--random-kill-interval",
                    str(args.kill_interval), "--allowed-to-kill", "2,3,4", "--kill-restart-delay", "0.5", clients=4)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **LONG_HOOKS}, preexec_fn=_sigint_default)
    run_dir = logs / "long"
    try:
        while proc.poll() is None:
            time.sleep(10)
            if not (run_dir / "summary.json").exists() and (run_dir / "events.jsonl").exists():
                now = member_failures(read_events(run_dir / "events.jsonl"))
                print(f"member failures {now['member_failures']} ({now['hook_deaths']} hook deaths, "
                      f"{now['member_kills']} of {now['kills']} kills), {now['commits']} commits", flush=True)
                if now["member_failures"] >= args.kills:
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=180)
    return analyse(run_dir)


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C and SIGTERM stop the soak (and its run) cleanly, also when started as a background job,
    # where SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("churn", "hang", "long"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--kill-interval", type=float, default=None)
    parser.add_argument("--allowed", default="2,3")
    parser.add_argument("--hooks", action="store_true")
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args()
    args.kill_interval = args.kill_interval or (5.0 if args.mode == "churn" else 2.5)
    logs = Path(tempfile.mkdtemp(prefix=f"soak-{args.mode}-"))
    try:
        result = {"churn": churn, "hang": hang, "long": long}[args.mode](args, logs)
    finally:
        if args.keep:
            print(f"logs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)
    print(json.dumps({"mode": args.mode, **result}, default=str))


if __name__ == "__main__":
    main()

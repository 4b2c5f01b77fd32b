"""The experiment runner and report: runner logic against a fake `testnet start`, then the real smoke matrix.

The fake launcher (written into tmp_path) accepts `start ...` with the runner's arguments and, per
attempt of each run, behaves as told by FAKE_PLAN: ok (a finished run), fail (summary status failed,
exit 1), crash (no summary, exit 1), bad (exit 2) or hang (until SIGINT: interrupted summary, exit 130).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hetero_testnet.cli.experiment import register
from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.spec import load_experiment
from hetero_testnet.experiments.runner import ExperimentRunner
from hetero_testnet.experiments.export import csv_columns

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiments" / "smoke.yaml"

FAKE_START = textwrap.dedent('''
    import json, os, signal, sys, time
    args = sys.argv[2:]
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--") and args[i] != "--headless"}
    run_dir = os.path.join(opt["--logs-dir"], opt["--name"])
    os.makedirs(run_dir, exist_ok=True)
    counter = os.path.join(opt["--logs-dir"], ".attempts-" + opt["--name"])
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    plan = json.loads(os.environ.get("FAKE_PLAN", "{}")).get(opt["--name"], ["ok"])
    what = plan[min(n, len(plan) - 1)]
    tiers = [int(t) for t in opt["--tiers"].split(",")]
    seed = int(opt["--seed"])
    def ev(f, event, step=None, cid=None, **kw):
        f.write(json.dumps({"ts": time.time(), "run_id": "fake", "role": "coordinator", "client_id": cid,
                            "step": step, "event": event, **kw}) + "\\n"); f.flush()
    def summary(status, steps):
        clients = {str(c): {"tier": t, "connected_at_end": True, "exit_code": 0, "kills": 0, "steps_trained": steps}
                   for c, t in enumerate(tiers, 1)}
        json.dump({"status": status, "reason": status, "steps_completed": steps, "total_steps": 3,
                   "sync": opt["--sync"], "wall_time_s": 1.0, "val_num_samples": 4, "clients": clients},
                  open(os.path.join(run_dir, "summary.json"), "w"))
    if what == "bad":
        print("error: --tiers is bad", file=sys.stderr); sys.exit(2)
    with open(os.path.join(run_dir, "events.jsonl"), "a") as f:
        ev(f, "launch", tiers=tiers, helper_fractions=[0.0] * len(tiers), sync=opt["--sync"], total_steps=3)
        for c, t in enumerate(tiers, 1):
            ev(f, "client_joined", 0, c, tier=t)
        if what == "hang":
            stop = []
            signal.signal(signal.SIGINT, lambda *a: stop.append(1))
            deadline = time.time() + 60
            while not stop and time.time() < deadline:
                time.sleep(0.05)
            summary("interrupted", 0); sys.exit(130)
        for s in range(3):
            for c, t in enumerate(tiers, 1):
                ev(f, "client_step", s, c, tier=t, loss=10.0 - 0.1 * s + 0.1 * t + 0.01 * seed, grad_norm=1.0,
                   nan_inf=False, tokens=10)
            ev(f, "step_committed", s, tokens=10 * len(tiers), step_wall_s=0.1, loss_by_tier={})
        for t in sorted({0, *tiers}):
            ev(f, "eval", 3, 1, tier=t, val_loss=9.5 + 0.1 * t + 0.01 * seed, num_samples=4)
        if what == "crash":
            sys.exit(1)
    summary("failed" if what == "fail" else "finished", 3)
    sys.exit(1 if what == "fail" else 0)
''')


@pytest.fixture
def fake(tmp_path: Path, monkeypatch):
    script = tmp_path / "fake_start.py"
    script.write_text(FAKE_START)
    spec = load_experiment(SMOKE)
    logs = tmp_path / "logs"

    def make(plan: dict | None = None, **kw) -> ExperimentRunner:
        monkeypatch.setenv("FAKE_PLAN", json.dumps(plan or {}))
        return ExperimentRunner(spec, logs, command_prefix=[sys.executable, str(script)], poll_s=0.05, **kw)
    return make


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """testnet (test copy)."""
    register(app)
    return app


# --------------------------------------------------------------------------- runner logic (fake launcher)

def test_failed_run_is_recorded_not_fatal_and_retried_on_resume(fake):
    runner = fake({"0-1-seed1": ["fail", "ok"]})
    outcomes = runner.run()
    assert [o.status for o in outcomes] == ["finished", "finished", "failed", "finished"]
    exp = runner.experiment_dir
    ended = [json.loads(line) for line in (exp / "runs.jsonl").read_text().splitlines()]
    assert [e["status"] for e in ended if e["event"] == "run_ended"] == ["finished", "finished", "failed", "finished"]
    assert (exp / "experiment.json").exists() and (exp / "experiment-config.yaml").exists()

    again = fake({"0-1-seed1": ["fail", "ok"]}).run()
    assert [o.status for o in again] == ["skipped", "skipped", "finished", "skipped"]
    assert (exp / "0-1-seed1.failed-1" / "summary.json").exists()     # the failed attempt is kept
    assert json.loads((exp / "0-1-seed1" / "summary.json").read_text())["status"] == "finished"


def test_crashed_run_without_summary_is_moved_aside(fake):
    runner = fake({"0-0-seed2": ["crash", "crash", "ok"]})
    assert [o.status for o in runner.run()][1] == "failed"
    fake({"0-0-seed2": ["crash", "crash", "ok"]}).run()
    fake({"0-0-seed2": ["crash", "crash", "ok"]}).run()
    exp = runner.experiment_dir
    assert (exp / "0-0-seed2.failed-1").is_dir() and (exp / "0-0-seed2.failed-2").is_dir()
    assert json.loads((exp / "0-0-seed2" / "summary.json").read_text())["status"] == "finished"


def test_bad_input_stops_the_matrix(fake):
    runner = fake({"0-0-seed1": ["bad"]})
    with pytest.raises(ConfigError, match="rejected its input"):
        runner.run()
    assert not (runner.experiment_dir / "0-0-seed2").exists()


def test_finished_run_with_other_spec_is_not_reused(fake, tmp_path: Path):
    runner = fake()
    runner.run()
    changed = tmp_path / "smoke.yaml"
    changed.write_text(SMOKE.read_text().replace("steps: 4", "steps: 5").replace("base_config: ../tiny",
                                                                               f"base_config: {ROOT}/configs/tiny"))
    other = ExperimentRunner(load_experiment(changed), runner.logs_dir)
    with pytest.raises(ConfigError, match="different specification"):
        other.prepare()


def test_timeout_escalates_with_signals(fake):
    runner = fake({"0-0-seed1": ["hang"]}, only=["0-0-seed1"], grace_s=0.0)
    runner.spec = dataclasses.replace(runner.spec, run_timeout_s=0.5)
    [outcome] = runner.run()
    assert outcome.status == "timeout" and outcome.exit_code == 130


def test_ctrl_c_is_forwarded_and_reraised(fake, ctrl_c_raises):
    runner = fake({"0-0-seed1": ["hang"]}, only=["0-0-seed1"])
    exp = runner.experiment_dir

    def interrupt_when_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (exp / "0-0-seed1" / "events.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    ended = [json.loads(line) for line in (exp / "runs.jsonl").read_text().splitlines()]
    assert ended[-1]["event"] == "run_ended" and ended[-1]["status"] == "interrupted"
    assert json.loads((exp / "0-0-seed1" / "summary.json").read_text())["status"] == "interrupted"


def test_cli_dry_run_and_only(tmp_path: Path):
    result = CliRunner().invoke(_app(), ["experiment", "run", str(SMOKE), "--dry-run", "--only", "*-seed1",
                                         "--logs-dir", str(tmp_path / "logs")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "0-0-seed1" in result.output and "0-1-seed1" in result.output and "0-0-seed2" not in result.output
    assert "--exit-after-secs" in result.output and "--total-steps" not in result.output
    assert not (tmp_path / "logs").exists()                      # a dry run writes nothing
    bad = CliRunner().invoke(_app(), ["experiment", "run", str(SMOKE), "--dry-run", "--only", "nope*"])
    assert isinstance(bad.exception, ConfigError)


# --------------------------------------------------------------------------- the real smoke matrix

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smoke_experiment_end_to_end(tmp_path: Path):
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    result = CliRunner().invoke(_app(), ["experiment", "run", str(SMOKE), "--logs-dir", str(logs), "--no-report"],
                                terminal_width=200)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    exp = logs / "smoke"
    runs = ["0-0-seed1", "0-0-seed2", "0-1-seed1", "0-1-seed2"]
    for name in runs:
        summary = json.loads((exp / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps_completed"] == 4
        assert summary["total_steps"] == 4
    cfg = (exp / "0-0-seed1" / "config.yaml").read_text()
    assert "total_steps: 8" in cfg                                # the LR schedule's horizon is untouched

    out = tmp_path / "report"
    result = CliRunner().invoke(_app(), ["experiment", "report", str(exp), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == csv_columns([0, 1])
    by = {r["config"]: r for r in rows}
    assert set(by) == {"0-0", "0-1"}
    for r in rows:
        assert r["n_seeds"] == "2" and r["runs_not_finished"] == "0" and r["steps_completed_mean"] == "4.0"
        assert float(r["val_loss_tier0_mean"]) > 0 and r["val_loss_tier0_ci95"] != ""
        assert float(r["train_loss_tier0_mean"]) > 0 and r["last_k"] == "2"
        assert r["nan_inf_count"] == "0" and r["clients_completed"] == "4" and r["clients_crashed"] == "0"
        assert float(r["train_tokens_per_sec_mean"]) > 0 and float(r["wall_time_s_mean"]) > 0
    assert by["0-1"]["val_loss_tier1_mean"] != "" and by["0-1"]["train_loss_tier1_mean"] != ""
    assert by["0-1"]["val_loss_tier0_diff_significant"] in ("yes", "unadjusted only", "no")
    assert by["0-1"]["val_loss_tier0_paired_n"] == "2"
    assert by["0-1"]["val_loss_tier0_diff_p_welch"] != ""
    md = (out / "results.md").read_text()
    for section in ["## Setup", "## Final losses (mean ± 95% CI over seeds)",
                    "## Exploratory: difference vs baseline `0-0`, validation loss, tier 0 (full model) (Welch)",
                    "## Throughput and health", "## Runs", "## Plots", "## What these numbers can and cannot tell"]:
        assert section in md
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "train_loss.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 4 and {r["status"] for r in data["runs"]} == {"finished"}
    assert time.monotonic() - t0 < 200

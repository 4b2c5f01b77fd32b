"""`q` in the dashboard: the stop reason travels launcher -> coordinator, so the summary, the final
event and the closing lines say the run was stopped from the dashboard (not "stopped by signal
SIGTERM" and "1 warning(s)/error(s)")."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from hetero_testnet.rundir import RunDir, read_json
from hetero_testnet.tui.fold import build_snapshot
from hetero_testnet.tui.live import DASHBOARD_STOP, _Controls
from hetero_testnet.tui.render import View, print_after_close
from hetero_testnet.tui.snapshot import RunSnapshot

ROOT = Path(__file__).resolve().parents[2]


def _ev(event: str, ts: float, **fields):
    return {"ts": ts, "run_id": "tiny", "role": "coordinator", "client_id": None, "step": fields.pop("step", None),
            "event": event, **fields}


def test_q_asks_the_launcher_to_stop_from_the_dashboard():
    asked = []
    launcher = SimpleNamespace(request_stop=asked.append, toggle_pause=lambda: None)
    controls = _Controls(launcher, RunSnapshot(name="r"), View(mode="run", logs_dir="logs/r"))
    controls.handle("q", [])
    controls.handle("q", [])
    assert asked == [DASHBOARD_STOP] and "dashboard" in DASHBOARD_STOP
    assert controls.view.notice == "stopping cleanly (q pressed)…"


def test_the_coordinator_takes_the_launchers_reason(tmp_path):
    from hetero_testnet.run.serving import _request_stop
    from hetero_testnet.rundir import write_json_atomic

    got = []
    c = SimpleNamespace(files=RunDir(tmp_path), inbox=SimpleNamespace(request_stop=got.append))
    _request_stop(c, signal.SIGTERM)  # no reason written: a plain signal
    write_json_atomic(RunDir(tmp_path).stop_request, {"reason": DASHBOARD_STOP})
    _request_stop(c, signal.SIGTERM)
    write_json_atomic(RunDir(tmp_path).stop_request, {"reason": "--exit-after-secs 5 reached"})
    _request_stop(c, signal.SIGTERM)
    assert got == ["stopped by signal SIGTERM", DASHBOARD_STOP, "stopped: --exit-after-secs 5 reached"]


def test_the_launcher_writes_its_reason_before_the_signal(tmp_path):
    from hetero_testnet.run.launcher import Launcher
    from hetero_testnet.run.processes import Child
    from hetero_testnet.run.plan import plan_launch

    plan = plan_launch(num_clients=1, config_path=ROOT / "configs" / "tiny", logs_dir=tmp_path, name="s",
                       device="cpu", cores=1)
    plan.run_dir.mkdir(parents=True)
    launcher = Launcher(plan)
    sent = []
    proc = SimpleNamespace(poll=lambda: None,
                           send_signal=lambda sig: sent.append((sig, read_json(RunDir(plan.run_dir).stop_request))))
    launcher.children["coordinator"] = Child("coordinator", None, proc, tmp_path / "c.log")
    launcher.coordinator_ready = True
    launcher.request_stop(DASHBOARD_STOP)
    assert sent == [(signal.SIGTERM, {"reason": DASHBOARD_STOP})]


def test_a_requested_stop_closes_without_a_warning_count():
    events = [_ev("run_started", 0.0, step=0, name="r", total_steps=8),
              _ev("step_committed", 1.0, step=0, loss_by_tier={"0": 10.8}, tokens=192, step_wall_s=0.2,
                  tokens_per_sec=960.0, members=[1], total_steps=8),
              _ev("run_finished", 2.0, step=1, status="interrupted", reason=DASHBOARD_STOP, steps_completed=1,
                  total_steps=8, stop_requested=True)]
    snap = build_snapshot(events, name="r")
    assert snap.problems == []
    out, err = io.StringIO(), io.StringIO()
    print_after_close(snap, logs_dir="logs/r", out=Console(file=out, width=200), err=Console(file=err, width=200))
    line = out.getvalue().splitlines()[0]
    assert line.startswith(f"run r interrupted: {DASHBOARD_STOP} | 1/8 steps") and "warning" not in line
    assert err.getvalue() == ""
    unasked = build_snapshot(events[:2] + [_ev("run_finished", 2.0, step=1, status="interrupted",
                                                reason="stopped by signal SIGTERM", steps_completed=1)], name="r")
    assert len(unasked.problems) == 1  # a stop nobody asked this dashboard for is still worth a line

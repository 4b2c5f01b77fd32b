"""The dashboard as pure functions: fold recorded/synthetic events, render at 100x30, assert the text.

`tests/assets/events-sample.jsonl` is the events file of a real tiny run (`testnet start --config-path
configs/tiny --num-clients 2 --tiers 0,1 --total-steps 40 --random-kill-num 1 --random-kill-interval 6
--allowed-to-kill 2 --kill-restart-delay 1`): it has joins, kills, restarts, failed generations,
discarded steps, evals, a checkpoint and a finished run.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hetero_testnet.errors import ConfigError
from hetero_testnet.events import read_events
from hetero_testnet.tui.chart import draw_loss_chart, tier_color
from hetero_testnet.tui.fold import apply_event, build_snapshot
from hetero_testnet.tui.live import run_with_dashboard
from hetero_testnet.tui.render import View, print_after_close, render_text
from hetero_testnet.tui.snapshot import ERROR, WARN, RunSnapshot

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "events-sample.jsonl"
BRAILLE = re.compile("[\u2801-\u28ff]")


@pytest.fixture(scope="module")
def sample_events() -> list[dict[str, Any]]:
    return read_events(SAMPLE)


@pytest.fixture(scope="module")
def sample_snap(sample_events) -> RunSnapshot:
    return build_snapshot(sample_events)


def ev(event: str, ts: float, *, step: int | None = None, client_id: int | None = None,
       **fields: Any) -> dict[str, Any]:
    return {"ts": ts, "run_id": "tiny", "role": "coordinator", "client_id": client_id, "step": step,
            "event": event, **fields}


def started(total: int = 4) -> list[dict[str, Any]]:
    """A launch, a coordinator and two joined clients (tiers 0 and 1) in generation 0."""
    return [
        ev("launch", 0.0, name="demo", num_clients=2, tiers=[0, 1], total_steps=total, sync="allreduce"),
        ev("run_started", 1.0, step=0, total_steps=total),
        ev("state", 1.0, step=0, epoch=0, old="Uninitialized", new="WaitingForMembers"),
        ev("client_joined", 2.0, step=0, client_id=1, tier=0, ffn_width=64, helper_fraction=0.0, pid=11),
        ev("client_joined", 2.0, step=0, client_id=2, tier=1, ffn_width=32, helper_fraction=0.25, pid=12),
        ev("generation", 3.0, step=0, generation=0, members=[1, 2], state_source=None),
    ]


def commit(step: int, ts: float, *, wall: float = 1.0, tokens: int = 100, losses=(5.0, 5.5)) -> dict[str, Any]:
    return ev("step_committed", ts, step=step, epoch=0, generation=0, lr=1e-3, tokens=tokens, step_wall_s=wall,
              loss_by_tier={str(t): v for t, v in enumerate(losses)}, tokens_per_sec=tokens / wall,
              members=[1, 2], total_steps=4)


def client_step(cid: int, step: int, ts: float, *, loss: float | None, tier: int) -> dict[str, Any]:
    return ev("client_step", ts, step=step, client_id=cid, tier=tier, ffn_width=64 >> tier, helper_neurons=8 * tier,
              loss=loss, tokens=50, step_time_s=0.5, tokens_per_sec=100.0, rss_mb=321.4, nan_inf=loss is None)


# ---------------------------------------------------------------- the recorded run

def test_sample_folds_into_the_final_state(sample_snap):
    snap = sample_snap
    assert snap.name == "rec1" and snap.status == "finished"
    assert (snap.steps_done, snap.total_steps) == (40, 40)
    assert sorted(snap.clients) == [1, 2]
    assert (snap.clients[1].tier, snap.clients[1].width_pct) == (0, 100.0)
    assert (snap.clients[2].tier, snap.clients[2].width_pct) == (1, 50.0)
    assert snap.clients[2].restarts == 4 and snap.clients[2].kills == 4
    assert snap.discarded_steps == 2
    assert sorted(snap.loss_by_tier) == [0, 1]
    assert [s for s, _ in snap.loss_by_tier[0]] == list(range(40))
    assert any("client 2 lost" in p.text for p in snap.problems)
    assert snap.eta_s() == 0.0 and 0.0 < snap.efficiency(snap.finished_ts) <= 1.0


def test_sample_renders_header_clients_chart_and_events(sample_snap):
    text = render_text(sample_snap, now=sample_snap.finished_ts + 100, view=View(logs_dir="logs/rec1"),
                       width=100, height=30)
    lines = text.splitlines()
    assert len(lines) == 30 and all(len(line) <= 100 for line in lines)
    # header: name, state, step/total, elapsed (frozen at run_finished), ETA, tokens/s, efficiency
    assert "rec1" in lines[0]
    for piece in ("FINISHED", "step 40/40", "ETA 0:00:00", "tok/s", "efficiency", "discarded steps 2"):
        assert piece in text, piece
    assert f"elapsed {_duration(sample_snap.finished_ts - sample_snap.start_ts)}" in text
    # one row per client: id, tier, FFN width %, and its last loss
    for cid, tier, pct in ((1, 0, "100%"), (2, 1, "50%")):
        row = [line for line in lines if re.match(rf"^│\s+{cid}\s+{tier}\s+{pct}\s", line)]
        assert len(row) == 1, (cid, text)
        assert f"{sample_snap.clients[cid].last_loss:.4f}" in row[0]
    # the chart: braille dots, y labels, the step axis and the legend with each tier's latest loss
    assert BRAILLE.search(text)
    assert "step  0" in text and "39" in text
    assert f"tier 0: {sample_snap.latest_loss(0):.4f}" in text
    # the event panel shows the end of the run
    assert "run finished" in text and "checkpoint at step 40" in text
    # the footer: keys and logs
    assert "q quit" in lines[-1] and "p pause/resume" in lines[-1] and "logs/rec1" in lines[-1]


def test_sample_mid_run_shows_faults(sample_events):
    kill = next(i for i, e in enumerate(sample_events) if e["event"] == "fault_kill")
    snap = build_snapshot(sample_events[:kill + 3])
    text = render_text(snap, now=snap.last_ts, view=View(), width=100, height=30)
    assert "fault: SIGKILL client 2" in text and "client 2 lost" in text
    assert snap.status is None and "FINISHED" not in text
    assert re.search(r"│\s+2\s+1\s+50%\s+\S+\s+dead", text)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- header arithmetic

def test_eta_efficiency_and_tokens_per_sec():
    snap = build_snapshot(started(total=4) + [commit(0, 10.0), commit(1, 11.0)])
    assert snap.steps_done == 2
    assert snap.seconds_per_step() == pytest.approx(1.0)  # (11 - (10 - 1)) / 2 steps
    assert snap.eta_s() == pytest.approx(2.0)
    assert snap.tokens_per_sec() == pytest.approx(100.0)
    assert snap.efficiency(20.0) == pytest.approx(2.0 / 20.0)
    assert snap.elapsed_s(20.0) == pytest.approx(20.0)
    text = render_text(snap, now=20.0, view=View(), width=100, height=30)
    for piece in ("step 2/4", "50%", "ETA 0:00:02", "100 tok/s", "efficiency 10%", "elapsed 0:00:20", "gen 0"):
        assert piece in text, piece


def test_nothing_yet_renders_placeholders():
    text = render_text(RunSnapshot(name="empty"), now=0.0, view=View(), width=100, height=30)
    assert "empty" in text and "Launching" in text and "step 0/?" in text
    assert "no client has joined yet" in text and "waiting for the first committed step" in text
    assert "no events yet" in text


# ---------------------------------------------------------------- client states

def test_client_state_follows_the_documented_approximations():
    snap = build_snapshot(started())
    states = lambda: {c: r.state for c, r in snap.clients.items()}  # noqa: E731
    assert states() == {1: "exchanging", 2: "exchanging"}
    apply_event(snap, ev("state", 4.0, step=0, epoch=0, old="Warmup", new="RoundTrain"))
    assert states() == {1: "training", 2: "training"}
    apply_event(snap, ev("client_lost", 5.0, step=0, client_id=2, reason="connection closed"))
    apply_event(snap, ev("step_discarded", 5.1, step=0, reason="client 2 lost", generation=0))
    assert states() == {1: "waiting", 2: "dead"}
    apply_event(snap, {**ev("fault_kill", 5.2, client_id=2, pid=12, signal="SIGKILL"), "role": "launcher"})
    apply_event(snap, {**ev("client_restarted", 6.0, client_id=2, pid=13), "role": "launcher"})
    assert states()[2] == "restarting" and snap.clients[2].restarts == 1
    apply_event(snap, ev("client_joined", 7.0, step=0, client_id=2, tier=1, ffn_width=32, pid=13))
    assert states()[2] == "waiting" and snap.clients[2].joins == 2
    apply_event(snap, ev("generation", 7.5, step=0, generation=1, members=[1, 2], state_source=1))
    apply_event(snap, client_step(1, 0, 8.0, loss=4.5, tier=0))
    assert states() == {1: "training", 2: "exchanging"}
    apply_event(snap, ev("run_finished", 9.0, step=1, status="finished", reason="done", steps_completed=1,
                         total_steps=4))
    assert states() == {1: "done", 2: "done"}
    apply_event(snap, {**ev("client_restarted", 9.5, client_id=2, pid=14), "role": "launcher"})
    assert states()[2] == "done" and snap.clients[2].restarts == 2


def test_client_row_columns():
    snap = build_snapshot(started() + [commit(0, 4.0), client_step(2, 0, 4.1, loss=5.4321, tier=1)])
    row = snap.clients[2]
    assert (row.helper_neurons, row.last_loss, row.step_time_s, row.rss_mb) == (8, 5.4321, 0.5, 321.4)
    text = render_text(snap, now=5.0, view=View(), width=100, height=30)
    assert re.search(r"│\s+2\s+1\s+50%\s+8\s+training\s+5\.4321\s+0\.500\s+100\s+-\s+-\s+321\s+0\s+│", text), text


def test_idle_share_is_the_round_time_not_computing():
    """idle = waiting for the slowest + exchanging, over the rounds seen (compute includes an emulated hold)."""
    steps = [ev("client_step", 4.0 + s, step=s, client_id=1, tier=0, ffn_width=64, loss=5.0, tokens=50,
                compute_time_s=0.5, emulated_s=0.5, wait_s=0.2, exchange_time_s=0.8, step_time_s=1.8) for s in range(2)]
    snap = build_snapshot(started() + steps)
    assert snap.clients[1].idle_pct == pytest.approx(50.0)
    text = render_text(snap, now=7.0, view=View(), width=100, height=30)
    assert re.search(r"│\s+1\s+0\s+100%\s+-\s+training\s+5\.0000\s+1\.800\s+-\s+50%\s", text), text


def test_nan_loss_is_a_warning_and_a_dash():
    snap = build_snapshot(started() + [client_step(1, 0, 4.0, loss=None, tier=0)])
    assert snap.clients[1].last_loss is None
    assert any("non-finite" in p.text and p.level == WARN for p in snap.problems)


def test_many_clients_are_capped_with_a_count():
    events = [ev("client_joined", 1.0, client_id=c, tier=c % 3, ffn_width=64 >> (c % 3)) for c in range(1, 31)]
    text = render_text(build_snapshot(events), now=2.0, view=View(), width=100, height=30)
    assert len(text.splitlines()) == 30
    assert re.search(r"\d+ more", text)


# ---------------------------------------------------------------- event panel and problems

def test_problems_keep_every_warning_and_error():
    snap = build_snapshot(started() + [
        ev("client_rejected", 4.0, peer="('127.0.0.1', 5)", reason="invalid run token"),
        ev("replica_mismatch", 5.0, step=3, checksums={"1": "aaaaaaaaaaaa", "2": "bbbbbbbbbbbb"}),
        ev("generation_failed", 5.5, generation=1, reason="timeout"),
        ev("run_finished", 6.0, step=3, status="failed", reason="replicas diverged", steps_completed=3,
           total_steps=4),
    ])
    levels = [(p.level, p.text.split(":")[0]) for p in snap.problems]
    assert levels == [(WARN, "rejected ('127.0.0.1', 5)"), (ERROR, "replicas differ after step 3"),
                      (WARN, "generation 1 failed"), (ERROR, "run failed")]
    text = render_text(snap, now=7.0, view=View(), width=100, height=30)
    assert "FAILED" in text and "replicas differ after step 3" in text and "✖" in text


def test_interrupted_run_is_a_warning_not_an_error():
    snap = build_snapshot(started() + [ev("run_finished", 6.0, step=1, status="interrupted", reason="SIGTERM")])
    assert [p.level for p in snap.problems] == [WARN]


def test_evals_of_one_step_share_a_line():
    snap = build_snapshot(started() + [
        ev("eval", 5.0, step=4, client_id=1, tier=0, val_loss=6.1234, num_samples=8),
        ev("eval", 5.1, step=4, client_id=2, tier=1, val_loss=6.5678, num_samples=8),
    ])
    lines = [i.text for i in snap.feed if i.text.startswith("val loss")]
    assert lines == ["val loss @4: t0 6.123 t1 6.568"]
    assert snap.val_loss == {0: (4, 6.1234), 1: (4, 6.5678)}


def test_pause_is_shown_in_the_header():
    snap = build_snapshot(started() + [ev("state", 4.0, step=0, epoch=0, new="RoundTrain"),
                                       ev("pause", 4.5, step=0)])
    assert "RoundTrain (pause requested)" in render_text(snap, now=5.0, view=View(), width=100, height=30)
    apply_event(snap, ev("state", 5.0, step=1, epoch=0, old="RoundWitness", new="Paused"))
    assert "state Paused 0:00:01" in render_text(snap, now=6.0, view=View(), width=100, height=30)
    apply_event(snap, ev("resume", 7.0, step=1))
    assert not snap.paused


def test_watch_mode_footer_and_stale_run():
    snap = build_snapshot(started())
    text = render_text(snap, now=100.0, view=View(mode="watch", logs_dir="logs/x/events.jsonl"), width=100,
                       height=30)
    assert "close viewer (the run is not stopped)" in text and "logs/x/events.jsonl" in text
    assert "no events for 0:01:37" in text


def test_unknown_events_and_missing_keys_are_tolerated():
    snap = build_snapshot([{"event": "something_new"}, {"ts": 1.0, "event": "step_committed"},
                           {"ts": 2.0, "event": "client_step", "client_id": 3}, {"ts": "x", "event": "state"}])
    assert snap.events_seen == 4 and 3 in snap.clients
    render_text(snap, now=3.0, view=View(), width=100, height=30)


def test_a_resumed_run_replaces_recommitted_steps():
    snap = build_snapshot(started() + [commit(0, 4.0), commit(1, 5.0, losses=(4.0, 4.5))])
    apply_event(snap, ev("launch", 10.0, name="demo", num_clients=2, tiers=[0, 1], total_steps=4))
    apply_event(snap, commit(1, 12.0, losses=(3.0, 3.5)))
    assert snap.loss_by_tier[0] == [(0, 5.0), (1, 3.0)]
    assert snap.start_ts == 10.0 and snap.clients == {}


# ---------------------------------------------------------------- the chart

def test_chart_fills_its_box_with_one_colour_per_tier():
    series = {0: [(s, 10.0 - s * 0.1) for s in range(40)], 1: [(s, 10.5 - s * 0.1) for s in range(40)]}
    lines = draw_loss_chart(series, width=50, height=12, x_max=99)
    assert len(lines) == 12 and all(line.cell_len <= 50 for line in lines)
    colours = {span.style for line in lines[:-2] for span in line.spans}
    assert {tier_color(0), tier_color(1)} <= colours
    assert lines[0].plain.lstrip().startswith("10.50") and "6.10" in lines[-3].plain
    assert "99" in lines[-2].plain  # the x axis runs to total_steps - 1 so the line grows to the right
    assert "tier 0: 6.1000" in lines[-1].plain and "tier 1: 6.6000" in lines[-1].plain


def test_chart_edge_cases():
    assert "waiting" in draw_loss_chart({}, width=50, height=12)[0].plain
    flat = draw_loss_chart({0: [(0, 3.0)]}, width=30, height=6)
    assert len(flat) == 6 and BRAILLE.search("".join(line.plain for line in flat))
    many = draw_loss_chart({0: [(s, 1.0 / (s + 1)) for s in range(10_000)]}, width=40, height=8)
    assert all(line.cell_len <= 40 for line in many)


# ---------------------------------------------------------------- after the screen closes

def test_print_after_close_repeats_problems_and_status(sample_snap):
    out, err = io.StringIO(), io.StringIO()
    print_after_close(sample_snap, logs_dir="logs/rec1", out=Console(file=out, width=200),
                      err=Console(file=err, width=200))
    assert "warnings and errors (all in logs/rec1/events.jsonl)" in err.getvalue()
    assert "client 2 lost: connection closed" in err.getvalue()
    status = out.getvalue()
    assert "run rec1 finished: completed 40 of 40 steps | 40/40 steps | train loss t0=" in status
    assert "logs in logs/rec1/" in status


# ---------------------------------------------------------------- run_with_dashboard with a fake launcher

class FakeLauncher:
    """Plays a run from events; stops like the real one when asked (q, Ctrl-C)."""

    instances: list[FakeLauncher] = []

    def __init__(self, plan: Any, on_event) -> None:
        self.plan, self.on_event = plan, on_event
        self.stopped = threading.Event()
        self.stop_reasons: list[str] = []
        self.pauses = 0
        self.thread: threading.Thread | None = None
        FakeLauncher.instances.append(self)

    def run(self) -> int:
        self.thread = threading.current_thread()
        if self.plan.early_interrupt:
            self.on_event(started(total=4)[0])
            os.kill(os.getpid(), signal.SIGINT)
            self.early_stop_seen = self.stopped.wait(10.0)  # the real launcher holds it until ready
            for e in started(total=4)[1:]:
                self.on_event(e)
            return 130 if self.stopped.wait(10.0) else 99
        for e in started(total=4):
            self.on_event(e)
        if self.plan.hold:
            return 130 if self.stopped.wait(10.0) else 99
        if self.plan.interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # the dashboard turns it into a clean stop request
            if not self.stopped.wait(10.0):
                return 99
            self.on_event(ev("run_finished", 9.0, status="interrupted", reason="stopped", steps_completed=0))
            return 130
        if self.plan.fail:
            raise ConfigError("port 20000 on 127.0.0.1 is in use")
        for s in range(4):
            self.on_event(commit(s, 4.0 + s))
        self.on_event(ev("run_finished", 9.0, status="finished", reason="completed 4 of 4 steps",
                         steps_completed=4, total_steps=4))
        return 0

    def request_stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)
        self.stopped.set()

    def toggle_pause(self) -> None:
        self.pauses += 1


class _Plan:
    def __init__(self, run_dir: Path, *, interrupt: bool = False, fail: bool = False,
                 early_interrupt: bool = False, hold: bool = False) -> None:
        self.run_dir, self.interrupt, self.fail = run_dir, interrupt, fail
        self.early_interrupt, self.hold = early_interrupt, hold


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=100, height=30), buf


def test_run_with_dashboard_returns_the_code_and_prints_the_status(tmp_path, capsys):
    FakeLauncher.instances.clear()
    console, buf = _console()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a background job or nohup, else Python's
    code = run_with_dashboard(FakeLauncher, _Plan(tmp_path / "demo"), console=console)
    assert code == 0
    launcher = FakeLauncher.instances[-1]
    assert launcher.thread is not threading.main_thread()
    assert "run demo finished: completed 4 of 4 steps | 4/4 steps" in buf.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_ctrl_c_asks_the_launcher_for_a_clean_stop(tmp_path):
    FakeLauncher.instances.clear()
    console, buf = _console()
    code = run_with_dashboard(FakeLauncher, _Plan(tmp_path / "demo", interrupt=True), console=console)
    assert code == 130
    assert FakeLauncher.instances[-1].stop_reasons == ["Ctrl-C"]
    assert "run demo interrupted" in buf.getvalue()


def test_a_stop_before_the_coordinator_started_goes_to_the_launcher_once(tmp_path):
    """The launcher holds a stop asked for before its coordinator is ready (Launcher.request_stop), so
    the dashboard passes it on at once, and only once although the signal stays recorded."""
    FakeLauncher.instances.clear()
    console, _ = _console()
    code = run_with_dashboard(FakeLauncher, _Plan(tmp_path / "demo", early_interrupt=True), console=console)
    launcher = FakeLauncher.instances[-1]
    assert code == 130 and launcher.stop_reasons == ["Ctrl-C"]
    assert launcher.early_stop_seen is True


def test_a_launcher_error_is_raised_after_the_screen_closed(tmp_path):
    console, _ = _console()
    with pytest.raises(ConfigError, match="in use"):
        run_with_dashboard(FakeLauncher, _Plan(tmp_path / "demo", fail=True), console=console)


# ---------------------------------------------------------------- testnet watch

def _watch_app():
    import typer

    from hetero_testnet.cli import watch as cli_watch
    app = typer.Typer()
    cli_watch.register(app)
    app.callback()(lambda: None)
    return app


def test_watch_once_prints_one_frame(tmp_path):
    from typer.testing import CliRunner

    run_dir = tmp_path / "rec1"
    run_dir.mkdir()
    shutil.copy(SAMPLE, run_dir / "events.jsonl")
    result = CliRunner().invoke(_watch_app(), ["watch", str(run_dir), "--once", "--width", "100", "--height", "30"])
    assert result.exit_code == 0, result.output
    assert "FINISHED" in result.output and "step 40/40" in result.output
    assert len(result.output.splitlines()) == 30
    # not a terminal: a frame too, without --once
    again = CliRunner().invoke(_watch_app(), ["watch", str(run_dir), "--width", "100", "--height", "30"])
    assert again.exit_code == 0 and "step 40/40" in again.output


def test_watch_without_events_is_a_config_error(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_watch_app(), ["watch", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    assert "has no events.jsonl" in str(result.exception)
    result = CliRunner().invoke(_watch_app(), ["watch", str(tmp_path / "missing")])
    assert "does not exist" in str(result.exception)


def test_a_notice_comes_first_in_the_footer():
    view = View(logs_dir="/a/very/long/path/" * 8, notice="stopping cleanly (q pressed)…")
    last = render_text(build_snapshot(started()), now=5.0, view=view, width=100, height=30).splitlines()[-1]
    assert last.startswith("stopping cleanly (q pressed)…") and "q quit" in last and last.rstrip().endswith("…")


def test_a_failing_screen_still_stops_the_run_cleanly(tmp_path, monkeypatch):
    import hetero_testnet.tui.live as tui

    FakeLauncher.instances.clear()
    calls = {"n": 0}
    real = tui.render_dashboard

    def flaky(*args: Any, **kwargs: Any):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(5, "Input/output error")  # e.g. the terminal went away
        return real(*args, **kwargs)

    monkeypatch.setattr(tui, "render_dashboard", flaky)
    console, _ = _console()
    with pytest.raises(OSError):
        run_with_dashboard(FakeLauncher, _Plan(tmp_path / "demo", hold=True), console=console)
    launcher = FakeLauncher.instances[-1]
    assert launcher.stop_reasons == ["the dashboard failed"] and not launcher.thread.is_alive()


def test_a_share_split_is_a_feed_line():
    snap = build_snapshot(started() + [ev("shares", 4.0, step=10, mode="proportional",
                                          counts={"1": 9, "2": 5, "3": 4}, rates={"1": 6.0})])
    assert any(item.text == "shares (proportional) at step 10: 1:9 2:5 3:4 sequences" for item in snap.feed)

"""The dashboard in a terminal: the Live loop, keys and signals, for a run this process owns or follows.

`run_with_dashboard` runs the `Launcher` in a worker thread (the launcher spawns its children with
PR_SET_PDEATHSIG from that thread, so it lives for the whole run) and renders in the main thread. Keys are
read from stdin in cbreak mode (termios + select); the terminal is restored on every exit path. `q`,
Ctrl-C, SIGTERM and SIGHUP all ask the launcher for the same clean shutdown (the launcher holds a stop
asked for before the coordinator is ready, and sends it once it is); the dashboard keeps rendering until
the worker thread ends, then prints the warnings/errors it showed and a final status line, so they do
not vanish with the alternate screen. `watch_run` follows a run's events file read-only.

What is drawn is render.py's pure functions of the `RunSnapshot` that fold.py builds from the events.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.layout import Layout
from rich.live import Live

from hetero_testnet.events import EventTail, RunState, read_events
from hetero_testnet.rundir import RunDir
from hetero_testnet.tui.fold import apply_event, build_snapshot
from hetero_testnet.tui.render import View, print_after_close, render_dashboard, render_text
from hetero_testnet.tui.snapshot import RunSnapshot

REFRESH_PER_SECOND = 8      # Live's own refresh rate (fixed, so the screen never flickers)
LOOP_TICK_S = 0.1           # main loop: drain events, read keys, hand Live a new frame
NOTICE_S = 4.0              # how long a key's acknowledgement stays in the footer
DASHBOARD_STOP = "stopped from the dashboard (q pressed)"
"""The stop reason of `q`: the summary, the final event and the closing status line all say it."""


# ---------------------------------------------------------------- terminal plumbing

class _Keys:
    """Single keypresses from stdin in cbreak mode (no echo, no line buffering; Ctrl-C still signals)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.saved: Any = None

    def __enter__(self) -> _Keys:
        try:
            import termios
            import tty

            if sys.stdin.isatty():
                self.fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd, termios.TCSANOW)  # not TCSAFLUSH: keep a q typed during start-up
        except (ImportError, OSError, ValueError):
            self.fd = None
        return self

    def read(self, timeout_s: float) -> str:
        """Keys typed within `timeout_s` ('' if none); without a TTY it just waits."""
        if self.fd is None:
            time.sleep(timeout_s)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return ""
        try:
            return os.read(self.fd, 64).decode("utf-8", "replace")
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except (termios.error, OSError):  # the terminal is gone (hang-up): nothing to restore
                pass


@contextlib.contextmanager
def _signals_as_flags(flags: list[str]) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP append their name to `flags` instead of killing the loop mid-render."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda s, _f: flags.append(signal.Signals(s).name))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def terminal_console(*, stderr: bool = False) -> Console:
    """A Console that follows the real terminal size, even when COLUMNS/LINES are exported.

    Rich lets COLUMNS/LINES override the terminal size and reads them once, at construction; GNU readline
    exports them in any process that loaded it (a Python REPL, pytest), so a child dashboard would be
    drawn at a stale 80x24 and never follow a resize. Without them Rich asks the terminal on every frame.
    """
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return Console(stderr=stderr, _environ=environ)


def _live(console: Console) -> Live:
    return Live(console=console, screen=True, auto_refresh=True, refresh_per_second=REFRESH_PER_SECOND,
                redirect_stdout=False, redirect_stderr=False, transient=False)


def _frame(snap: RunSnapshot, view: View, console: Console) -> Layout:
    """The screen for the console's current height (it follows a resize)."""
    return render_dashboard(snap, now=time.time(), view=view, height=max(12, console.size.height))


# ---------------------------------------------------------------- run with the dashboard

class LauncherLike(Protocol):
    def run(self) -> int: ...
    def request_stop(self, reason: str) -> None: ...
    def toggle_pause(self) -> None: ...


def run_with_dashboard(launcher_cls: Callable[..., LauncherLike], plan: Any, *,
                       console: Console | None = None) -> int:
    """Run `launcher_cls(plan, on_event=...)` under the dashboard; returns the launcher's exit code.

    Use only on a TTY (or with --tui): `cli.run.start` falls back to headless lines otherwise.
    A launcher exception (bad port, coordinator failed to start) is re-raised after the screen closed.
    Until the worker thread ends the dashboard keeps rendering; if the screen itself fails (the terminal
    went away), the run is still stopped cleanly and waited for before the error propagates.
    """
    console = console or terminal_console()
    inbox: queue.Queue[dict[str, Any]] = queue.Queue()
    launcher = launcher_cls(plan, on_event=inbox.put)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["code"] = launcher.run()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, re-raised there
            outcome["error"] = e

    worker = threading.Thread(target=work, name="launcher", daemon=False)
    run_dir = Path(plan.run_dir)
    snap = RunSnapshot(name=run_dir.name)
    controls = _Controls(launcher, snap, View(mode="run", logs_dir=str(run_dir)))
    signals: list[str] = []
    try:
        with _signals_as_flags(signals), _Keys() as keys, _live(console) as live:
            worker.start()
            while worker.is_alive():
                _drain(inbox, snap)
                controls.handle(keys.read(LOOP_TICK_S).lower(), signals)
                live.update(_frame(snap, controls.view, console))
            worker.join()
            _drain(inbox, snap)
            live.update(_frame(snap, controls.view, console), refresh=True)
    finally:
        if worker.is_alive():  # the screen failed (e.g. the terminal went away): never orphan the run
            controls.stop("the dashboard failed")
            while worker.is_alive():
                _drain(inbox, snap)
                worker.join(LOOP_TICK_S)
    print_after_close(snap, logs_dir=str(run_dir), out=console, err=terminal_console(stderr=True))
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome.get("code", 1))


class _Controls:
    """What keys and signals do to a run this dashboard owns: q, Ctrl-C, SIGTERM, SIGHUP stop it
    cleanly (asked of the launcher once, whatever comes after); p pauses or resumes it."""

    def __init__(self, launcher: LauncherLike, snap: RunSnapshot, view: View) -> None:
        self.launcher, self.snap, self.view = launcher, snap, view
        self.stop_reason: str | None = None
        self.notice_until = 0.0

    def handle(self, typed: str, signals: list[str]) -> None:
        """One loop tick: the keys typed since the last one, and the signals received so far."""
        if "q" in typed:
            self.stop(DASHBOARD_STOP)
        if signals:
            self.stop("Ctrl-C" if signals[0] == "SIGINT" else f"{signals[0]} received")
        if "p" in typed and self.stop_reason is None:
            self._toggle_pause()
        if self.stop_reason is not None:
            shown = "q pressed" if self.stop_reason == DASHBOARD_STOP else self.stop_reason
            self.view.notice = f"stopping cleanly ({shown})…"
        elif self.view.notice and time.monotonic() > self.notice_until:
            self.view.notice = None

    def stop(self, reason: str) -> None:
        """Ask for a clean stop, once; the launcher holds it until the coordinator can take it."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.launcher.request_stop(reason)

    def _toggle_pause(self) -> None:
        if self.snap.state != RunState.LAUNCHING and self.snap.status is None:
            self.launcher.toggle_pause()
            self.view.notice = "resume requested" if self.snap.paused else "pausing at the next step boundary"
        else:
            self.view.notice = "not started yet: p ignored"
        self.notice_until = time.monotonic() + NOTICE_S


def _drain(inbox: queue.Queue[dict[str, Any]], snap: RunSnapshot) -> None:
    while True:
        try:
            apply_event(snap, inbox.get_nowait())
        except queue.Empty:
            return


# ---------------------------------------------------------------- watch a run from its events file

def watch_run(run_dir: Path, *, console: Console | None = None) -> int:
    """Follow `run_dir/events.jsonl` read-only until q (or Ctrl-C); returns 0. The run is never touched."""
    console = console or terminal_console()
    tail = EventTail(RunDir(run_dir).events)
    snap = RunSnapshot(name=run_dir.name)
    view = View(mode="watch", logs_dir=str(RunDir(run_dir).events))
    signals: list[str] = []
    with _signals_as_flags(signals), _Keys() as keys, _live(console) as live:
        while True:
            for event in tail.poll():
                apply_event(snap, event)
            view.notice = "run ended: press q to close" if snap.status is not None else None
            live.update(_frame(snap, view, console))
            if "q" in keys.read(LOOP_TICK_S).lower() or signals:
                break
    print_after_close(snap, logs_dir=str(run_dir), out=console, err=terminal_console(stderr=True))
    return 0


def render_once(run_dir: Path, *, width: int, height: int, now: float | None = None) -> str:
    """The current frame of a run directory as plain text (`testnet watch --once`)."""
    snap = build_snapshot(read_events(RunDir(run_dir).events), name=run_dir.name)
    return render_text(snap, now=time.time() if now is None else now,
                       view=View(mode="watch", logs_dir=str(RunDir(run_dir).events)), width=width, height=height)

"""The live dashboard of a testnet run: pure render functions over a `RunSnapshot`, and the Live loop.

Data is kept apart from the view (STYLE.md, FastAPI CLI): `tui_snapshot.RunSnapshot` is folded from the
event stream, `render_dashboard(snapshot, now=..., view=...)` turns it into a Rich `Layout` without
side effects, and only `run_with_dashboard` / `watch_run` own a terminal. Tests render recorded events at
a fixed size; the live loops re-render several times a second from the same functions.

`run_with_dashboard` runs the `Launcher` in a worker thread (the launcher spawns its children with
PR_SET_PDEATHSIG from that thread, so it lives for the whole run) and renders in the main thread. Keys are
read from stdin in cbreak mode (termios + select); the terminal is restored on every exit path. `q`,
Ctrl-C, SIGTERM and SIGHUP all ask the launcher for the same clean shutdown; the dashboard keeps rendering
until the worker thread ends, then prints the warnings/errors it showed and a final status line, so they
do not vanish with the alternate screen.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hetero_testnet.events import EventTail
from hetero_testnet.rundir import RunDir
from hetero_testnet.tui.snapshot import ERROR, INFO, JOIN, WARN, FeedItem, RunSnapshot, apply_event

REFRESH_PER_SECOND = 8      # Live's own refresh rate (fixed, so the screen never flickers)
LOOP_TICK_S = 0.1           # main loop: drain events, read keys, hand Live a new frame
NOTICE_S = 4.0              # how long a key's acknowledgement stays in the footer
STALE_AFTER_S = 15.0        # `watch`: flag a run whose events stopped coming
TIER_COLORS = ("cyan", "magenta", "yellow", "green", "blue", "red", "bright_white")
STATE_STYLES = {"training": "green", "waiting": "yellow", "exchanging": "cyan", "dead": "bold red",
                "restarting": "magenta", "done": "dim"}
LEVEL_MARKS = {INFO: ("·", "dim"), JOIN: ("+", "green"), WARN: ("!", "yellow"), ERROR: ("✖", "bold red")}
STATUS_STYLES = {"finished": "bold green", "failed": "bold red", "interrupted": "bold yellow"}


@dataclass
class View:
    """What the view adds to the data: which mode, where the logs are, a transient notice."""

    mode: str = "run"
    """`run` (this process owns the run: q stops it) or `watch` (read-only viewer)."""
    logs_dir: str = ""
    notice: str | None = None


# ---------------------------------------------------------------- formatting helpers

def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt_offset(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    return f"+{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"+{m}:{s:02d}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def tier_color(tier: int) -> str:
    return TIER_COLORS[tier % len(TIER_COLORS)]


# ---------------------------------------------------------------- header, table, feed, footer

def render_header(snap: RunSnapshot, *, now: float, view: View) -> Panel:
    """Run name, state and time in it, epoch, step/total with a bar, elapsed, ETA, tokens/s, efficiency."""
    if snap.status is not None:
        state = Text(snap.status.upper(), style=STATUS_STYLES.get(snap.status, "bold"))
    else:
        label = snap.state + (" (pause requested)" if snap.paused and snap.state != "Paused" else "")
        state = Text(label, style="bold yellow" if snap.paused else "bold")
    total = snap.total_steps
    frac = min(1.0, snap.steps_done / total) if total else 0.0
    bar_w = 16
    filled = int(round(frac * bar_w))
    sep = (" │ ", "dim")
    line1 = Text.assemble(
        "state ", state, f" {fmt_duration(snap.state_age_s(now))}", sep, f"epoch {snap.epoch}", sep,
        "step ", (f"{snap.steps_done}/{total if total is not None else '?'}", "bold"), " ",
        ("━" * filled, "green"), ("━" * (bar_w - filled), "grey35"), f" {frac:.0%}", sep,
        f"gen {snap.generation if snap.generation is not None else '-'}", sep,
        f"clients {snap.alive_clients()}/{len(snap.clients)} up")
    tps = snap.tokens_per_sec()
    eff = snap.efficiency(now)
    line2 = Text.assemble(
        f"elapsed {fmt_duration(snap.elapsed_s(now))}", sep, f"ETA {fmt_duration(snap.eta_s())}", sep,
        (f"{_fmt(tps, ',.0f')} tok/s", "bold"), sep, f"efficiency {_fmt(eff, '.0%')}", sep,
        f"discarded steps {snap.discarded_steps}")
    if view.mode == "watch" and snap.status is None and snap.last_ts is not None \
            and now - snap.last_ts > STALE_AFTER_S:
        line2.append(f" │ no events for {fmt_duration(now - snap.last_ts)}", style="yellow")
    for line in (line1, line2):
        line.no_wrap, line.overflow = True, "ellipsis"
    title = Text.assemble(("hetero-testnet", "bold"), " · ", (snap.name or snap.run_id or "run", "bold cyan"))
    return Panel(Group(line1, line2), title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def render_clients(snap: RunSnapshot, *, max_rows: int | None = None) -> RenderableType:
    """One row per client: id, tier, FFN width %, helpers, state, loss, step time, tokens/s, RSS, restarts."""
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, padding=(0, 1))
    for name, justify in (("client", "right"), ("tier", "right"), ("FFN", "right"), ("helpers", "right"),
                          ("state", "left"), ("loss", "right"), ("step s", "right"), ("tok/s", "right"),
                          ("RSS MB", "right"), ("restarts", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    rows = sorted(snap.clients.values(), key=lambda r: r.client_id)
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max(1, max_rows - 1)]
    for r in shown:
        tier = Text("-" if r.tier is None else str(r.tier), style=tier_color(r.tier) if r.tier is not None else "")
        width = "-" if r.width_pct is None else f"{r.width_pct:.0f}%"
        restarts = str(r.restarts)
        table.add_row(str(r.client_id), tier, width, _fmt(r.helper_neurons, "d"),
                      Text(r.state, style=STATE_STYLES.get(r.state, "")), _fmt(r.last_loss, ".4f"),
                      _fmt(r.step_time_s, ".3f"), _fmt(r.tokens_per_sec, ",.0f"), _fmt(r.rss_mb, ",.0f"), restarts)
    if len(shown) < len(rows):
        table.add_row("…", "", "", "", Text(f"{len(rows) - len(shown)} more", style="dim"), *[""] * 5)
    if not rows:  # a placeholder outside the table, so it does not squeeze the columns
        return Group(table, Text("no client has joined yet", style="dim", justify="center"))
    return table


class EventFeed:
    """The newest feed lines that fit the height Rich gives it, one line each (truncated, never wrapped)."""

    def __init__(self, items: list[FeedItem], start_ts: float | None) -> None:
        self.items = items
        self.start_ts = start_ts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or len(self.items) or 1
        for line in feed_lines(self.items, self.start_ts, height):
            line.truncate(options.max_width, overflow="ellipsis")
            yield line


def feed_lines(items: list[FeedItem], start_ts: float | None, height: int) -> list[Text]:
    """The last `height` feed items as `+m:ss <mark> text` lines."""
    if not items:
        return [Text("no events yet", style="dim")]
    lines = []
    for item in items[-height:]:
        mark, style = LEVEL_MARKS.get(item.level, ("·", ""))
        offset = _fmt_offset(item.ts - start_ts) if start_ts is not None else ""
        line = Text.assemble((offset, "dim"), " ", (mark, style), " ",
                             (item.text, style if item.level in (WARN, ERROR) else ""))
        line.no_wrap = True
        lines.append(line)
    return lines


def render_footer(snap: RunSnapshot, *, view: View) -> Text:
    """Keys and the logs path; a notice (a key's acknowledgement, a pending stop) goes first."""
    notice = Text(view.notice + "  ", style="bold yellow") if view.notice else Text()
    if view.mode == "run":
        keys = Text.assemble(("q", "bold reverse"), " quit (clean stop)  ", ("p", "bold reverse"),
                             " pause/resume  ", ("logs ", "dim"), view.logs_dir)
    else:
        keys = Text.assemble(("q", "bold reverse"), " close viewer (the run is not stopped)  ",
                             ("following ", "dim"), view.logs_dir)
    line = notice + keys
    line.no_wrap, line.overflow = True, "ellipsis"
    return line


# ---------------------------------------------------------------- the loss chart

# Braille cell: 2 dot columns x 4 dot rows; bit for dot (column, row).
_BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def draw_loss_chart(series: dict[int, list[tuple[int, float]]], *, width: int, height: int,
                    x_max: int | None = None) -> list[Text]:
    """A braille line chart of loss over steps, one coloured line per tier, in `width` x `height` cells.

    Rows: the plot (y labels on the left), one row of step labels, one legend row. Several steps that
    fall into one dot column are averaged; consecutive dots are joined so a line never breaks.
    """
    points = [(s, v) for pts in series.values() for s, v in pts]
    if not points or height < 4 or width < 20:
        return [Text("waiting for the first committed step…", style="dim")]
    x0 = min(s for s, _ in points)
    x1 = max([s for s, _ in points] + ([x_max] if x_max is not None else []))
    x1 = max(x1, x0 + 1)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    labels = [f"{hi:.2f}", f"{(lo + hi) / 2:.2f}", f"{lo:.2f}"]
    label_w = max(len(s) for s in labels) + 1
    plot_w, plot_h = width - label_w - 1, height - 2
    px_w, px_h = plot_w * 2, plot_h * 4
    masks = [[0] * plot_w for _ in range(plot_h)]
    colors: list[list[str]] = [[""] * plot_w for _ in range(plot_h)]

    def dot(x: int, y: int, color: str) -> None:
        row, col = y // 4, x // 2
        masks[row][col] |= _BRAILLE_BITS[x % 2][y % 4]
        colors[row][col] = color

    for tier in sorted(series):
        buckets: dict[int, list[float]] = {}
        for s, v in series[tier]:
            px = round((s - x0) / (x1 - x0) * (px_w - 1))
            buckets.setdefault(px, []).append(v)
        line = [(px, round((hi - sum(vs) / len(vs)) / (hi - lo) * (px_h - 1))) for px, vs in sorted(buckets.items())]
        color = tier_color(tier)
        prev = None
        for px, py in line:
            if prev is None:
                dot(px, py, color)
            else:
                n = max(abs(px - prev[0]), abs(py - prev[1]), 1)
                for i in range(1, n + 1):
                    dot(round(prev[0] + (px - prev[0]) * i / n), round(prev[1] + (py - prev[1]) * i / n), color)
            prev = (px, py)

    out: list[Text] = []
    label_rows = {0: labels[0], plot_h // 2: labels[1], plot_h - 1: labels[2]}
    for row in range(plot_h):
        text = Text(label_rows.get(row, "").rjust(label_w - 1) + " ", style="dim")
        text.append("┤" if row in label_rows else "│", style="dim")
        for col in range(plot_w):
            mask = masks[row][col]
            text.append(chr(0x2800 + mask) if mask else " ", style=colors[row][col] or None)
        out.append(text)
    mid = (x0 + x1) // 2
    axis = [" "] * plot_w
    for value, pos in ((x0, 0), (mid, plot_w // 2), (x1, plot_w - 1)):
        label = str(value)
        start = min(max(0, pos - len(label) // 2), plot_w - len(label))
        axis[start:start + len(label)] = label
    out.append(Text("step".rjust(label_w - 1) + "  " + "".join(axis), style="dim"))
    legend = Text(" " * (label_w + 1))
    for tier in sorted(series):
        pts = series[tier]
        legend.append("━━ ", style=tier_color(tier))
        legend.append(f"tier {tier}: {pts[-1][1]:.4f}   " if pts else f"tier {tier}   ")
    legend.no_wrap, legend.overflow = True, "ellipsis"
    out.append(legend)
    return out


class LossChart:
    """Renderable wrapper: draws `draw_loss_chart` at the size Rich gives it (copies the data first)."""

    def __init__(self, series: dict[int, list[tuple[int, float]]], x_max: int | None) -> None:
        self.series = {t: list(p) for t, p in series.items()}
        self.x_max = x_max

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from draw_loss_chart(self.series, width=options.max_width, height=options.height or 12,
                                   x_max=self.x_max)


# ---------------------------------------------------------------- the whole screen

def render_dashboard(snap: RunSnapshot, *, now: float, view: View, height: int = 30) -> Layout:
    """The full screen for `height` rows: header, clients table, loss chart | event panel, footer."""
    header_h, footer_h, min_body = 4, 1, 10
    max_rows = max(1, height - header_h - footer_h - min_body - 5)
    n_rows = max(1, min(len(snap.clients), max_rows))
    layout = Layout(name="root")
    layout.split_column(
        Layout(render_header(snap, now=now, view=view), name="header", size=header_h),
        Layout(Panel(render_clients(snap, max_rows=max_rows), title="clients", title_align="left",
                     box=box.ROUNDED, padding=(0, 1)), name="clients", size=n_rows + 4),
        Layout(name="body", minimum_size=4),
        Layout(render_footer(snap, view=view), name="footer", size=footer_h))
    x_max = snap.total_steps - 1 if snap.total_steps else None
    layout["body"].split_row(
        Layout(Panel(LossChart(snap.loss_by_tier, x_max), title="train loss by tier", title_align="left",
                     box=box.ROUNDED, padding=(0, 1)), name="chart", ratio=5),
        Layout(Panel(EventFeed(list(snap.feed), snap.start_ts), title="events", title_align="left",
                     box=box.ROUNDED, padding=(0, 1)), name="events", ratio=4))
    return layout


def render_text(snap: RunSnapshot, *, now: float, view: View, width: int = 100, height: int = 30) -> str:
    """One frame as plain text (tests, `watch --once`)."""
    console = Console(width=width, height=height, record=True, file=io.StringIO(), color_system=None)
    console.print(render_dashboard(snap, now=now, view=view, height=height))
    return console.export_text()


def print_after_close(snap: RunSnapshot, *, logs_dir: str, out: Console, err: Console,
                      limit: int = 30) -> None:
    """After the alternate screen is gone: the warnings/errors it showed (stderr), then the status line."""
    if snap.problems:
        shown = snap.problems[-limit:]
        more = len(snap.problems) - len(shown)
        err.print(f"warnings and errors (all in {logs_dir}/events.jsonl)"
                  + (f", last {len(shown)} of {len(snap.problems)}:" if more else ":"), highlight=False)
        for line in feed_lines(shown, snap.start_ts, len(shown)):
            err.print(Text("  ") + line, highlight=False, soft_wrap=True)
    style = STATUS_STYLES.get(snap.status or "", "bold")
    out.print(Text(snap.status_line(), style=style), highlight=False, soft_wrap=True)
    out.print(f"logs in {logs_dir}/", highlight=False, style="dim")


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


def _screen_height(console: Console) -> int:
    return max(12, console.size.height)


# ---------------------------------------------------------------- run with the dashboard

class LauncherLike(Protocol):
    def run(self) -> int: ...
    def request_stop(self, reason: str) -> None: ...
    def toggle_pause(self) -> None: ...


def run_with_dashboard(launcher_cls: Callable[..., LauncherLike], plan: Any, *,
                       console: Console | None = None) -> int:
    """Run `launcher_cls(plan, on_event=...)` under the dashboard; returns the launcher's exit code.

    Use only on a TTY (or with --tui): `cli_run.start` falls back to headless lines otherwise.
    A launcher exception (bad port, coordinator failed to start) is re-raised after the screen closed.
    The stop request (q, Ctrl-C, SIGTERM, SIGHUP) is held until the coordinator has started (its signal
    handlers are installed only then); until the worker thread ends the dashboard keeps rendering.
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
    view = View(mode="run", logs_dir=str(run_dir))
    stop = _StopRequest(launcher)
    notice_until = 0.0
    signals: list[str] = []
    try:
        with _signals_as_flags(signals), _Keys() as keys, _live(console) as live:
            worker.start()
            while worker.is_alive():
                _drain(inbox, snap)
                typed = keys.read(LOOP_TICK_S).lower()
                if "q" in typed:
                    stop.ask("q pressed")
                if signals:
                    stop.ask("Ctrl-C" if signals[0] == "SIGINT" else f"{signals[0]} received")
                if "p" in typed and stop.reason is None:
                    if stop.coordinator_up(snap) and snap.status is None:
                        launcher.toggle_pause()
                        view.notice = "resume requested" if snap.paused else "pausing at the next step boundary"
                    else:
                        view.notice = "not started yet: p ignored"
                    notice_until = time.monotonic() + NOTICE_S
                if stop.reason is not None:
                    stop.deliver(snap)
                    view.notice = f"stopping cleanly ({stop.reason})…"
                elif view.notice and time.monotonic() > notice_until:
                    view.notice = None
                live.update(render_dashboard(snap, now=time.time(), view=view, height=_screen_height(console)))
            worker.join()
            _drain(inbox, snap)
            live.update(render_dashboard(snap, now=time.time(), view=view, height=_screen_height(console)),
                        refresh=True)
    finally:
        if worker.is_alive():  # the screen failed (e.g. the terminal went away): never orphan the run
            stop.ask("the dashboard failed")
            while worker.is_alive():
                _drain(inbox, snap)
                stop.deliver(snap)
                worker.join(LOOP_TICK_S)
    print_after_close(snap, logs_dir=str(run_dir), out=console, err=terminal_console(stderr=True))
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome.get("code", 1))


class _StopRequest:
    """A clean stop asked for (q, a signal, a failing screen), delivered once the coordinator can take it.

    The coordinator installs its SIGTERM/SIGUSR1 handlers before it emits its first event; a signal sent
    earlier would kill it mid-start-up (and `Launcher.request_stop` before the coordinator exists is lost),
    so the request waits for the first `state` event.
    """

    def __init__(self, launcher: LauncherLike) -> None:
        self.launcher = launcher
        self.reason: str | None = None
        self.sent = False

    def ask(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @staticmethod
    def coordinator_up(snap: RunSnapshot) -> bool:
        return snap.state != "Launching"

    def deliver(self, snap: RunSnapshot) -> None:
        if self.reason is not None and not self.sent and self.coordinator_up(snap):
            self.launcher.request_stop(self.reason)
            self.sent = True


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
            live.update(render_dashboard(snap, now=time.time(), view=view, height=_screen_height(console)))
            if "q" in keys.read(LOOP_TICK_S).lower() or signals:
                break
    print_after_close(snap, logs_dir=str(run_dir), out=console, err=terminal_console(stderr=True))
    return 0


def render_once(run_dir: Path, *, width: int, height: int, now: float | None = None) -> str:
    """The current frame of a run directory as plain text (`testnet watch --once`)."""
    from hetero_testnet.events import read_events
    from hetero_testnet.tui.snapshot import build_snapshot

    snap = build_snapshot(read_events(RunDir(run_dir).events), name=run_dir.name)
    return render_text(snap, now=time.time() if now is None else now,
                       view=View(mode="watch", logs_dir=str(RunDir(run_dir).events)), width=width, height=height)

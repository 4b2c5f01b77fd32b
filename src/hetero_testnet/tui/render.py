"""The dashboard as pure functions of a `RunSnapshot`: header, clients table, event feed, footer, the screen.

Data is kept apart from the view (STYLE.md, FastAPI CLI): `snapshot.RunSnapshot` is folded from the
event stream, and `render_dashboard(snapshot, now=..., view=...)` turns it into a Rich `Layout`
without side effects; nothing here owns a terminal or reads a clock (`now` is passed in). Tests
render recorded events at a fixed size with `render_text`; live.py re-renders several times a
second from the same functions. The loss chart is chart.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hetero_testnet.events import RunState
from hetero_testnet.rundir import RunDir
from hetero_testnet.tui.chart import LossChart, tier_color
from hetero_testnet.tui.format import fmt_duration
from hetero_testnet.tui.snapshot import ERROR, INFO, JOIN, WARN, ClientState, FeedItem, RunSnapshot

STALE_AFTER_S = 15.0        # `watch`: flag a run whose events stopped coming
STATE_STYLES = {ClientState.TRAINING: "green", ClientState.WAITING: "yellow", ClientState.EXCHANGING: "cyan",
                ClientState.DEAD: "bold red", ClientState.RESTARTING: "magenta", ClientState.DONE: "dim"}
LEVEL_MARKS = {INFO: ("·", "dim"), JOIN: ("+", "green"), WARN: ("!", "yellow"), ERROR: ("✖", "bold red")}
STATUS_STYLES = {"finished": "bold green", "failed": "bold red", "interrupted": "bold yellow"}
"""Styles of the `run_finished` statuses."""


@dataclass
class View:
    """What the view adds to the data: which mode, where the logs are, a transient notice."""

    mode: str = "run"
    """`run` (this process owns the run: q stops it) or `watch` (read-only viewer)."""
    logs_dir: str = ""
    notice: str | None = None


# ---------------------------------------------------------------- header, table, feed, footer

def render_header(snap: RunSnapshot, *, now: float, view: View) -> Panel:
    """Run name, state and time in it, epoch, step/total with a bar, elapsed, ETA, tokens/s, efficiency."""
    if snap.status is not None:
        state = Text(snap.status.upper(), style=STATUS_STYLES.get(snap.status, "bold"))
    else:
        label = snap.state + (" (pause requested)" if snap.paused and snap.state != RunState.PAUSED else "")
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
    """One row per client: id, tier, FFN width %, helper neurons (help), state, loss, step time, tokens/s,
    idle % (waiting for the slowest and exchanging, of its round time), MB sent per step, RSS (MB), restarts."""
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, padding=(0, 1),
                  collapse_padding=True)
    for name, justify in (("client", "right"), ("tier", "right"), ("FFN", "right"), ("help", "right"),
                          ("state", "left"), ("loss", "right"), ("step s", "right"), ("tok/s", "right"),
                          ("idle", "right"), ("MB/step", "right"), ("RSS", "right"), ("restarts", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    rows = sorted(snap.clients.values(), key=lambda r: r.client_id)
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max(1, max_rows - 1)]
    for r in shown:
        tier = Text("-" if r.tier is None else str(r.tier), style=tier_color(r.tier) if r.tier is not None else "")
        width = "-" if r.width_pct is None else f"{r.width_pct:.0f}%"
        restarts = str(r.restarts)
        table.add_row(str(r.client_id), tier, width, _fmt(r.helper_neurons, "d"),
                      Text(r.state, style=STATE_STYLES.get(r.state, "")), _fmt(r.last_loss, ".4f"),
                      _fmt(r.step_time_s, ".3f"), _fmt(r.tokens_per_sec, ",.0f"), _fmt_pct(r.idle_pct),
                      _fmt_mb(r.sent_mb_per_step),
                      _fmt(r.rss_mb, ",.0f"), restarts)
    if len(shown) < len(rows):
        table.add_row("…", "", "", "", Text(f"{len(rows) - len(shown)} more", style="dim"), *[""] * 7)
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


# ---------------------------------------------------------------- the whole screen

def render_dashboard(snap: RunSnapshot, *, now: float, view: View, height: int = 30) -> Layout:
    """The full screen for `height` rows: header, clients table, loss chart | event panel, footer."""
    header_h, footer_h, min_body = 4, 1, 10
    max_rows = max(1, height - header_h - footer_h - min_body - 5)
    n_rows = max(1, min(len(snap.clients), max_rows))
    layout = Layout(name="root")
    layout.split_column(
        Layout(render_header(snap, now=now, view=view), name="header", size=header_h),
        Layout(_panel(render_clients(snap, max_rows=max_rows), "clients"), name="clients", size=n_rows + 4),
        Layout(name="body", minimum_size=4),
        Layout(render_footer(snap, view=view), name="footer", size=footer_h))
    x_max = snap.total_steps - 1 if snap.total_steps else None
    layout["body"].split_row(
        Layout(_panel(LossChart(snap.loss_by_tier, x_max), "train loss by tier"), name="chart", ratio=5),
        Layout(_panel(EventFeed(list(snap.feed), snap.start_ts), "events"), name="events", ratio=4))
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
        err.print(f"warnings and errors (all in {RunDir(Path(logs_dir)).events})"
                  + (f", last {len(shown)} of {len(snap.problems)}:" if more else ":"), highlight=False)
        for line in feed_lines(shown, snap.start_ts, len(shown)):
            err.print(Text("  ") + line, highlight=False, soft_wrap=True)
    style = STATUS_STYLES.get(snap.status or "", "bold")
    out.print(Text(snap.status_line(), style=style), highlight=False, soft_wrap=True)
    out.print(f"logs in {logs_dir}/", highlight=False, style="dim")


# ---------------------------------------------------------------- helpers

def _panel(body: RenderableType, title: str) -> Panel:
    return Panel(body, title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def _fmt_offset(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    return f"+{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"+{m}:{s:02d}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_pct(pct: float | None) -> str:
    return "-" if pct is None else f"{pct:.0f}%"


def _fmt_mb(mb: float | None) -> str:
    """Megabytes with three significant digits (0.271, 3.07, 182), so 1-bit DeMo and allreduce both read."""
    if mb is None:
        return "-"
    return f"{mb:.3g}" if mb < 1000 else f"{mb:,.0f}"

"""`testnet watch logs/<name>`: the run dashboard, read-only, for a running or finished run.

It reads only `<run dir>/events.jsonl` (the same stream `testnet start` renders), so it can attach to
any run at any time, from another terminal, without touching it: `q` closes the viewer, never the run.
`--once` (or a stdout that is not a terminal) prints one plain-text frame and exits, for scripts and tests.
Wired by `cli_watch.register(app)` in `cli/__init__.py`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import RunDir


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)


def watch(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (logs/<name>) holding events.jsonl.",
                                            show_default=False)],
    once: Annotated[bool, typer.Option("--once", help="Print one frame as plain text and exit "
                                       "(automatic when stdout is not a terminal).")] = False,
    width: Annotated[int, typer.Option("--width", help="Frame width for --once (0 = terminal width).")] = 0,
    height: Annotated[int, typer.Option("--height", help="Frame height for --once (0 = terminal height).")
                      ] = 0,
) -> None:
    """Show the dashboard of a running or finished run, read-only (q closes the viewer, not the run)."""
    from hetero_testnet.tui.live import render_once, watch_run

    if not RunDir(run_dir).events.is_file():
        what = "does not exist" if not run_dir.exists() else "has no events.jsonl"
        raise ConfigError(f"{run_dir} {what}: not a run directory, or its run has not started yet",
                          hint="pass the directory `testnet start` printed, e.g. logs/<name>")
    if width < 0 or height < 0:
        raise ConfigError("--width and --height must be >= 0")
    if once or not sys.stdout.isatty():
        size = shutil.get_terminal_size((100, 30))
        frame = render_once(run_dir, width=width or size.columns, height=height or size.lines)
        print(frame, end="" if frame.endswith("\n") else "\n")
        return
    raise typer.Exit(watch_run(run_dir))

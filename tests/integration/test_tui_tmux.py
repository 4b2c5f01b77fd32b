"""The dashboard in a real terminal: `testnet start --tui` inside tmux, read the screen, press q.

tmux gives the run a 100x30 pseudo-terminal; `capture-pane -p` is the screen as text. The test waits (with
deadlines, polling the screen, never sleeping as synchronization) until the header and one row per client
with its tier and a loss value are shown, presses `q`, and checks the clean shutdown: the pane's process
exits with 130 (or 0 if the run had already finished), summary.json says interrupted/finished, the status
line is printed after the alternate screen closed, and no process of the run is left.

A private tmux server (`-L <unique socket>`) keeps the test away from the user's sessions; its config sets
`remain-on-exit` so the last screen stays readable after the command ended. The pane's shell writes the
exit code to a file: tmux 3.3 can report a dead pane with an empty `#{pane_dead_status}`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")]


class Tmux:
    """One private tmux server with one 100x30 session."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"testnet-tui-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\nset -g history-limit 2000\n")

    def __call__(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf), *args],
                                capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: str) -> None:
        self("new-session", "-d", "-s", "run", "-x", "100", "-y", "30", command)
        self.socket_path = Path(self("display-message", "-p", "#{socket_path}").strip())

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "run")

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "run", fmt).strip()

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        if getattr(self, "socket_path", None) is not None:
            self.socket_path.unlink(missing_ok=True)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)  # polling interval, not synchronization: the condition decides
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last screen:\n{describe()}")


def run_processes(markers: list[str], *, exclude: set[int]) -> list[psutil.Process]:
    """Live processes whose command line names the run (the tmux server's own command line does too)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if any(m in cmdline for m in markers) and p.pid not in exclude and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def test_dashboard_shows_the_run_and_q_stops_it_cleanly(tmp_path: Path) -> None:
    name = f"tui-{uuid.uuid4().hex[:10]}"
    logs_dir = tmp_path / "logs"
    run_dir = logs_dir / name
    command = shlex.join([sys.executable, "-m", "hetero_testnet", "start", "--config-path", "configs/tiny",
                          "--num-clients", "2", "--tiers", "0,1", "--tui", "--server-port", "0",
                          "--total-steps", "40", "--name", name, "--logs-dir", str(logs_dir)])
    tmux = Tmux(tmp_path)
    markers = [name, str(logs_dir)]
    try:
        exit_file = tmp_path / "exit_code"  # tmux 3.3 sometimes leaves #{pane_dead_status} empty
        tmux.start(f"cd {shlex.quote(str(ROOT))} && {command}; echo $? > {shlex.quote(str(exit_file))}")
        exclude = {os.getpid(), int(tmux.pane("#{pid}"))}  # this test and the tmux server
        row = {cid: re.compile(rf"│\s+{cid}\s+{tier}\s+{pct}\s+\S+\s+\w+\s+\d+\.\d{{4}}\s")
               for cid, tier, pct in ((1, 0, "100%"), (2, 1, "50%"))}

        seen: list[str] = [""]

        def dashboard_ready() -> bool:
            screen = seen[0] = tmux.screen()
            return (name in screen and re.search(r"step \d+/40", screen) is not None and "ETA" in screen
                    and all(r.search(screen) for r in row.values()) and "q quit" in screen)

        wait_for("the header and a row with a loss per client", dashboard_ready, 180, lambda: seen[0])
        shown = tmux.screen()
        print(f"\n--- captured screen (100x30) ---\n{shown}--- end ---")
        (tmp_path / "screen.txt").write_text(shown)

        tmux("send-keys", "-t", "run", "q")
        wait_for("the run to stop after q", lambda: tmux.pane("#{pane_dead}") == "1" and exit_file.is_file(), 120,
                 tmux.screen)
        status = int(exit_file.read_text())
        # the closing lines, with the row the alternate screen's exit scrolls into history, wraps joined
        final = tmux("capture-pane", "-p", "-J", "-S", "-40", "-t", "run")
        assert status in (0, 130), final
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] in ("interrupted", "finished"), summary
        if summary["status"] == "interrupted":
            assert status == 130 and summary["reason"] == "stopped from the dashboard (q pressed)"
            assert f"run {name} interrupted: stopped from the dashboard (q pressed) |" in final
            assert "warning(s)/error(s)" not in final and "SIGTERM" not in final
        assert f"run {name} {summary['status']}" in final  # printed after the alternate screen closed

        def nothing_left() -> bool:
            return not run_processes(markers, exclude=exclude)

        wait_for("no process of the run to be left", nothing_left, 5,
                 lambda: "\n".join(" ".join(p.cmdline()) for p in run_processes(markers, exclude=exclude)))
    finally:
        tmux.kill()
        for p in run_processes(markers, exclude={os.getpid()}):  # never leak processes, even on failure
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

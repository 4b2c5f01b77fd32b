"""Supervised child processes: own session, the stop ladder, killing a whole tree, the last error line."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

from hetero_testnet.run.processes import kill_tree, last_error_line, spawn_supervised, stop, wait_all

PY = sys.executable


def _spawn(tmp_path, code: str):
    return spawn_supervised([PY, "-c", code], log_path=tmp_path / "child.log", env=os.environ)


def test_a_child_runs_in_its_own_session_with_its_output_in_the_log(tmp_path):
    proc = _spawn(tmp_path, "import os, sys; print('sid', os.getsid(0) == os.getpid()); "
                            "print('oops', file=sys.stderr)")
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "child.log").read_text().split() == ["sid", "True", "oops"]


def test_the_ladder_stops_at_the_first_signal_that_works(tmp_path):
    proc = _spawn(tmp_path, "import time; time.sleep(60)")
    assert stop(proc, [(None, 0.2), (signal.SIGTERM, 10), (signal.SIGKILL, 10)]) == -signal.SIGTERM


def test_a_child_ignoring_sigterm_is_killed(tmp_path):
    proc = _spawn(tmp_path, "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('ready', flush=True); time.sleep(60)")
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / "child.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop(proc, [(signal.SIGTERM, 0.5), (signal.SIGKILL, 10)]) == -signal.SIGKILL


def test_stop_of_an_exited_child_returns_its_code(tmp_path):
    proc = _spawn(tmp_path, "raise SystemExit(3)")
    proc.wait(timeout=30)
    assert stop(proc, [(signal.SIGKILL, 1)]) == 3


def test_kill_tree_takes_the_grandchildren_along(tmp_path):
    proc = _spawn(tmp_path, f"import subprocess, time; p = subprocess.Popen([{PY!r}, '-c', 'import time; "
                            "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "child.log").read_text().split()[0])
    kill_tree([proc])
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(psutil.NoSuchProcess):
        p = psutil.Process(grandchild)
        if p.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(grandchild)


def test_wait_all_sets_exit_codes(tmp_path):
    procs = [_spawn(tmp_path, f"raise SystemExit({code})") for code in (0, 4)]
    wait_all(procs, 30)
    assert [p.returncode for p in procs] == [0, 4]


def test_last_error_line(tmp_path):
    log = tmp_path / "x.log"
    assert last_error_line(log) is None
    log.write_text("starting\nerror: --tiers is bad (hint: fix it)\nbye\n\n")
    assert last_error_line(log) == "--tiers is bad (hint: fix it)"
    log.write_text("one\n  two  \n\n")
    assert last_error_line(log) == "two"

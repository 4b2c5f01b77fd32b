"""Where a client's start-up goes: seconds per phase from its process start to `Ready`.

Issue 12 asks where start-up time goes (imports, data, model build, group formation, warm-up) and
how resident memory grows; the client measures its own phases here and sends them in `Ready`, the
coordinator puts them in a `client_ready` event, and `benchmarks/scale.py` reads them back.

Phases, in order: `process` (interpreter start and imports, until the client's code runs; read from
/proc, absent where there is none), `connect` (connect, Hello, Welcome), `data` (open the train and
validation splits), `model` (build the model, load a checkpoint), `exchange` (the gradient
exchange and its stepper).
"""

from __future__ import annotations

import os
import time

import psutil

PHASES = ("process", "connect", "data", "model", "exchange")
"""Every phase a client may report, in order (others are refused at the coordinator)."""
MAX_PHASE_S = 86400.0
"""A reported phase longer than a day is not believed (nothing from a socket is trusted)."""


def process_age_s() -> float | None:
    """Seconds since this process was started (exec included), or None without /proc."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime_s = float(f.read().split()[0])
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command's ')'
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def rss_mb() -> float:
    """This process's resident memory, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


class StartupClock:
    """Marks the end of each phase; `phases()` is what `Ready.setup_s` carries."""

    def __init__(self) -> None:
        self._phases: dict[str, float] = {}
        age = process_age_s()
        if age is not None:
            self._phases["process"] = round(age, 3)
        self._last = time.monotonic()

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self._phases[phase] = round(self._phases.get(phase, 0.0) + now - self._last, 3)
        self._last = now

    def phases(self) -> dict[str, float]:
        return dict(self._phases)


def checked_phases(reported: dict[str, float]) -> dict[str, float]:
    """A client's `Ready.setup_s` with unknown phases and implausible values left out."""
    return {k: v for k, v in reported.items() if k in PHASES and 0.0 <= v <= MAX_PHASE_S}

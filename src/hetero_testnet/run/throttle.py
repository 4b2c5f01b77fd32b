"""Compute-speed emulation: a client at speed s < 1 holds every round's compute for (1/s - 1) times
the compute it measured, so the round takes natural time / s.

Why a duty cycle: it is exact and portable (no cgroup, no root, works on any OS and device), it
tracks the machine's load (the hold is proportional to the compute just measured, under whatever
contention there was), and the measured and the emulated parts stay separately reported: the
client sends both (`ComputeDone.compute_time_s` = natural + hold, `throttle_s` = the hold), the
coordinator records both in `compute_done` / `client_step` events and the summary. What it does not
emulate: a slow device's memory or cache behaviour, and the core the sleeping client frees (on a
shared machine another client may use it; the summary's figures are what actually ran).
cgroup v2 `cpu.max` was not used: it caps CPU time, not speed, and a capped process on a loaded
2-core machine slows by an amount that depends on its neighbours, not by 1/s.
"""

from __future__ import annotations

import time

from hetero_testnet.config.devices import DeviceProfile


class ComputeThrottle:
    """Holds a round back after its compute, in proportion to it (module docstring)."""

    def __init__(self, profile: DeviceProfile, sleep=time.sleep) -> None:
        self.speed = profile.speed
        self._sleep = sleep

    def hold_s(self, natural_s: float) -> float:
        """The hold for a round whose compute took `natural_s` (0 at full speed)."""
        if self.speed >= 1.0 or natural_s <= 0:
            return 0.0
        return natural_s * (1.0 / self.speed - 1.0)

    def hold(self, natural_s: float) -> float:
        """Sleep `hold_s(natural_s)`; returns the seconds actually held (measured)."""
        want = self.hold_s(natural_s)
        if want <= 0:
            return 0.0
        t0 = time.perf_counter()
        self._sleep(want)
        return time.perf_counter() - t0

"""What a client process is told on its command line, and the update it holds between Reduced and Commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hetero_testnet.config.devices import DeviceProfile


@dataclass
class ClientOptions:
    coordinator_host: str
    coordinator_port: int
    token: str
    tier: int = 0
    client_id: int | None = None
    helper_fraction: float = 0.0
    helper_rotation_interval: int = 16
    threads: int = 1
    device: str = "cpu"
    data_dir: Path | None = None
    """Override the config's data location (a client on another machine)."""
    coordinator_timeout_s: float = 15.0
    connect_timeout_s: float = 20.0
    profile: DeviceProfile = field(default_factory=DeviceProfile)
    """The device this client emulates: its compute speed (`run/throttle.py`) and link (the exchange's shaper)."""


@dataclass(frozen=True)
class PendingUpdate:
    """A reduced round waiting for the coordinator's Commit (or Discard): the update is in the stepper."""

    step: int
    inner_steps: int = 1
    """Steps the round covers: the state after its commit is that of step `step + inner_steps`."""

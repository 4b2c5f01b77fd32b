"""Device profiles: how fast a client computes and what its link can carry, relative to this machine.

The testnet runs every client on the same cores, so unequal capacity has to be emulated. A profile
says how much slower than this machine a client computes (`speed`: 1 = its natural speed here,
0.5 = every round's compute takes twice as long) and what its link looks like (uplink and downlink
in bytes/s, latency, packet loss). The client enforces both (`run/throttle.py` for speed, the
exchange's shaper `exchange/faults.py` for the link) and reports each emulated quantity next to the
measured one. Emulation can only slow a client down: `speed` is in (0, 1].

Profiles come from presets (`PRESETS`), from the config's `devices.profiles`, and per client from the
command line (`--client-profiles`, `--client-speeds`, `--client-bandwidth`, ...), which override a
profile field by field (`run/profiles.py`). The config section:

    devices:
      profiles:                       # optional: your own, beside the presets
        edge-box: {speed: 0.3, uplink_bytes_per_s: 2.0e6, downlink_bytes_per_s: 1.0e7, latency_ms: 30}
      clients: [datacenter-gpu, laptop, laptop]   # one per client, cycling; default: all `local`
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One client's emulated device; all numbers relative to this machine, 0 bandwidth = unlimited."""

    name: str = "local"
    speed: float = 1.0
    """Relative compute speed in (0, 1]: a round's compute takes natural time / speed."""
    uplink_bytes_per_s: float = 0.0
    """What the client can send per second; 0: unlimited."""
    downlink_bytes_per_s: float = 0.0
    """What the client can receive per second; 0: unlimited."""
    latency_ms: float = 0.0
    """One-way delay added to every exchange."""
    packet_loss: float = 0.0
    """Probability in [0, 1) that a packet is lost (one retransmission round trip each)."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("a device profile needs a name")
        check_non_negative(self, f"device profile {self.name!r}:", skip=("name",))
        if not 0 < self.speed <= 1:
            raise ConfigError(f"device profile {self.name!r}: speed must be in (0, 1] (emulation can only slow "
                              f"a client down; got {self.speed:g})")
        if self.packet_loss >= 1:
            raise ConfigError(f"device profile {self.name!r}: packet_loss must be below 1 (got {self.packet_loss:g})")

    @property
    def emulated(self) -> bool:
        """True when anything differs from this machine's own speed and link."""
        return self != DeviceProfile(name=self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """`laptop: speed 0.5, up 2.5 MB/s, down 12.5 MB/s, 15 ms` (for logs and summaries)."""
        parts = [f"speed {self.speed:g}"]
        if self.uplink_bytes_per_s:
            parts.append(f"up {self.uplink_bytes_per_s / 1e6:g} MB/s")
        if self.downlink_bytes_per_s:
            parts.append(f"down {self.downlink_bytes_per_s / 1e6:g} MB/s")
        if self.latency_ms:
            parts.append(f"{self.latency_ms:g} ms")
        if self.packet_loss:
            parts.append(f"loss {self.packet_loss:g}")
        return f"{self.name}: " + ", ".join(parts)


def check_non_negative(obj: Any, what: str, skip: tuple[str, ...] = ()) -> None:
    """Every field of the frozen dataclass `obj` but `skip` must be a finite number >= 0 (a bool is not
    a number); each becomes a float. ConfigError `<what> <field> must be ...` otherwise."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{what} {f.name} must be a finite number >= 0 (got {value!r})")
        object.__setattr__(obj, f.name, float(value))


PROFILE_FIELDS = {"speed": float, "uplink_bytes_per_s": float, "downlink_bytes_per_s": float, "latency_ms": float,
                  "packet_loss": float}
"""The numeric fields of a profile, as the config and the command line name them."""

PRESETS: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile(name="local"),
    # a data-centre accelerator: this machine's full speed, a 10 Gbit/s fabric
    DeviceProfile(name="datacenter-gpu", speed=1.0, uplink_bytes_per_s=1.25e9, downlink_bytes_per_s=1.25e9,
                  latency_ms=0.05),
    # a desktop with a consumer GPU on 1 Gbit/s fibre
    DeviceProfile(name="workstation", speed=0.7, uplink_bytes_per_s=1.25e8, downlink_bytes_per_s=1.25e8,
                  latency_ms=2.0),
    # a laptop on home broadband: half the speed, 20 Mbit/s up, 100 Mbit/s down
    DeviceProfile(name="laptop", speed=0.5, uplink_bytes_per_s=2.5e6, downlink_bytes_per_s=1.25e7, latency_ms=15.0),
    # a phone-class device on a mobile link: a fifth of the speed, 10/40 Mbit/s, some loss
    DeviceProfile(name="phone", speed=0.2, uplink_bytes_per_s=1.25e6, downlink_bytes_per_s=5.0e6, latency_ms=40.0,
                  packet_loss=0.005),
)}
"""Built-in profiles; a config's `devices.profiles` may add others (not replace these)."""


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    """The config's `devices:` section: extra named profiles and the profile of each client (cycling)."""

    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    clients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.profiles:
            if name in PRESETS:
                raise ConfigError(f"config field devices.profiles.{name}: {name!r} is a built-in profile; "
                                  f"choose another name")
        for name in self.clients:
            self.profile(name, where="devices.clients")

    def profile(self, name: str, *, where: str = "--client-profiles") -> DeviceProfile:
        """The profile called `name` (a preset or one of `profiles`); ConfigError naming the choices."""
        found = self.profiles.get(name) or PRESETS.get(name)
        if found is None:
            known = ", ".join(sorted(PRESETS) + sorted(self.profiles))
            raise ConfigError(f"{where}: unknown device profile {name!r} (known: {known})")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"profiles": {n: {k: v for k, v in p.to_dict().items() if k != "name"} for n, p in self.profiles.items()},
                "clients": list(self.clients)}


def parse_devices(raw: Any) -> DevicesConfig:
    """The `devices:` section of a config (None or {} = no profiles); ConfigError on anything invalid."""
    if raw is None:
        return DevicesConfig()
    if not isinstance(raw, dict):
        raise ConfigError("config field devices must be a mapping with profiles and clients")
    unknown = sorted(str(k) for k in raw if k not in ("profiles", "clients"))
    if unknown:
        raise ConfigError(f"unknown config field devices.{unknown[0]}")
    profiles_raw = raw.get("profiles") or {}
    if not isinstance(profiles_raw, dict):
        raise ConfigError("config field devices.profiles must map names to {speed: ..., ...}")
    profiles = {str(name): profile_from_fields(str(name), fields, f"devices.profiles.{name}")
                for name, fields in profiles_raw.items()}
    clients_raw = raw.get("clients") or []
    if not isinstance(clients_raw, list) or not all(isinstance(c, str) for c in clients_raw):
        raise ConfigError("config field devices.clients must be a list of profile names")
    return DevicesConfig(profiles=profiles, clients=tuple(clients_raw))


def profile_from_fields(name: str, fields: Any, where: str) -> DeviceProfile:
    """A profile from a mapping of `PROFILE_FIELDS` (a config's `devices.profiles.<name>`, a joiner's
    `Hello.profile`); ConfigError naming `where` on anything else."""
    if not isinstance(fields, dict):
        raise ConfigError(f"config field {where} must be a mapping of {', '.join(PROFILE_FIELDS)}")
    unknown = sorted(str(k) for k in fields if k not in PROFILE_FIELDS)
    if unknown:
        raise ConfigError(f"unknown config field {where}.{unknown[0]} (known: {', '.join(PROFILE_FIELDS)})")
    return DeviceProfile(name=name, **fields)

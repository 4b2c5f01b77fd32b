"""Injected network faults: the delay a slow or distant link adds to each gradient exchange.

`NetworkFaults` is the one typed shape of `--fault-latency-ms BASE-JITTER` and
`--fault-bandwidth-limit`. It crosses the control connection as a plain dict (`Welcome.fault`,
built by `to_wire`) and is rebuilt with `from_wire`, which trusts nothing it reads: a field of
the wrong type, a negative or non-finite number, or an unknown key is a `ProtocolError`.

The delay is charged once per step, before the gradient all-reduce, on the bytes of the whole
exchange buffer: `latency + uniform(0, jitter) + buffer_bytes / bandwidth`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

from hetero_testnet.errors import ConfigError, ProtocolError


@dataclass(frozen=True, slots=True)
class NetworkFaults:
    """What the link of one client looks like; all zero (the default) is a perfect link."""

    latency_ms: float = 0.0
    """Fixed delay added to every exchange."""
    latency_jitter_ms: float = 0.0
    """Upper bound of a uniform random delay added on top of `latency_ms`, drawn per exchange."""
    bandwidth_bytes_per_s: float = 0.0
    """Link speed the exchanged bytes are charged at; 0 means unlimited."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"network fault {f.name} must be a finite number >= 0 (got {value!r})")
            object.__setattr__(self, f.name, float(value))

    def to_wire(self) -> dict[str, float]:
        """The JSON-ready dict that travels in `Welcome.fault`."""
        return asdict(self)

    @classmethod
    def from_wire(cls, raw: Any) -> "NetworkFaults":
        """Rebuild from `Welcome.fault`; None or `{}` is no fault. Raises `ProtocolError` on bad input."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ProtocolError(f"network faults must be an object (got {type(raw).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ProtocolError(f"network faults have unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**raw)
        except ConfigError as e:
            raise ProtocolError(str(e)) from e

    def delay_s(self, payload_bytes: int, rng: random.Random) -> float:
        """Seconds to hold back an exchange of `payload_bytes`: latency (+ jitter) plus bytes / bandwidth."""
        delay = self.latency_ms / 1000.0 + (rng.uniform(0, self.latency_jitter_ms) / 1000.0
                                            if self.latency_jitter_ms else 0.0)
        if self.bandwidth_bytes_per_s > 0:
            delay += payload_bytes / self.bandwidth_bytes_per_s
        return delay

"""Injected network faults: the delay a slow, distant or lossy link adds to each gradient exchange.

`NetworkFaults` is the one typed shape of `--fault-latency-ms BASE-JITTER`,
`--fault-bandwidth-limit` and `--fault-packet-loss`. It crosses the control connection as a plain dict (`Welcome.fault`,
built by `to_wire`) and is rebuilt with `from_wire`, which trusts nothing it reads: a field of
the wrong type, a negative or non-finite number, or an unknown key is a `ProtocolError`.

The delay is charged once per exchange, before the collective, on the bytes this rank really
sends (the strategy says how many: 2 (W-1)/W of the buffer for a ring all-reduce, W-1 payloads
for an all_gather): `latency + uniform(0, jitter) + bytes / bandwidth + lost packets x RTT`.

Packet loss is emulated, not simulated packet by packet: the bytes are cut into MSS_BYTES
packets, the number lost is drawn (binomial, normal approximation beyond 1000 packets), and each
costs one retransmission round trip (TCP fast retransmit), RTT = 2 x latency, at least
LOSS_RTT_FLOOR_S (a LAN). That is a lower bound: it ignores retransmission timeouts and the
congestion window halving after each loss. Where a kernel has the netem qdisc, real loss
(`tc qdisc ... netem loss P%`) can be used instead on namespaced clients (tests/integration/test_netns.py).
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
    packet_loss: float = 0.0
    """Probability in [0, 1) that a packet is lost (each costs one retransmission round trip)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"network fault {f.name} must be a finite number >= 0 (got {value!r})")
            object.__setattr__(self, f.name, float(value))
        if self.packet_loss >= 1.0:
            raise ConfigError(f"network fault packet_loss must be below 1 (got {self.packet_loss!r})")

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
        """Seconds to hold back an exchange that sends `payload_bytes`: latency (+ jitter), bytes /
        bandwidth, and one round trip per lost packet (module docstring)."""
        delay = self.latency_ms / 1000.0 + (rng.uniform(0, self.latency_jitter_ms) / 1000.0
                                            if self.latency_jitter_ms else 0.0)
        if self.bandwidth_bytes_per_s > 0:
            delay += payload_bytes / self.bandwidth_bytes_per_s
        if self.packet_loss > 0 and payload_bytes > 0:
            rtt = max(2 * self.latency_ms / 1000.0, LOSS_RTT_FLOOR_S)
            delay += lost_packets(math.ceil(payload_bytes / MSS_BYTES), self.packet_loss, rng) * rtt
        return delay


MSS_BYTES = 1448
"""TCP payload per packet on a 1500-byte Ethernet MTU (with timestamps)."""
LOSS_RTT_FLOOR_S = 0.001
"""The round trip a retransmission costs at least (a LAN), when no latency fault sets it."""


def lost_packets(packets: int, p: float, rng: random.Random) -> int:
    """How many of `packets` are lost at probability `p`: exact Bernoulli draws up to 1000 packets,
    the binomial's normal approximation beyond (clamped to [0, packets])."""
    if packets <= 1000:
        return sum(1 for _ in range(packets) if rng.random() < p)
    mean, sd = packets * p, math.sqrt(packets * p * (1 - p))
    return min(packets, max(0, round(rng.gauss(mean, sd))))

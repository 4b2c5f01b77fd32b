"""Injected network faults: the delay a slow, distant or lossy link adds to each gradient exchange.

`NetworkFaults` is the one typed shape of `--fault-latency-ms BASE-JITTER`,
`--fault-bandwidth-limit` and `--fault-packet-loss`. It crosses the control connection as a plain dict (`Welcome.fault`,
built by `to_wire`) and is rebuilt with `from_wire`, which trusts nothing it reads: a field of
the wrong type, a negative or non-finite number, or an unknown key is a `ProtocolError`.

The delay is charged once per exchange, before the collective, on the bytes this rank really
sends and receives (the strategy says how many: 2 (W-1)/W of the buffer each way for a ring
all-reduce, W-1 payloads each way for an all_gather): `latency + uniform(0, jitter) +
max(sent / uplink, received / downlink) + lost packets x RTT` (a full-duplex link: sending and
receiving overlap, so the slower direction decides). `bandwidth_bytes_per_s` (`--fault-bandwidth-limit`)
caps both directions; `uplink_bytes_per_s` and `downlink_bytes_per_s` (a device profile) cap one
each; 0 is unlimited everywhere.

A client's own link (its device profile, `config/devices.py`) and the run's `--fault-*` flags are
merged by `combined`: latencies add, the narrower bandwidth wins, losses compound.

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

from hetero_testnet.config.devices import DeviceProfile, check_non_negative
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
    uplink_bytes_per_s: float = 0.0
    """Cap on what this client sends (a device profile's uplink); 0 means unlimited."""
    downlink_bytes_per_s: float = 0.0
    """Cap on what this client receives (a device profile's downlink); 0 means unlimited."""

    def __post_init__(self) -> None:
        check_non_negative(self, "network fault")
        if self.packet_loss >= 1.0:
            raise ConfigError(f"network fault packet_loss must be below 1 (got {self.packet_loss!r})")

    def to_wire(self) -> dict[str, float]:
        """The JSON-ready dict that travels in `Welcome.fault`."""
        return asdict(self)

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> "NetworkFaults":
        """The link of a device profile."""
        return cls(latency_ms=profile.latency_ms, packet_loss=profile.packet_loss,
                   uplink_bytes_per_s=profile.uplink_bytes_per_s, downlink_bytes_per_s=profile.downlink_bytes_per_s)

    def combined(self, other: "NetworkFaults") -> "NetworkFaults":
        """Both links in series: latencies and jitters add, the narrower bandwidth wins in each
        direction, packet losses compound."""
        return NetworkFaults(
            latency_ms=self.latency_ms + other.latency_ms,
            latency_jitter_ms=self.latency_jitter_ms + other.latency_jitter_ms,
            bandwidth_bytes_per_s=_narrower(self.bandwidth_bytes_per_s, other.bandwidth_bytes_per_s),
            packet_loss=1.0 - (1.0 - self.packet_loss) * (1.0 - other.packet_loss),
            uplink_bytes_per_s=_narrower(self.uplink_bytes_per_s, other.uplink_bytes_per_s),
            downlink_bytes_per_s=_narrower(self.downlink_bytes_per_s, other.downlink_bytes_per_s))

    @property
    def uplink(self) -> float:
        """Bytes/s at which sent bytes are charged (0: unlimited)."""
        return _narrower(self.bandwidth_bytes_per_s, self.uplink_bytes_per_s)

    @property
    def downlink(self) -> float:
        """Bytes/s at which received bytes are charged (0: unlimited)."""
        return _narrower(self.bandwidth_bytes_per_s, self.downlink_bytes_per_s)

    def transfer_s(self, sent_bytes: int, received_bytes: int) -> float:
        """Seconds the link needs to move `sent_bytes` out and `received_bytes` in at the same time."""
        up = sent_bytes / self.uplink if self.uplink > 0 else 0.0
        down = received_bytes / self.downlink if self.downlink > 0 else 0.0
        return max(up, down)

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

    def delay_s(self, payload_bytes: int, rng: random.Random, received_bytes: int | None = None) -> float:
        """Seconds to hold back an exchange that sends `payload_bytes` and receives `received_bytes`
        (default: as many): latency (+ jitter), the transfer time, and one round trip per lost packet
        (module docstring)."""
        delay = self.latency_ms / 1000.0 + (rng.uniform(0, self.latency_jitter_ms) / 1000.0
                                            if self.latency_jitter_ms else 0.0)
        delay += self.transfer_s(payload_bytes, payload_bytes if received_bytes is None else received_bytes)
        if self.packet_loss > 0 and payload_bytes > 0:
            rtt = max(2 * self.latency_ms / 1000.0, LOSS_RTT_FLOOR_S)
            delay += lost_packets(math.ceil(payload_bytes / MSS_BYTES), self.packet_loss, rng) * rtt
        return delay


def _narrower(a: float, b: float) -> float:
    """The narrower of two bandwidths where 0 means unlimited."""
    return min(a, b) if a > 0 and b > 0 else max(a, b)


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

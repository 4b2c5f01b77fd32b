"""Each client's device profile from the config and the command line, and `--tiers auto`.

Profiles (`config/devices.py`) are named in the config's `devices.clients` or by
`--client-profiles`, both cycling over the clients (default `local`: this machine's own speed and
an unlimited link); `--client-speeds`, `--client-bandwidth` (both directions), `--client-uplink`,
`--client-downlink`, `--client-latency-ms` and `--client-packet-loss` then override single fields,
cycling too. A profile changed by a flag keeps its name with a `*` (`laptop*`), or is `custom`.

`--tiers auto` gives each client the widest tier whose estimated per-step compute at an equal share
of the batch, `train_flops_per_token(tier) / speed`, is within `AUTO_TIER_TOLERANCE` of the fastest
client's at tier 0; where no allowed tier gets there, the narrowest allowed tier (it is then the
straggler, and says so). The estimate uses the model's FLOPs per token (`model/flops.py`) and the
profile's speed; what the run then measures is in the `compute_done` events and the summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from hetero_testnet.config import ModelConfig
from hetero_testnet.config.devices import DeviceProfile, DevicesConfig
from hetero_testnet.errors import ConfigError

EMULATION = {"speed": "duty cycle: each round's compute is held for (1/speed - 1) x its measured time (run/throttle.py)",
             "link": "shaper in the exchange: latency + max(sent/uplink, received/downlink) + lost packets x RTT, "
                     "charged on the bytes the collective moves (exchange/faults.py; no netem/tbf)"}
"""What the summary says ran for an emulated client (`clients.<id>.emulation`)."""
AUTO_TIER_TOLERANCE = 1.10
"""`--tiers auto`: a client's estimated step compute may exceed the fastest client's by 10%."""
AUTO_MAX_TIER = 3
"""`--tiers auto` considers tiers 0..3 (FFN, FFN/2, FFN/4, FFN/8), those the model has neurons for."""


@dataclass(frozen=True)
class ProfileFlags:
    """The command line's per-client profile lists (each cycles over the clients; empty: not given)."""

    profiles: Sequence[str] = ()
    speeds: Sequence[float] = ()
    bandwidth: Sequence[float] = ()
    uplink: Sequence[float] = ()
    downlink: Sequence[float] = ()
    latency_ms: Sequence[float] = ()
    packet_loss: Sequence[float] = ()


@dataclass(frozen=True)
class TierChoice:
    tier: int
    reason: str


def client_profiles(devices: DevicesConfig, num_clients: int, flags: ProfileFlags = ProfileFlags()
                    ) -> list[DeviceProfile]:
    """The profile of each client 1..num_clients (module docstring); ConfigError on bad input."""
    names = flags.profiles or devices.clients
    out = []
    for i in range(num_clients):
        base = devices.profile(names[i % len(names)]) if names else DeviceProfile()
        changes = _overrides(flags, i)
        if changes:
            name = "custom" if base.name == "local" else f"{base.name}*"
            try:
                base = dataclasses.replace(base, name=name, **changes)
            except ConfigError as e:
                raise ConfigError(f"client {i + 1}: {e}") from None
        out.append(base)
    return out


def _overrides(flags: ProfileFlags, i: int) -> dict[str, float]:
    def at(values: Sequence[float]) -> float:
        return values[i % len(values)]

    changes: dict[str, float] = {}
    if flags.speeds:
        changes["speed"] = at(flags.speeds)
    if flags.bandwidth:
        changes["uplink_bytes_per_s"] = changes["downlink_bytes_per_s"] = at(flags.bandwidth)
    if flags.uplink:
        changes["uplink_bytes_per_s"] = at(flags.uplink)
    if flags.downlink:
        changes["downlink_bytes_per_s"] = at(flags.downlink)
    if flags.latency_ms:
        changes["latency_ms"] = at(flags.latency_ms)
    if flags.packet_loss:
        changes["packet_loss"] = at(flags.packet_loss)
    return changes


def allowed_tiers(model: ModelConfig) -> list[int]:
    """Tiers `--tiers auto` may pick: 0..AUTO_MAX_TIER while the FFN keeps at least one neuron."""
    return [t for t in range(AUTO_MAX_TIER + 1) if model.intermediate_size >> t >= 1]


def auto_tiers(model: ModelConfig, profiles: Sequence[DeviceProfile],
               tiers: Sequence[int] | None = None) -> list[TierChoice]:
    """`--tiers auto`: one tier per client, balancing estimated per-step compute (module docstring)."""
    from hetero_testnet.model.flops import tier_cost  # torch-free CLI start: the model code loads on use

    if not profiles:
        return []
    tiers = sorted(tiers if tiers is not None else allowed_tiers(model))
    if not tiers:
        raise ConfigError("--tiers auto: the config allows no tier")
    flops = {t: tier_cost(model, t).train_flops_per_token for t in tiers}
    fastest = max(p.speed for p in profiles)
    target = flops[tiers[0]] / fastest
    choices = []
    for p in profiles:
        fits = [t for t in tiers if flops[t] / p.speed <= target * AUTO_TIER_TOLERANCE]
        tier = fits[0] if fits else tiers[-1]
        ratio = (flops[tier] / p.speed) / target
        why = (f"speed {p.speed:g}: tier {tier} (FFN {model.intermediate_size >> tier}) costs "
               f"{flops[tier] / 1e6:.2f} MFLOP/token, est. step compute {ratio:.2f}x the fastest client's")
        if not fits:
            why += f"; no allowed tier reaches {AUTO_TIER_TOLERANCE:.2f}x, so the narrowest (it will be the straggler)"
        elif tier == tiers[0]:
            why += "; the widest tier fits"
        choices.append(TierChoice(tier, why))
    return choices


def profile_args(profile: DeviceProfile) -> list[str]:
    """`testnet client` flags that give it `profile` (none for this machine's own speed and link, so
    plain runs keep their command lines)."""
    if not profile.emulated and profile.name == "local":
        return []
    return ["--profile-name", profile.name, "--speed", f"{profile.speed:g}",
            "--uplink", f"{profile.uplink_bytes_per_s:g}", "--downlink", f"{profile.downlink_bytes_per_s:g}",
            "--latency-ms", f"{profile.latency_ms:g}", "--packet-loss", f"{profile.packet_loss:g}"]

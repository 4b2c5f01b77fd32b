"""Flags of `testnet start` for unequal devices: per-client profiles, batch shares, `--tiers auto`.

What they mean lives in `run/profiles.py` (profiles, auto tiers) and `run/shares.py` (shares);
README "Devices of unequal capacity" says what is emulated and how it is measured.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hetero_testnet.cli.options import parse_float_list
from hetero_testnet.config.devices import PRESETS
from hetero_testnet.run.profiles import ProfileFlags
from hetero_testnet.run.shares import DEFAULT_REPLAN_EVERY, DEFAULT_SHARES, SHARE_MODES

__all__ = ["DEFAULT_REPLAN_EVERY", "DEFAULT_SHARES", "ClientBandwidthOption", "ClientDownlinkOption",
           "ClientLatencyOption", "ClientLossOption", "ClientProfilesOption", "ClientSpeedsOption",
           "ClientUplinkOption", "ReplanEveryOption", "SharesOption", "profile_flags"]

ClientProfilesOption = Annotated[Optional[str], typer.Option(
    "--client-profiles", help=f"Device profile per client, cycling ({', '.join(PRESETS)}, or one of the "
    "config's devices.profiles); default: the config's devices.clients, else local.")]
ClientSpeedsOption = Annotated[Optional[str], typer.Option(
    "--client-speeds", help="Relative compute speed per client in (0, 1], e.g. 1,0.5,0.5 (cycles): a round's "
    "compute takes natural time / speed.")]
ClientBandwidthOption = Annotated[Optional[str], typer.Option(
    "--client-bandwidth", help="Link bytes/s per client, both directions, e.g. 1e9,5e7 (cycles; 0 = unlimited).")]
ClientUplinkOption = Annotated[Optional[str], typer.Option(
    "--client-uplink", help="Uplink bytes/s per client (cycles; overrides --client-bandwidth).")]
ClientDownlinkOption = Annotated[Optional[str], typer.Option(
    "--client-downlink", help="Downlink bytes/s per client (cycles; overrides --client-bandwidth).")]
ClientLatencyOption = Annotated[Optional[str], typer.Option(
    "--client-latency-ms", help="Link latency per client, ms per exchange (cycles).")]
ClientLossOption = Annotated[Optional[str], typer.Option(
    "--client-packet-loss", help="Packet loss per client in [0, 1) (cycles).")]
SharesOption = Annotated[str, typer.Option(
    "--shares", help=f"How the global batch is split: {' | '.join(SHARE_MODES)} (proportional: by each "
    "client's measured throughput, re-planned on membership changes and every --replan-every steps).")]
ReplanEveryOption = Annotated[int, typer.Option(
    "--replan-every", help="Steps between re-plans of proportional shares.")]


def profile_flags(profiles: str | None, speeds: str | None, bandwidth: str | None, uplink: str | None,
                  downlink: str | None, latency_ms: str | None, packet_loss: str | None) -> ProfileFlags:
    """The per-client profile lists as given (ConfigError on a malformed list; the values are checked
    by `run/profiles.client_profiles`)."""
    names = [p.strip() for p in profiles.split(",") if p.strip()] if profiles else []
    return ProfileFlags(profiles=names, speeds=parse_float_list(speeds, "--client-speeds"),
                        bandwidth=parse_float_list(bandwidth, "--client-bandwidth"),
                        uplink=parse_float_list(uplink, "--client-uplink"),
                        downlink=parse_float_list(downlink, "--client-downlink"),
                        latency_ms=parse_float_list(latency_ms, "--client-latency-ms"),
                        packet_loss=parse_float_list(packet_loss, "--client-packet-loss"))

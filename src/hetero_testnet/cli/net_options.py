"""Flags of the fault-tolerance and networking options shared by `start`, `coordinator` and `client`.

What they mean and their rules live in `run/plan.py` (`check_recovery_and_network`); README
"Security and networks" says what the token protects and what it does not.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hetero_testnet.run.plan import DEFAULT_AUTO_CHECKPOINT_EVERY

__all__ = ["DEFAULT_AUTO_CHECKPOINT_EVERY", "AutoCheckpointOption", "AdvertiseHostOption", "GlooIfnameOption",
           "PacketLossOption"]

AutoCheckpointOption = Annotated[int, typer.Option(
    "--auto-checkpoint-every", help="Recovery checkpoint every K steps, written in the background by one member; "
    "when every client holding the current state is lost at once the run rewinds there and replays (0 = off).")]
AdvertiseHostOption = Annotated[Optional[str], typer.Option(
    "--advertise-host", help="Address clients are told to reach the rendezvous store at (with --bind 0.0.0.0; "
    "default: the bind address, or the hostname for 0.0.0.0).")]
GlooIfnameOption = Annotated[Optional[str], typer.Option(
    "--gloo-ifname", help="Network interface(s) for gloo's sockets, e.g. wg0 (sets GLOO_SOCKET_IFNAME for the "
    "clients).")]
PacketLossOption = Annotated[float, typer.Option(
    "--fault-packet-loss", help="Probability a packet of each exchange is lost, in [0, 1): emulated as one "
    "retransmission round trip per lost packet (the summary says so).")]

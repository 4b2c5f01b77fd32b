"""Flags of `testnet start` that choose and configure the engine that runs the clients.

What they mean and their rules live in `run/cluster.py`; docs/cluster.md is the guide (a Ray
cluster on two machines, KubeRay, `testnet client` by hand, and what is secured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hetero_testnet.run.cluster import INSTALL_RAY

EngineOption = Annotated[str, typer.Option(
    "--engine", help=f"local (clients are subprocesses of this command) | ray (each client is a Ray actor on "
    f"the cluster at --address, restarted by Ray after a failure; needs `{INSTALL_RAY.replace('[', chr(92) + '[')}`; "
    "docs/cluster.md).")]
AddressOption = Annotated[Optional[str], typer.Option(
    "--address", help="ray: the cluster: auto (the one this machine is part of, or RAY_ADDRESS), HOST:PORT of "
    "its GCS, or ray://HOST:10001 (default auto).")]
ClientResourcesOption = Annotated[Optional[str], typer.Option(
    "--client-resources", help="ray: what each tier's actors ask for, e.g. tier0=GPU:1,tier1=CPU:2 (join several "
    "with +; other names are custom resources; default CPU:<threads>).")]
DataDirOption = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="ray: where the clients' nodes hold the shards (default: the head's paths, e.g. a shared "
    "mount); checked against the head's SHA-256 before each client starts.")]
ShipDataOption = Annotated[bool, typer.Option(
    "--ship-data", help="ray: send the head's shards to the clients' nodes through Ray's object store (small "
    "data sets), checked the same way.")]

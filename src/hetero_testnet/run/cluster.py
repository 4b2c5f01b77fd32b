"""Which engine runs the clients, and the checked settings of the Ray engine (`--engine ray`).

`local` (the default) is the launcher's own subprocesses. `ray` runs each client as a Ray core actor
(`run/ray_engine.py`): placed by resources, restarted by Ray after a failure, rejoining by client id.
Everything here is pure planning: it parses `--client-resources`, checks the flags against each other
and finds out whether Ray is installed without importing it (the CLI must start without Ray), so every
rule is unit-tested without a cluster. Bad input raises `ConfigError` with one line naming the flag.

`--client-resources` maps tiers to what each client's actor asks Ray for:
`tier0=GPU:1,tier1=CPU:2` (a tier's resources joined by `+`: `tier0=GPU:1+CPU:4`; any other name is a
custom resource, e.g. `tier1=edge:1` for nodes started with `ray start --resources '{"edge": 4}'`).
A tier that names no `CPU` asks for `--threads` CPUs; a tier not named asks for `CPU:<threads>` only.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero_testnet.errors import ConfigError

ENGINES = ("local", "ray")
INSTALL_RAY = "pip install 'hetero-testnet[ray]'"
"""The one command that makes `--engine ray` available."""
DEFAULT_ADDRESS = "auto"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Coordinator addresses that only this machine can reach."""
_ENTRY = re.compile(r"^tier(\d+)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")


@dataclass(frozen=True)
class ActorResources:
    """What one client's actor asks Ray for (Ray's `num_cpus`, `num_gpus` and custom `resources`)."""

    num_cpus: float | None = None
    """None: the client's `--threads`."""
    num_gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def ray_options(self, threads: int) -> dict[str, Any]:
        """`ActorClass.options(...)` keywords for a client with `threads` torch threads."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus if self.num_cpus is not None else float(threads)}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts


@dataclass(frozen=True)
class EnginePlan:
    """The engine part of a `LaunchPlan` (local mode: the defaults, nothing else is read)."""

    name: str = "local"
    address: str = DEFAULT_ADDRESS
    """`auto` (the cluster this machine belongs to, or RAY_ADDRESS), `HOST:PORT` or `ray://HOST:10001`."""
    resources: dict[int, ActorResources] = field(default_factory=dict)
    """tier -> its actors' resources (`--client-resources`)."""
    data_dir: str | None = None
    """Where the clients' nodes hold the shards (`--data-dir`; None: the head's paths, e.g. a shared mount)."""
    ship_data: bool = False
    """The head ships its shards through Ray's object store (`--ship-data`)."""
    manifest: dict[str, Any] | None = None
    """The head's shards and their SHA-256 (`data/fingerprint.py`), checked by every actor before it starts."""

    @property
    def is_ray(self) -> bool:
        return self.name == "ray"

    def resources_for(self, tier: int) -> ActorResources:
        return self.resources.get(tier, ActorResources())


def ray_installed() -> bool:
    """Whether Ray can be imported, found without importing it (importing Ray takes seconds)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    """ConfigError naming the install command when Ray is missing."""
    if not ray_installed():
        raise ConfigError(f"--engine ray needs Ray, which is not installed: {INSTALL_RAY}")


def parse_amount(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--client-resources: {where} needs a number after ':' (got {text!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--client-resources: {where} must be a positive amount (got {text!r})")
    return value


def _one_tier(entry: str, resources: str) -> ActorResources:
    amounts: dict[str, float] = {}
    for part in resources.split("+"):
        name, sep, amount = part.strip().partition(":")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ConfigError(f"--client-resources: {entry} must list RESOURCE:AMOUNT joined by '+' "
                              f"(got {part.strip()!r}), e.g. tier0=GPU:1+CPU:4")
        key = name.upper() if name.upper() in ("CPU", "GPU") else name
        if key in amounts:
            raise ConfigError(f"--client-resources: {entry} names {key} twice")
        amounts[key] = parse_amount(amount.strip(), f"{entry} {name}")
    cpus, gpus = amounts.pop("CPU", None), amounts.pop("GPU", 0.0)
    return ActorResources(num_cpus=cpus, num_gpus=gpus, custom=amounts)


def parse_client_resources(text: str | None) -> dict[int, ActorResources]:
    """`tier0=GPU:1,tier1=CPU:2+edge:1` -> {0: ..., 1: ...}; None or empty -> {}."""
    if text is None or not text.strip():
        return {}
    out: dict[int, ActorResources] = {}
    for entry in text.split(","):
        key, sep, resources = entry.strip().partition("=")
        m = _ENTRY.match(key.strip())
        if not sep or m is None or not resources.strip():
            raise ConfigError("--client-resources entries must be tierN=RESOURCE:AMOUNT[+...] "
                              f"(got {entry.strip()!r}), e.g. tier0=GPU:1,tier1=CPU:2")
        tier = int(m.group(1))
        if tier in out:
            raise ConfigError(f"--client-resources names tier{tier} twice")
        out[tier] = _one_tier(key.strip(), resources)
    return out


def check_address(address: str) -> str:
    """`auto`, `HOST:PORT` or `ray://HOST[:PORT]`; ConfigError otherwise."""
    address = address.strip()
    if address == "auto":
        return address
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    ok = bool(rest) and "/" not in rest and (not sep and address.startswith("ray://") or (host and port.isdigit()))
    if not ok:
        raise ConfigError(f"--address must be auto, HOST:PORT (a Ray GCS) or ray://HOST:10001 (got {address!r})")
    return address


def plan_engine(*, engine: str, address: str | None, client_resources: str | None, data_dir: Path | None,
                ship_data: bool, tiers: list[int], data: Any = None) -> EnginePlan:
    """Check the engine flags and plan the engine; ConfigError (exit 2) on bad input.

    `tiers` are the clients' tiers (a `--client-resources` entry for a tier no client has is a
    mistake); `data` is the run config's DataConfig, fingerprinted for `--engine ray` (reads every
    shard once). Ray-only flags with `--engine local` are refused rather than ignored.
    """
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if engine == "local":
        used = [flag for flag, value in (("--address", address), ("--client-resources", client_resources),
                                         ("--data-dir", data_dir), ("--ship-data", ship_data or None)) if value]
        if used:
            raise ConfigError(f"{', '.join(used)} only appl{'y' if len(used) > 1 else 'ies'} to --engine ray")
        return EnginePlan()
    require_ray()
    address = check_address(address or DEFAULT_ADDRESS)
    resources = parse_client_resources(client_resources)
    unknown = sorted(set(resources) - set(tiers))
    if unknown:
        raise ConfigError(f"--client-resources names tier{unknown[0]}, but the clients' tiers are "
                          f"{','.join(map(str, sorted(set(tiers))))}")
    if ship_data and data_dir is not None:
        raise ConfigError("--ship-data and --data-dir exclude each other: the shipped shards go to a directory "
                          "of the clients' nodes")
    manifest = None
    if data is not None:
        from hetero_testnet.data.fingerprint import check_shippable, manifest_for

        found = manifest_for(data)
        if ship_data:
            check_shippable(found)
        manifest = found.to_dict()
    return EnginePlan(name="ray", address=address, resources=resources,
                      data_dir=str(data_dir) if data_dir is not None else None, ship_data=ship_data, manifest=manifest)

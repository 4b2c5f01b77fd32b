"""The command line's `--sync` and its mode flags, applied on top of the config's `sync:` section.

`testnet start` and `testnet coordinator` take `--sync` (default: the config's mode, which is
allreduce unless the config says otherwise or is a Psyche `optimizer.Distro`), and per mode:
`--demo-topk/-chunk/-decay/-1bit/-values/-apply` and `--inner-steps/--outer-lr/--outer-momentum/
--diloco-bf16`. A flag of another mode than the run's is a one-line `ConfigError` (it would be
silently ignored otherwise). The result is the run's `RunConfig`, whose `sync` section the launcher
writes to the run's `config.yaml`, so coordinator and clients read one source.

Checked here, before anything is spawned (exit 2): under demo every client's tier must have an FFN
width that is a whole number of DeMo blocks (`exchange/demo_stepper.check_demo_tiers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hetero_testnet.config import SYNC_MODES, RunConfig, SyncConfig
from hetero_testnet.errors import ConfigError

_FLAGS: dict[str, tuple[str, str, str]] = {
    "demo_topk": ("demo", "topk", "--demo-topk"),
    "demo_chunk": ("demo", "chunk", "--demo-chunk"),
    "demo_decay": ("demo", "decay", "--demo-decay"),
    "demo_1bit": ("demo", "quantize_1bit", "--demo-1bit"),
    "demo_values": ("demo", "values", "--demo-values"),
    "demo_apply": ("demo", "apply", "--demo-apply"),
    "inner_steps": ("diloco", "inner_steps", "--inner-steps"),
    "outer_lr": ("diloco", "outer_lr", "--outer-lr"),
    "outer_momentum": ("diloco", "outer_momentum", "--outer-momentum"),
    "diloco_bf16": ("diloco", "bf16", "--diloco-bf16"),
}
"""attribute -> (mode it belongs to, field of that mode's config section, the flag's name)."""


@dataclass(frozen=True)
class SyncFlags:
    """The flags as given; None means not given (the config's value stays)."""

    sync: str | None = None
    demo_topk: int | None = None
    demo_chunk: int | None = None
    demo_decay: float | None = None
    demo_1bit: bool | None = None
    demo_values: str | None = None
    demo_apply: str | None = None
    inner_steps: int | None = None
    outer_lr: float | None = None
    outer_momentum: float | None = None
    diloco_bf16: bool | None = None

    def given(self) -> dict[str, Any]:
        return {a: getattr(self, a) for a in _FLAGS if getattr(self, a) is not None}


def check_sync(sync: str) -> str:
    if sync not in SYNC_MODES:
        raise ConfigError(f"--sync must be one of {', '.join(SYNC_MODES)} (got {sync!r})")
    return sync


def apply_sync_flags(cfg: RunConfig, flags: SyncFlags, *, resumed: bool = False) -> RunConfig:
    """`cfg` with the flags' mode and settings; `ConfigError` naming the flag for a bad value, a flag
    of another mode, or (`resumed`) a `--sync` that differs from the resumed run's."""
    mode = cfg.sync.mode if flags.sync is None else check_sync(flags.sync)
    if resumed and mode != cfg.sync.mode:
        raise ConfigError(f"--resume continues a --sync {cfg.sync.mode} run; drop --sync {mode} "
                          f"(its optimizer state would not fit)")
    changes: dict[str, dict[str, Any]] = {"demo": {}, "diloco": {}}
    for attr, value in flags.given().items():
        owner, name, flag = _FLAGS[attr]
        if owner != mode:
            raise ConfigError(f"{flag} applies to --sync {owner}, but this run's sync is {mode}")
        changes[owner][name] = value
    try:
        sync = SyncConfig(mode=mode, demo=dataclasses.replace(cfg.sync.demo, **changes["demo"]),
                          diloco=dataclasses.replace(cfg.sync.diloco, **changes["diloco"]))
    except ConfigError as e:
        flag_names = ", ".join(_FLAGS[a][2] for a in flags.given()) or "--sync"
        raise ConfigError(f"{e} ({flag_names})") from None
    return cfg.replace(sync=sync)


def check_sync_tiers(cfg: RunConfig, tiers: Iterable[int]) -> None:
    """Under demo, every tier's FFN width must be a whole number of DeMo blocks (one-line `ConfigError`)."""
    if cfg.sync.mode != "demo":
        return
    from hetero_testnet.exchange.demo_stepper import check_demo_tiers  # torch: only when needed

    check_demo_tiers(cfg, tiers)

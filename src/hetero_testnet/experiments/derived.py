"""The run config each configuration of an experiment starts from, and the identity a finished run keeps.

One derived config per experiment (the base config with the experiment's steps, eval settings and
deadlines; the LR schedule never changes) and, for a configuration that sets its own global batch,
device profiles or sync settings, a config of its own with those applied on top. A configuration that
sets none of them shares the experiment's config, so its fingerprint (and with it the identity of its
finished runs) is what it was before these fields existed: runs recorded by an older checkout, or by
another experiment with the same base (`reuse:`), are still recognised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from hetero_testnet.config import DemoSyncConfig, DiLoCoConfig, RunConfig, load_run_config
from hetero_testnet.config.devices import DevicesConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.spec import DERIVED_CONFIG_FILE, Configuration, ExperimentSpec, PlannedRun

SYNC_SETTINGS = {"demo": DemoSyncConfig, "diloco": DiLoCoConfig}
"""The sync modes with settings, and the config section (`sync.<mode>`) each configuration may set."""


def build_derived_config(spec: ExperimentSpec) -> RunConfig:
    """The base config with `total_steps = steps`, eval_every and deadlines set; the LR schedule untouched."""
    cfg = load_run_config(spec.base_config)
    cfg = cfg.replace(timing=dataclasses.replace(cfg.timing, total_steps=spec.steps, **spec.deadlines))
    if spec.eval_every is not None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_every=spec.eval_every))
    if spec.eval_tiers:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_tiers=spec.eval_tiers))
    return cfg


def with_global_batch(cfg: RunConfig, global_batch: int | None) -> RunConfig:
    """`cfg` with a constant global batch of `global_batch` sequences (None: unchanged)."""
    if global_batch is None:
        return cfg
    return cfg.replace(timing=dataclasses.replace(cfg.timing, global_batch_size_start=global_batch,
                                                  global_batch_size_end=global_batch))


def configuration_config(cfg: RunConfig, c: Configuration) -> RunConfig:
    """The derived config `cfg` with `c`'s global batch, device profiles and sync settings applied.

    Raises ConfigError for a profile the config does not know or a sync setting its mode rejects."""
    cfg = with_global_batch(cfg, c.global_batch)
    if c.devices:
        cfg = cfg.replace(devices=DevicesConfig(profiles=cfg.devices.profiles, clients=c.devices))
    if c.sync_settings:
        kind = SYNC_SETTINGS[c.sync]
        current = getattr(cfg.sync, c.sync)
        try:
            settings = dataclasses.replace(current, **c.sync_settings)
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(kind))
            raise ConfigError(f"configuration {c.label!r}: sync_settings for {c.sync} may set {known} "
                              f"(got {', '.join(sorted(c.sync_settings))})") from None
        cfg = cfg.replace(sync=dataclasses.replace(cfg.sync, mode=c.sync, **{c.sync: settings}))
    return cfg


def has_own_config(c: Configuration) -> bool:
    """True when `c` changes the experiment's derived config (and so gets a file of its own)."""
    return c.global_batch is not None or bool(c.devices) or bool(c.sync_settings)


def derived_config_name(label: str | None) -> str:
    """The derived config file of a configuration with a config of its own (None: the shared one)."""
    return DERIVED_CONFIG_FILE if label is None else f"experiment-config-{label}.yaml"


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything in the config that changes results (data paths excluded, so a moved
    checkout still recognises its finished runs)."""
    d = cfg.to_dict()
    d["model"]["LLM"].pop("data_location", None)
    d["validation"].pop("data_location", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(run: PlannedRun, fingerprint: str) -> dict[str, Any]:
    """What a finished run must match to be skipped on resume, or taken from another experiment."""
    return {**run.to_dict(), "config_fingerprint": fingerprint}


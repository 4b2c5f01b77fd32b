"""The `--sync` modes: each is a strategy (the collective, `strategies.py`) and a stepper (what a
client does with a round, `stepper.py`). A new mode is a strategy and a stepper plus one line in
`STEPPERS` and `strategies.SYNC_STRATEGIES`; `config.SYNC_MODES` names the same modes for the
layers that must not import torch (a unit test keeps the three equal)."""

from __future__ import annotations

from typing import Any

from hetero_testnet.config import RunConfig
from hetero_testnet.exchange.demo_stepper import DemoStepper
from hetero_testnet.exchange.diloco_stepper import DiLoCoStepper
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.exchange.group import GradientExchange
from hetero_testnet.exchange.stepper import AllReduceStepper, Stepper
from hetero_testnet.exchange.strategies import build_sync
from hetero_testnet.model.nanogpt import NanoGPT

STEPPERS: dict[str, type[Stepper]] = {
    "allreduce": AllReduceStepper,
    "none": AllReduceStepper,
    "demo": DemoStepper,
    "diloco": DiLoCoStepper,
}


def build_stepper(mode: str, model: NanoGPT, cfg: RunConfig, exchange: GradientExchange | None,
                  faults: NetworkFaults | None = None, **client: Any) -> Stepper:
    """The stepper of `mode` around its strategy on `exchange`; `client`: tier, helper_fraction,
    rotation_interval. `ConfigError` for an unknown mode (from `build_sync`) or, under demo, a tier
    whose FFN width is not a whole number of DeMo blocks."""
    sync = build_sync(mode, exchange, faults)
    return STEPPERS[mode](model, cfg, sync, **client)

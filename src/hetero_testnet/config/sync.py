"""How replicas share their updates: the `--sync` mode and the settings of `demo` and `diloco`.

- `allreduce` (default): one shared model; every step the exact masked, token-weighted average of
  the clients' gradients (one all-reduce), then the optimizer (`optimizer: AdamW | SGD`).
- `none`: independent replicas, no exchange (ablations only).
- `demo`: DeMo (Peng et al., arXiv:2411.19870) as Psyche's DisTrO runs it: a local decoupled
  momentum, DCT + top-k of it sent as one small byte payload, sign-SGD on the decoded mean. The
  `optimizer` table then gives only `weight_decay` and `clip_grad_norm` (the local clip).
  Psyche's `optimizer.Distro` table selects it (`compression_*`, `quantize_1bit`).
- `diloco`: DiLoCo (Douillard et al., arXiv:2311.08105; OpenDiLoCo's defaults): each round is
  `inner_steps` local steps of the `optimizer` per client, then one exact masked average of the
  pseudo-gradients theta_global - theta_local and a Nesterov outer step.

Counting under `diloco`: `total_steps` and the LR schedule count *inner* steps, the optimizer
steps each client takes, exactly as under `allreduce`; a round covers `inner_steps` of them and
consumes `inner_steps` global batches. So a diloco run and an allreduce run of the same
`total_steps` train on the same tokens with the same inner LR schedule; diloco talks once per
round instead of every step. The outer step has its own constant `outer_lr`.

These are hetero-testnet's own fields (section `sync:` of the YAML); `run/plan.py` applies the
command line's `--sync` and `--demo-*` / `--inner-steps` / `--outer-*` flags on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hetero_testnet.errors import ConfigError

SYNC_MODES = ("allreduce", "none", "demo", "diloco")
"""Every `--sync` value (the registry in `exchange/strategies.py` implements exactly these)."""
DEMO_VALUE_DTYPES = ("float32", "bfloat16")
DEMO_APPLY_MODES = ("sign", "raw")


def shares_model(mode: str) -> bool:
    """True when the replicas hold one shared model (checksums compared every step): all but `none`."""
    return mode != "none"


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSyncConfig:
    """`--sync demo`; Psyche's `optimizer.Distro` names in brackets."""

    topk: int = 32
    """Coefficients sent per DCT block (compression_topk); capped at the block size."""
    chunk: int = 64
    """Largest DCT block side (compression_chunk); FFN blocks must divide the smallest tier's width."""
    decay: float = 0.999
    """beta of the local momentum `delta = beta * delta + lr * g` (compression_decay)."""
    quantize_1bit: bool = False
    """Send only the signs of the picked coefficients (quantize_1bit)."""
    values: str = "float32"
    """Wire dtype of the values without 1-bit: float32 or bfloat16 (Psyche sends the parameter dtype)."""
    apply: str = "sign"
    """sign: p -= lr * sign(decoded) (DeMo, Psyche); raw: p -= decoded (an ablation: plain SGD on the
    decoded momentum, which already carries the lr)."""

    def __post_init__(self) -> None:
        for name in ("topk", "chunk"):
            value = getattr(self, name)
            _require(not isinstance(value, bool) and isinstance(value, int) and value >= 1,
                     f"sync.demo.{name} must be an integer >= 1 (got {value!r})")
        _require(0.0 <= self.decay < 1.0, f"sync.demo.decay must be in [0, 1) (got {self.decay!r})")
        _require(self.values in DEMO_VALUE_DTYPES,
                 f"sync.demo.values must be one of {', '.join(DEMO_VALUE_DTYPES)} (got {self.values!r})")
        _require(self.apply in DEMO_APPLY_MODES,
                 f"sync.demo.apply must be one of {', '.join(DEMO_APPLY_MODES)} (got {self.apply!r})")


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """`--sync diloco`: inner steps per round and the outer Nesterov SGD (OpenDiLoCo's defaults)."""

    inner_steps: int = 8
    """H: local optimizer steps per round (the last round of a run may be shorter)."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    bf16: bool = False
    """All-reduce the pseudo-gradients as bfloat16 (half the bytes; the sum is rounded to bf16)."""

    def __post_init__(self) -> None:
        _require(not isinstance(self.inner_steps, bool) and isinstance(self.inner_steps, int)
                 and self.inner_steps >= 1, f"sync.diloco.inner_steps must be an integer >= 1 "
                                            f"(got {self.inner_steps!r})")
        _require(self.outer_lr > 0, f"sync.diloco.outer_lr must be > 0 (got {self.outer_lr!r})")
        _require(0.0 <= self.outer_momentum < 1.0,
                 f"sync.diloco.outer_momentum must be in [0, 1) (got {self.outer_momentum!r})")


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncConfig:
    """The sync mode and the settings of every mode (only the chosen mode's are used)."""

    mode: str = "allreduce"
    demo: DemoSyncConfig = field(default_factory=DemoSyncConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)

    def __post_init__(self) -> None:
        _require(self.mode in SYNC_MODES, f"--sync (sync.mode) must be one of {', '.join(SYNC_MODES)} "
                                          f"(got {self.mode!r})")

    @property
    def inner_steps(self) -> int:
        """Optimizer steps per round: `diloco.inner_steps` under diloco, else 1."""
        return self.diloco.inner_steps if self.mode == "diloco" else 1

    def to_dict(self) -> dict:
        return {"mode": self.mode, "demo": dataclasses.asdict(self.demo), "diloco": dataclasses.asdict(self.diloco)}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)

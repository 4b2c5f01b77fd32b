"""The run configuration as frozen, validated dataclasses (what every layer reads).

Each class validates itself in `__post_init__` and raises `ConfigError` naming the field, so a
config that exists is a valid one, however it was made (file, CLI override, test).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero_testnet.config.devices import DevicesConfig
from hetero_testnet.config.sync import SyncConfig
from hetero_testnet.errors import ConfigError

CONFIG_FILE_NAMES = ("config.yaml", "config.yml", "state.toml")
DIRECTORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
"""Names that become one directory under logs/ (runs, experiments, labels): no separators, no `..`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """LLaMA-style NanoGPT dimensions (Hugging Face Llama names)."""

    vocab_size: int = 50257
    """GPT-2 vocabulary; token ids must be below it."""
    hidden_size: int = 256
    intermediate_size: int = 1024
    """FFN width of tier 0; tier t computes the first `intermediate_size >> t` neurons."""
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    max_seq_len: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_seq_len"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 "model.hidden_size must be divisible by model.num_attention_heads")
        _require((self.hidden_size // self.num_attention_heads) % 2 == 0,
                 "model head dim (hidden_size / num_attention_heads) must be even for RoPE")
        _require(self.rms_norm_eps > 0 and self.init_std > 0 and self.rope_theta > 0,
                 "model.rms_norm_eps, init_std and rope_theta must be > 0")


LR_SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    "Constant": ("base_lr", "warmup_steps", "warmup_init_lr"),
    "Linear": ("base_lr", "warmup_steps", "warmup_init_lr", "total_steps", "final_lr"),
    "Cosine": ("base_lr", "warmup_steps", "warmup_init_lr", "total_steps", "final_lr"),
    "WarmupStableDecay": ("base_lr", "warmup_steps", "warmup_init_lr", "stable_steps", "cosine_decay_steps",
                          "cosine_decay_final_lr", "linear_decay_steps", "linear_decay_final_lr"),
}
"""Psyche's `LearningRateSchedule` variants (psyche_core `definitions.rs`) and the fields each one has."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LRScheduleConfig:
    """Psyche's learning-rate schedules, indexed by Psyche's 1-based step (`model.optim.lr_at` has the
    formulas; this tool's 0-based step s trains at `step_lr(s) = lr_at(s + 1)`):
    `kind` is Constant, Linear, Cosine or WarmupStableDecay; each reads the fields
    `LR_SCHEDULE_FIELDS[kind]` names, the others keep their defaults."""

    kind: str = "Cosine"
    base_lr: float = 6.0e-4
    warmup_steps: int = 50
    warmup_init_lr: float = 0.0
    total_steps: int = 100
    final_lr: float = 6.0e-5
    stable_steps: int = 0
    """WarmupStableDecay: steps at base_lr after the warmup."""
    cosine_decay_steps: int = 0
    cosine_decay_final_lr: float = 0.0
    linear_decay_steps: int = 0
    linear_decay_final_lr: float = 0.0

    def __post_init__(self) -> None:
        _require(self.kind in LR_SCHEDULE_FIELDS,
                 f"lr_schedule must be one of {', '.join(LR_SCHEDULE_FIELDS)} (got {self.kind!r})")
        for name in ("stable_steps", "cosine_decay_steps", "linear_decay_steps"):
            _require(getattr(self, name) >= 0, f"lr_schedule.{name} must be >= 0")
        _require(self.base_lr > 0, "lr_schedule.base_lr must be > 0")
        _require(self.warmup_steps >= 0, "lr_schedule.warmup_steps must be >= 0")
        _require(self.total_steps >= 1, "lr_schedule.total_steps must be >= 1")
        _require(self.final_lr >= 0 and self.warmup_init_lr >= 0,
                 "lr_schedule.final_lr and warmup_init_lr must be >= 0")


OPTIMIZER_KINDS = ("AdamW", "SGD")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW as in Psyche's `[model.LLM.optimizer.AdamW]`, or plain SGD (`optimizer: {SGD: {...}}`,
    ours: `p -= lr * g` with the same decoupled weight decay and masks); clip is by global L2 norm
    (0 = off). Under `--sync demo` only `weight_decay` and `clip_grad_norm` are read (sync.py)."""

    kind: str = "AdamW"
    """AdamW or SGD (SGD reads only weight_decay and clip_grad_norm)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1.0e-8
    clip_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.kind in OPTIMIZER_KINDS, f"optimizer must be one of {', '.join(OPTIMIZER_KINDS)} "
                                               f"(got {self.kind!r})")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 "optimizer.betas must be two numbers in [0, 1)")
        _require(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _require(self.eps > 0, "optimizer.eps must be > 0")
        _require(self.clip_grad_norm >= 0, "optimizer.clip_grad_norm must be >= 0 (0 disables)")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where training and validation tokens come from."""

    train_dir: Path
    """Directory of `*.bin` shards (modded-nanogpt header or raw uint16)."""
    train_pattern: str = "*_train_*.bin"
    """Glob selecting training shards in `train_dir`, read in name order."""
    val_dir: Path | None = None
    """Directory of validation shards; defaults to `train_dir`."""
    val_pattern: str = "*_val_*.bin"
    val_samples: int = 32
    """Held-out sequences every validation uses (the same ones every time)."""
    eval_every: int = 0
    """Validate the full model and every tier present every N steps (0 = only at the end)."""
    eval_tiers: tuple[int, ...] = ()
    """Tiers validated even if no client trains them (e.g. the tier-1 submodel of a 0,0,0 run)."""

    def __post_init__(self) -> None:
        _require(self.val_samples >= 1, "validation.num_samples must be >= 1")
        _require(self.eval_every >= 0, "validation.eval_every must be >= 0")
        _require(all(isinstance(t, int) and t >= 0 for t in self.eval_tiers),
                 "validation.tiers must be integers >= 0")

    @property
    def resolved_val_dir(self) -> Path:
        return self.val_dir if self.val_dir is not None else self.train_dir


@dataclass(frozen=True, kw_only=True, slots=True)
class RunTimingConfig:
    """Psyche's `[config]` table. Times are deadlines for stragglers, never waits."""

    warmup_time: float = 5.0
    cooldown_time: float = 5.0
    max_round_train_time: float = 30.0
    """A round not reported by every member within this many seconds is discarded."""
    round_witness_time: float = 3.0
    epoch_time: float = 60.0
    total_steps: int = 100
    min_clients: int = 3
    init_min_clients: int = 3
    global_batch_size_start: int = 12
    global_batch_size_end: int = 12
    global_batch_size_warmup_tokens: int = 0
    verification_percent: int = 0
    witness_nodes: int = 1
    waiting_for_members_extra_time: float = 3.0
    waiting_for_members_timeout: float = 120.0
    """Ours: how long a run below `min_clients` waits for members before it fails."""

    def __post_init__(self) -> None:
        _require(self.total_steps >= 1, "config.total_steps must be >= 1")
        _require(self.min_clients >= 1, "config.min_clients must be >= 1")
        _require(self.init_min_clients >= self.min_clients,
                 "config.init_min_clients must be >= config.min_clients")
        _require(self.global_batch_size_start >= 1 and self.global_batch_size_end >= 1,
                 "config.global_batch_size_start/_end must be >= 1")
        _require(self.global_batch_size_warmup_tokens >= 0,
                 "config.global_batch_size_warmup_tokens must be >= 0")
        for name in ("warmup_time", "cooldown_time", "max_round_train_time", "epoch_time",
                     "waiting_for_members_timeout"):
            _require(getattr(self, name) > 0, f"config.{name} must be > 0")

    def global_batch_size(self, tokens_seen: int) -> int:
        """Sequences per step; ramps linearly start -> end over the warmup tokens (Psyche)."""
        if self.global_batch_size_warmup_tokens == 0 or tokens_seen >= self.global_batch_size_warmup_tokens:
            return self.global_batch_size_end
        frac = tokens_seen / self.global_batch_size_warmup_tokens
        start, end = self.global_batch_size_start, self.global_batch_size_end
        return max(1, round(start + (end - start) * frac))


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything a run needs; `source` is the file it came from (for logs)."""

    run_id: str
    seed: int = 1337
    """Initial weights, helper draws and (unless `data_seed` is set) the order of the training samples."""
    data_seed: int | None = None
    """Seeds the order of the training samples (`data/order.py`); None: the run's `seed`."""
    timing: RunTimingConfig = field(default_factory=RunTimingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    """How replicas share updates (`--sync`); see config/sync.py."""
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    """Named device profiles and each client's (`devices:`; config/devices.py)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass inside a client (0 = the whole local batch at once)."""
    source: Path | None = None
    init_checkpoint: Path | None = None
    """The checkpoint a new run starts from (Psyche's `model.LLM.checkpoint` repo_id, when it names a local
    checkpoint directory); None: the model is built from the seed. The plan takes its model shape."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Warnings about the file it came from (Psyche fields with no effect here, fields nobody knows):
    `config.psyche.config_warning` words them; the CLI prints them once."""

    def __post_init__(self) -> None:
        _require(bool(self.run_id), "run_id must not be empty")
        _require(self.micro_batch_size >= 0, "model.LLM.micro_batch_size must be >= 0")

    @property
    def data_order_seed(self) -> int:
        """The seed of the training-sample order this run uses."""
        return self.seed if self.data_seed is None else self.data_seed

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_total_steps(self, total_steps: int) -> "RunConfig":
        """Change the run length; the LR schedule's horizon follows (as Psyche configs keep them equal)."""
        if total_steps < 1:
            raise ConfigError(f"--total-steps must be >= 1 (got {total_steps})")
        return self.replace(
            timing=dataclasses.replace(self.timing, total_steps=total_steps),
            lr_schedule=dataclasses.replace(self.lr_schedule, total_steps=total_steps),
        )

    def with_data_dir(self, path: str | Path) -> "RunConfig":
        """Train and validate on the shards in `path` (a client on another machine); a relative
        path is taken from the working directory, as a config's `data_location` is from its file."""
        directory = Path(path).expanduser()
        if not directory.is_absolute():
            directory = directory.resolve()
        return self.replace(data=dataclasses.replace(self.data, train_dir=directory, val_dir=directory))

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout again (paths as strings), for `config.yaml` in a run's logs."""
        timing = dataclasses.asdict(self.timing)
        llm: dict[str, Any] = {
            "architecture": "HfNanoGPT",
            "data_type": "Pretraining",
            "max_seq_len": self.model.max_seq_len,
            "micro_batch_size": self.micro_batch_size,
            "data_location": {"Local": str(self.data.train_dir)},
            "train_pattern": self.data.train_pattern,
            "architecture_config": {k: v for k, v in dataclasses.asdict(self.model).items() if k != "max_seq_len"},
            "lr_schedule": {self.lr_schedule.kind: {k: getattr(self.lr_schedule, k)
                                                    for k in LR_SCHEDULE_FIELDS[self.lr_schedule.kind]}},
            "optimizer": {self.optimizer.kind: self._optimizer_fields()},
        }
        if self.init_checkpoint is not None:
            llm["checkpoint"] = {"Hub": {"repo_id": str(self.init_checkpoint)}}
        validation = {
            "data_location": {"Local": str(self.data.resolved_val_dir)},
            "pattern": self.data.val_pattern,
            "num_samples": self.data.val_samples,
            "eval_every": self.data.eval_every,
            "tiers": list(self.data.eval_tiers),
        }
        seeds = {"seed": self.seed} if self.data_seed is None else {"seed": self.seed, "data_seed": self.data_seed}
        devices = {"devices": self.devices.to_dict()} if self.devices != DevicesConfig() else {}
        return {"run_id": self.run_id, **seeds, "config": timing,
                "model": {"LLM": llm}, "validation": validation, "sync": self.sync.to_dict(), **devices}

    def _optimizer_fields(self) -> dict[str, Any]:
        o = self.optimizer
        if o.kind == "SGD":
            return {"weight_decay": o.weight_decay, "clip_grad_norm": o.clip_grad_norm}
        return {"betas": list(o.betas), "weight_decay": o.weight_decay, "eps": o.eps,
                "clip_grad_norm": o.clip_grad_norm}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)

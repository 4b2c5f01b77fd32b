"""Loading a run config: the Psyche layout (YAML or `state.toml`) into `RunConfig`, and finding it.

Relative data paths are resolved against the directory of the config file, so a config
directory can be moved together with its data.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import yaml

from hetero_testnet.config import psyche as _psyche
from hetero_testnet.config.devices import parse_devices
from hetero_testnet.config.fields import ConfigNotes, Fields, dataclass_from, int_tuple, location
from hetero_testnet.config.schema import (CONFIG_FILE_NAMES, DataConfig, LRScheduleConfig, ModelConfig,
                                          OptimizerConfig, RunConfig, RunTimingConfig)
from hetero_testnet.config.sync import DemoSyncConfig, DiLoCoConfig, SyncConfig
from hetero_testnet.errors import ConfigError


PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUNDLED_CONFIGS_DIR = PACKAGE_DIR / "configs"
"""The configs that ship inside the package (the checkout's `configs/` is a link to this folder)."""
DEFAULT_CONFIG = BUNDLED_CONFIGS_DIR / "nanogpt-20m-run"
DEFAULT_DATA_DIR = PACKAGE_DIR / "data" / "sample"
"""The bundled token shards; a config without `data_location` trains on them."""


def resolve_config_path(path: str | Path) -> Path:
    """The one rule for finding a config: the path as given if it exists, else the bundled config of
    that name (`tiny`, `nanogpt-20m-run`, `experiments/smoke.yaml`; a leading `configs/`, as the
    README writes them, is allowed). So `--config-path configs/tiny` works from any directory, in a
    checkout and in an installed wheel alike. A path that is neither is returned unchanged (the caller
    reports it as missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    bundled = BUNDLED_CONFIGS_DIR.joinpath(*parts) if parts else BUNDLED_CONFIGS_DIR
    return bundled if parts and bundled.exists() else path


def find_config_file(path: Path) -> Path:
    """A config file, or the first of CONFIG_FILE_NAMES inside a directory (found by `resolve_config_path`)."""
    path = resolve_config_path(path)
    if path.is_dir():
        for name in CONFIG_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"no {' or '.join(CONFIG_FILE_NAMES)} in config directory {path}")
    if not path.exists():
        raise ConfigError(f"config path {path} does not exist")
    return path


def load_run_config(path: str | Path) -> RunConfig:
    """Load and validate a YAML config or a Psyche `state.toml` (file or directory)."""
    file = find_config_file(Path(path))
    text = _read_text(file)
    try:
        raw = tomllib.loads(text) if file.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        detail = str(e).replace("\n", " ")
        raise ConfigError(f"malformed config {file}: {detail}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {file} must be a mapping at the top level")
    return parse_run_config(raw, base_dir=file.parent.resolve(), source=file, psyche=file.suffix == ".toml")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {file}: {e}") from e


_TIMING_FIELDS = {f.name: (int if f.type in ("int", int) else float) for f in dataclasses.fields(RunTimingConfig)}
_MODEL_FIELDS = {f.name: (int if f.type in ("int", int) else float)
                 for f in dataclasses.fields(ModelConfig) if f.name != "max_seq_len"}
_OPT_FIELDS = {"betas": tuple, "weight_decay": float, "eps": float, "clip_grad_norm": float}
_SGD_FIELDS = {"weight_decay": float, "clip_grad_norm": float}
_DEMO_FIELDS = {"topk": int, "chunk": int, "decay": float, "quantize_1bit": bool, "values": str, "apply": str}
_DILOCO_FIELDS = {"inner_steps": int, "outer_lr": float, "outer_momentum": float, "bf16": bool}


def parse_run_config(raw: dict[str, Any], *, base_dir: Path, source: Path | None = None,
                     psyche: bool = False) -> RunConfig:
    """The RunConfig of a parsed file. `psyche`: a `.toml` read in Psyche mode, where a field neither
    tool knows is a warning (`RunConfig.notes`) rather than an error (config/psyche.py)."""
    top = Fields(raw, "", ConfigNotes(psyche=psyche))
    run_id = top.take("run_id", str)
    seed = top.take("seed", int, 1337)
    data_seed = top.take("data_seed", int, None)
    _psyche.note_no_effect(top, "")
    timing_fields = top.section("config")
    _psyche.note_present(timing_fields, "config", {"verification_percent": 0, "witness_nodes": 1})
    timing = dataclass_from(RunTimingConfig, timing_fields, _TIMING_FIELDS)

    model_section = top.section("model")
    llm = model_section.section("LLM")
    model_section.done()
    _psyche.architecture(llm)
    _psyche.note_no_effect(llm, "model.LLM")
    data_type = llm.take("data_type", str, "Pretraining")
    if data_type != "Pretraining":
        raise ConfigError(f"config field model.LLM.data_type must be Pretraining (got {data_type!r})")
    max_seq_len = llm.take("max_seq_len", int, 512)
    micro_batch_size = llm.take("micro_batch_size", int, 0)
    train_dir = _psyche.data_location(llm, "data_location", base_dir)
    train_pattern = llm.take("train_pattern", str, DataConfig.__dataclass_fields__["train_pattern"].default)
    init_checkpoint = _psyche.checkpoint(llm, base_dir)  # Psyche's initial checkpoint, when it is a local one
    model = dataclass_from(ModelConfig, llm.section("architecture_config"), _MODEL_FIELDS)
    model = dataclasses.replace(model, max_seq_len=max_seq_len)
    lr = _psyche.lr_schedule(llm)
    _psyche.optimizer_defaults(llm)
    opt, distro = _optimizer(llm)
    llm.done()

    val = top.section("validation")
    if train_dir is None:
        train_dir = DEFAULT_DATA_DIR
    val_dir = location(val, "data_location", base_dir, None)
    data = DataConfig(
        train_dir=train_dir,
        train_pattern=train_pattern,
        val_dir=val_dir,
        val_pattern=val.take("pattern", str, DataConfig.__dataclass_fields__["val_pattern"].default),
        val_samples=val.take("num_samples", int, 32),
        eval_every=val.take("eval_every", int, 0),
        eval_tiers=int_tuple(val.take("tiers", list, []), "validation.tiers"),
    )
    val.done()
    sync = _sync(top.section("sync"), distro)
    devices = parse_devices(top.raw.pop("devices", None))
    top.done()
    return RunConfig(run_id=run_id, seed=seed, data_seed=data_seed, timing=timing, model=model, data=data,
                     lr_schedule=lr, optimizer=opt, sync=sync, devices=devices, micro_batch_size=micro_batch_size, source=source,
                     init_checkpoint=init_checkpoint, notes=_psyche.notes_of(top.notes))


def _optimizer(llm: Fields) -> tuple[OptimizerConfig, DemoSyncConfig | None]:
    """`model.LLM.optimizer`: AdamW (Psyche's), SGD (ours) or Distro (Psyche's DisTrO, which means
    `--sync demo`: returned as its `DemoSyncConfig`, with its clip and weight decay in the optimizer)."""
    kind, fields = llm.variant("optimizer", ("AdamW", "SGD", "Distro"))
    if kind in (None, "AdamW"):
        return dataclass_from(OptimizerConfig, fields, _OPT_FIELDS), None
    if kind == "SGD":
        return dataclass_from(OptimizerConfig, fields, _SGD_FIELDS, kind="SGD", weight_decay=0.0), None
    # Psyche's Option<f32> fields: absent means no clipping / no weight decay
    opt = OptimizerConfig(clip_grad_norm=fields.take("clip_grad_norm", float, 0.0),
                          weight_decay=fields.take("weight_decay", float, 0.0))
    d = DemoSyncConfig()
    demo = DemoSyncConfig(decay=fields.take("compression_decay", float, d.decay),
                          topk=fields.take("compression_topk", int, d.topk),
                          chunk=fields.take("compression_chunk", int, d.chunk),
                          quantize_1bit=fields.take("quantize_1bit", bool, d.quantize_1bit))
    fields.done()
    return opt, demo


def _sync(section: Fields, distro: DemoSyncConfig | None) -> SyncConfig:
    """Our `sync:` section; a Psyche `optimizer.Distro` selects mode demo with its settings (then
    `sync.demo` may add only our own `values` and `apply`)."""
    mode = section.take("mode", str, "demo" if distro is not None else "allreduce")
    if distro is not None and mode != "demo":
        raise ConfigError(f"config field model.LLM.optimizer.Distro means sync mode demo, but sync.mode is {mode!r}")
    demo_fields = section.section("demo")
    if distro is not None:
        demo = dataclasses.replace(distro, values=demo_fields.take("values", str, distro.values),
                                   apply=demo_fields.take("apply", str, distro.apply))
        demo_fields.done()
    else:
        demo = dataclass_from(DemoSyncConfig, demo_fields, _DEMO_FIELDS)
    diloco = dataclass_from(DiLoCoConfig, section.section("diloco"), _DILOCO_FIELDS)
    section.done()
    return SyncConfig(mode=mode, demo=demo, diloco=diloco)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)

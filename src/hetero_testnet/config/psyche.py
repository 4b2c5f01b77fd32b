"""Psyche's run configuration (`state.toml`) field by field: what takes effect here and what does not.

The catalogue is Psyche's own source (PsycheFoundation/psyche `0bdb13d`, and the psyche-elastic fork,
which adds `HfNanoGPT`): `Coordinator` (shared/coordinator/src/coordinator.rs: `run_id`, `run_state`,
`model`, `config`, and the runtime state serde fills with defaults: `progress`, `epoch_state`,
`run_state_start_unix_timestamp`, `pending_pause`), `CoordinatorConfig` (the `[config]` table, all
fifteen fields), `Model::LLM` (shared/coordinator/src/model.rs: `max_seq_len`, `cold_start_warmup_steps`,
`architecture`, `checkpoint`, `data_type`, `data_location`, `lr_schedule`, `optimizer`) with the
`Checkpoint`, `LLMTrainingDataLocation`, `LearningRateSchedule` and `OptimizerDefinition` variants
(shared/core/src/definitions.rs).

Taking effect: run_id, every `[config]` time, size and batch field, max_seq_len, data_type Pretraining,
architecture HfLlama/HfNanoGPT (both are this model), data_location Local, a checkpoint repo_id that is a
local checkpoint directory, all four LR schedules, the AdamW optimizer and Distro (config/load.py maps it). Accepted with no effect, each named once in the
warning `config_warning` words: the fields in `NO_EFFECT` and the variants the readers below note.
Psyche's deserializer ignores keys it does not know; so, in a `.toml` read in Psyche mode, does this
tool, naming them in the same warning. In our own YAML such a key stays an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetero_testnet.config.fields import ConfigNotes, Fields
from hetero_testnet.config.schema import LR_SCHEDULE_FIELDS, LRScheduleConfig
from hetero_testnet.errors import ConfigError

NO_EFFECT: dict[str, dict[str, str]] = {
    "": {"run_state": "runs start in WaitingForMembers",
         "progress": "a run starts at step 0; --resume continues one",
         "epoch_state": "runtime state, rebuilt by the coordinator",
         "run_state_start_unix_timestamp": "runtime state",
         "pending_pause": "runtime state; pause with p or SIGUSR1"},
    "config": {"verification_percent": "every replica's parameters are compared at every step",
               "witness_nodes": "the coordinator witnesses every step itself"},
    "model.LLM": {"cold_start_warmup_steps": "only lr_schedule's warmup"},
}
"""Psyche fields accepted with no effect, per section, with what happens here instead."""

ARCHITECTURES = ("HfLlama", "HfNanoGPT")
"""Psyche architectures this model is: Llama-style (Hugging Face Llama names)."""
OTHER_ARCHITECTURES = ("HfDeepseek", "Torchtitan")
REMOTE_DATA = ("Server", "Http", "WeightedHttp", "Preprocessed")
CHECKPOINT_VARIANTS = ("Dummy", "Hub", "P2P", "Gcs", "P2PGcs", "Ephemeral")
_CHECKPOINT_WHY = "not a local checkpoint directory: the initial model comes from the seed; `testnet init` writes it"
LOCAL_CHECKPOINT_FILES = ("model.safetensors", "config.json", "state.json")


def note_no_effect(section: Fields, name: str) -> None:
    """Drop the no-effect Psyche fields of `section` (`NO_EFFECT[name]`), noting the ones present."""
    for key, why in NO_EFFECT.get(name, {}).items():
        section.no_effect(key, why)


def note_present(section: Fields, name: str, defaults: dict[str, Any]) -> None:
    """Note the keys of `section` set to anything but `defaults[key]` (a value that would change what
    Psyche does) as having no effect here; they are still read, into the timing config."""
    for key, default in defaults.items():
        if key in section.raw and section.raw[key] != default:
            section.notes.no_effect.append(f"{section._name(key)} = {section.raw[key]} ({NO_EFFECT[name][key]})")


def architecture(llm: Fields) -> None:
    value = llm.raw.pop("architecture", "HfNanoGPT")
    if value == "HfAuto":
        llm.notes.no_effect.append("model.LLM.architecture HfAuto (the model is this tool's Llama-style NanoGPT)")
    elif value in OTHER_ARCHITECTURES:
        raise ConfigError(f"config field model.LLM.architecture {value} is not supported here: this tool trains "
                          f"a Llama-style NanoGPT ({' or '.join(ARCHITECTURES)})")
    elif value not in ARCHITECTURES:
        raise ConfigError(f"config field model.LLM.architecture must be one of {', '.join(ARCHITECTURES)} "
                          f"(got {value!r})")


def data_location(llm: Fields, key: str, base_dir: Path) -> Path | None:
    """Psyche's `LLMTrainingDataLocation`: `{ Local = "dir" }` (or a plain path) is read; `Dummy` and the
    remote variants are accepted and noted, and the run trains on the bundled sample (None)."""
    if key not in llm.raw:
        return None
    value: Any = llm.raw.pop(key)
    name = llm._name(key)
    kind = value if isinstance(value, str) and value == "Dummy" else None
    if isinstance(value, dict) and len(value) == 1:
        kind, arg = next(iter(value.items()))
        if kind == "Local":
            value = arg
    if kind in ("Dummy", *REMOTE_DATA):
        llm.notes.no_effect.append(f"{name} {kind} (only local shards are read; the bundled sample "
                                   f"trains: set {key} = {{ Local = \"DIR\" }})")
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config field {name} must be {{Local: <directory>}}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def checkpoint(llm: Fields, base_dir: Path) -> Path | None:
    """Psyche's `Checkpoint` (Hub/P2P/Dummy repos, Gcs buckets, Ephemeral). A repo_id naming a local
    checkpoint directory of this tool (model.safetensors, config.json, state.json: what `testnet init`,
    `train` and runs write; relative to the config's folder) takes effect: the run starts from it. Any
    other value is checked and noted: the initial model then comes from the seed."""
    value = llm.raw.pop("checkpoint", None)
    if value is None:
        return None
    kind = value if isinstance(value, str) else (next(iter(value)) if isinstance(value, dict) and len(value) == 1
                                                 else None)
    if kind not in CHECKPOINT_VARIANTS:
        raise ConfigError(f"config field model.LLM.checkpoint must be one of {', '.join(CHECKPOINT_VARIANTS)} "
                          f"(got {value!r})")
    repo = value[kind].get("repo_id") if isinstance(value, dict) and isinstance(value[kind], dict) else None
    if isinstance(repo, str) and repo:
        path = Path(repo).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if all((path / name).is_file() for name in LOCAL_CHECKPOINT_FILES):
            return path
    llm.notes.no_effect.append(f"model.LLM.checkpoint {kind} ({_CHECKPOINT_WHY})")
    return None


def lr_schedule(llm: Fields) -> LRScheduleConfig:
    """Psyche's `LearningRateSchedule`: Constant, Linear, Cosine or WarmupStableDecay, all taking effect."""
    section = llm.section("lr_schedule")
    kind = next(iter(section.raw), "Cosine")
    if len(section.raw) > 1 or kind not in LR_SCHEDULE_FIELDS:
        raise ConfigError(f"config field {section.path} must be one of "
                          f"{' | '.join(f'{{{k}: ...}}' for k in LR_SCHEDULE_FIELDS)} (got {', '.join(section.raw)})")
    fields = section.section(kind)
    defaults = LRScheduleConfig()
    kwargs = {}
    for name in LR_SCHEDULE_FIELDS[kind]:
        default = getattr(defaults, name)
        kwargs[name] = fields.take(name, type(default), default)
    fields.done()
    return LRScheduleConfig(kind=kind, **kwargs)


def optimizer_defaults(llm: Fields) -> None:
    """Psyche's `OptimizerDefinition` as Psyche reads it, before config/load.py maps it: the unit variant
    `optimizer = "Dummy"` is noted (AdamW with this tool's defaults trains), and in Psyche mode an AdamW
    without `clip_grad_norm` (an `Option` there) does not clip."""
    value = llm.raw.get("optimizer")
    if value == "Dummy":
        llm.raw.pop("optimizer")
        llm.notes.no_effect.append("model.LLM.optimizer Dummy (AdamW with this tool's defaults trains)")
    elif llm.notes.psyche and isinstance(value, dict) and isinstance(value.get("AdamW"), dict):
        llm.raw["optimizer"] = {**value, "AdamW": {"clip_grad_norm": 0.0, **value["AdamW"]}}


def config_warning(notes: tuple[str, ...] | list[str], source: Path | None) -> str | None:
    """The one warning line for a config's notes (None when it has none)."""
    return f"{source or 'config'}: {'; '.join(notes)}" if notes else None


def notes_of(notes: ConfigNotes) -> tuple[str, ...]:
    """A config's notes as `RunConfig.notes`: at most one entry per kind."""
    out = []
    if notes.no_effect:
        out.append("Psyche fields with no effect here: " + ", ".join(notes.no_effect))
    if notes.unknown:
        out.append("fields neither Psyche nor this tool knows (ignored): " + ", ".join(notes.unknown))
    return tuple(out)

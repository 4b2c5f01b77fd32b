"""Checkpoints as a Hugging Face-style directory, written atomically, never pickled.

A checkpoint directory holds:
- `model.safetensors`: every parameter under its Hugging Face Llama name, contiguous float32;
- `config.json`: `LlamaConfig` fields (so `LlamaForCausalLM.from_pretrained(dir)` loads it) plus a
  `hetero_testnet` section with the fields Llama lacks (`init_std`);
- `optimizer.safetensors` (optional): `MaskedAdamW.state_dict()`;
- `state.json`: the caller's run state (step, data index, epoch, seed, RNG state as lists, ...).

`parameter_checksum` is the model's bit-exact fingerprint, which replicas compare after every step.

Tensors are read only with `safetensors.torch.load_file` (no `torch.load`, so no code runs on load).
A save goes to a temporary directory beside the target, which then replaces it (an atomic
exchange where the kernel offers one), so an interrupted save never corrupts the previous checkpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hetero_testnet.config import ModelConfig, RunConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.nanogpt import NanoGPT, build_model, count_parameters, uninitialised_model
from hetero_testnet.model.optim import MaskedAdamW

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"


def parameter_checksum(model: torch.nn.Module) -> str:
    """A bit-exact fingerprint of every parameter: any changed bit changes it.

    Per parameter, the raw bits summed as int64 words (pairs of float32) and as int32 words, both
    wrapping; hashed together with the names. Integer sums are exact and independent of thread
    count (a float sum is neither), and they run at memory speed (~10 ms for the 20M model).
    """
    return tensors_checksum(model.named_parameters())


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`parameter_checksum` of named float32 tensors (a copy of the parameters, e.g. diloco's theta_global)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in named:
            bits = p.detach().contiguous().view(-1).view(torch.int32)
            even = bits[: bits.numel() // 2 * 2]
            h.update(name.encode())
            h.update(int(even.view(torch.int64).sum()).to_bytes(8, "little", signed=True))
            h.update(int(bits.sum(dtype=torch.int32)).to_bytes(8, "little", signed=True))
    return h.hexdigest()[:32]


@dataclass
class Checkpoint:
    """A loaded checkpoint: plain tensors and dicts, nothing built yet."""

    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] | None
    meta: dict[str, Any]

    def build_model(self) -> NanoGPT:
        """A model with these weights."""
        model = uninitialised_model(self.model_config)
        model.load_state_dict(self.model_state, strict=True)
        return model


# --------------------------------------------------------------------------- config.json

def llama_config_dict(cfg: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hugging Face `LlamaConfig` fields for `cfg`, with our own fields under `hetero_testnet`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "hetero_testnet": {"init_std": cfg.init_std, **(extra or {})},
    }


def model_config_from_dict(d: dict[str, Any], source: Path) -> ModelConfig:
    try:
        ours = d.get("hetero_testnet") or {}
        if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
            raise ConfigError(f"{source}: grouped-query attention (num_key_value_heads) is not supported")
        if d.get("tie_word_embeddings", False):
            raise ConfigError(f"{source}: tied embeddings are not supported")
        return ModelConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            max_seq_len=int(d["max_position_embeddings"]),
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=float(d["rope_theta"]),
            init_std=float(ours.get("init_std", d.get("initializer_range", 0.02))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: missing or invalid field {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint file {path} must hold a JSON object")
    return data


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint file {path} is not a readable safetensors file: {e}") from e


# --------------------------------------------------------------------------- save

def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`, removing what was there.

    With an existing target, an atomic exchange leaves either the old or the new checkpoint at
    `target` at every instant. Without `renameat2` the fallback is two renames; between them the
    previous checkpoint sits at `<target>.old-*` beside it.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    if _renameat2_exchange(tmp, target):
        shutil.rmtree(tmp)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, model: NanoGPT, optimizer: MaskedAdamW | Any | None,
                    meta: dict[str, Any]) -> Path:
    """Write model (+ optimizer) + meta to `directory`, atomically replacing any previous checkpoint.

    `optimizer`: anything with a flat `state_dict()` of tensors (MaskedAdamW, a sync mode's state), or None.

    `meta` must be JSON-serialisable (convert RNG states to lists). Returns the directory.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _fsync(tmp / MODEL_FILE)
        if optimizer is not None:
            opt = {k: v.detach().to("cpu").contiguous() for k, v in optimizer.state_dict().items()}
            save_file(opt, str(tmp / OPTIMIZER_FILE))
            _fsync(tmp / OPTIMIZER_FILE)
        extra = {"num_parameters": count_parameters(model)}
        _write_json(tmp / CONFIG_FILE, llama_config_dict(model.config, extra))
        _write_json(tmp / STATE_FILE, dict(meta))
        _fsync(tmp)
        _replace_dir(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- load

def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; every problem is a one-line `ConfigError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"checkpoint directory {directory} does not exist")
    model_cfg = model_config_from_dict(_read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    state = _load_tensors(directory / MODEL_FILE)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in NanoGPT(model_cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(f"{directory / MODEL_FILE} does not match config.json: {what}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ConfigError(f"{directory / MODEL_FILE}: {name} has shape {tuple(state[name].shape)}, "
                              f"config.json implies {tuple(shape)}")
    opt_path = directory / OPTIMIZER_FILE
    optimizer_state = _load_tensors(opt_path) if opt_path.exists() else None
    meta = _read_json(directory / STATE_FILE)
    return Checkpoint(model_config=model_cfg, model_state=state, optimizer_state=optimizer_state, meta=meta)


def load_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """Only `state.json` of a checkpoint (cheap: no tensors read); `ConfigError` if absent or bad."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"checkpoint directory {directory} does not exist")
    return _read_json(directory / STATE_FILE)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of a run directory with the largest step: `checkpoint/` or `checkpoints/*/`.

    Directories without a readable `state.json` (and temporaries of an interrupted save, whose
    names start with a dot) are skipped. `ConfigError` if none is found.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoint"]
    if (run_dir / "checkpoints").is_dir():
        candidates += sorted(p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    best: tuple[int, Path] | None = None
    for path in candidates:
        if not (path / STATE_FILE).is_file() or not (path / MODEL_FILE).is_file():
            continue
        try:
            step = int(load_checkpoint_meta(path).get("step", -1))
        except (ConfigError, TypeError, ValueError):
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        raise ConfigError(f"no checkpoint in {run_dir} (looked for checkpoint/ and checkpoints/*/)")
    return best[1]


def write_initial_checkpoint(config: RunConfig, seed: int, out: str | Path) -> tuple[Path, int]:
    """What `testnet init` writes: `build_model(config.model, seed)` at step 0, no optimizer state.

    A run started with the same seed builds exactly these weights. Returns (directory, parameters).
    """
    model = build_model(config.model, seed)
    meta = {"step": 0, "data_index": 0, "epoch": 0, "seed": seed, "run_id": config.run_id, "kind": "init"}
    return save_checkpoint(out, model, None, meta), count_parameters(model)

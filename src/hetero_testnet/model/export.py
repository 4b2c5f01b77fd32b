"""`testnet export`: one MatFormer tier out of a checkpoint, as a standalone Hugging Face Llama model.

MatFormer's point is elastic inference (Devvrit et al. 2023, arXiv:2310.07707): the tier-t submodel
is the full model with every FFN cut to its first `I >> t` neurons (rows of `gate_proj`/`up_proj`,
columns of `down_proj`); attention, embeddings, norms and head are shared by every tier. The export
directory holds exactly what `transformers.AutoModelForCausalLM` and `AutoTokenizer` load offline:

- `model.safetensors`: the tier's tensors under their Hugging Face Llama names (float32);
- `config.json`: `LlamaConfig` with `intermediate_size = I >> t`;
- the GPT-2 tokenizer files (`data/hf_tokenizer.py`);
- `export.json`, the manifest: source checkpoint (path, sha256 of its `model.safetensors`, parameter
  checksum, step), tier, FFN width, parameter counts and the validation loss measured at export.

Helper neurons (`--helper-fraction`) are suffix neurons a small client trains in addition to its
prefix; a tier submodel is the prefix alone, so `--helpers none` is the only choice today.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hetero_testnet.data.hf_tokenizer import write_hf_tokenizer
from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import sha256_file
from hetero_testnet.model.checkpoint import (CONFIG_FILE, MODEL_FILE, STATE_FILE, Checkpoint, llama_config_dict,
                                             parameter_checksum)
from hetero_testnet.model.matformer import ffn_width, is_ffn_param, slice_ffn_state_dict

MANIFEST_FILE = "export.json"
HELPER_CHOICES = ("none",)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    tier: int
    ffn_width: int
    num_parameters: int
    ffn_parameters: int
    manifest: dict[str, Any]


def tier_state_dict(ckpt: Checkpoint, tier: int) -> tuple[int, dict[str, torch.Tensor]]:
    """(FFN width, the tier's tensors): every FFN weight cut to its first `I >> tier` neurons."""
    width = ffn_width(ckpt.model_config.intermediate_size, tier)
    return width, slice_ffn_state_dict(ckpt.model_state, width)


def export_tier(ckpt: Checkpoint, source: Path, tier: int, out: Path, *, helpers: str = "none",
                val_loss: float | None = None, val_info: dict[str, Any] | None = None) -> ExportResult:
    """Write the tier-`tier` submodel of `ckpt` (loaded from `source`) to `out`, replacing it.

    `val_loss` (with `val_info`: data, samples) is recorded in the manifest; the caller measures it.
    Raises ConfigError on a bad tier or helpers choice, or an `out` that is a file.
    """
    if helpers not in HELPER_CHOICES:
        raise ConfigError(f"--helpers must be one of {', '.join(HELPER_CHOICES)} (got {helpers!r}): "
                          "a tier submodel is its prefix neurons alone")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    width, tensors = tier_state_dict(ckpt, tier)
    cfg = replace(ckpt.model_config, intermediate_size=width)
    num_params = sum(t.numel() for t in tensors.values())
    ffn_params = sum(t.numel() for n, t in tensors.items() if is_ffn_param(n))
    manifest = {
        "format": "hetero-testnet tier export, version 1",
        "source_checkpoint": str(source.resolve()),
        "source_model_sha256": sha256_file(source / MODEL_FILE),
        "source_parameter_checksum": _checksum(ckpt),
        "source_step": ckpt.meta.get("step"),
        "source_run_id": ckpt.meta.get("run_id"),
        "tier": tier, "ffn_width": width, "source_intermediate_size": ckpt.model_config.intermediate_size,
        "helpers": helpers, "num_parameters": num_params, "ffn_parameters": ffn_params,
        "val_loss": val_loss, **({"validation": val_info} if val_info else {}),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp / MODEL_FILE),
                  metadata={"format": "pt"})
        extra = {"num_parameters": num_params, "matformer_tier": tier,
                 "source_intermediate_size": ckpt.model_config.intermediate_size}
        _write_json(tmp / CONFIG_FILE, llama_config_dict(cfg, extra))
        _write_json(tmp / "generation_config.json", {"bos_token_id": 50256, "eos_token_id": 50256})
        write_hf_tokenizer(tmp, model_max_length=cfg.max_seq_len)
        _write_json(tmp / MANIFEST_FILE, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out=out, tier=tier, ffn_width=width, num_parameters=num_params, ffn_parameters=ffn_params,
                        manifest=manifest)


def _checksum(ckpt: Checkpoint) -> str:
    return parameter_checksum(ckpt.build_model())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


"""`testnet export`: write one MatFormer tier of a checkpoint as a standalone Hugging Face Llama model.

The work is `model/export.py`'s; this parses the flags, measures the tier's validation loss exactly as
`testnet eval --tier T` does (the manifest records it) and prints `key=value` lines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetero_testnet.cli.single import ThreadsOption, _kv, _set_threads, tier_val_loss


def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (from init, train or a run: "
                                             "logs/<name>/checkpoint), or a run directory (its latest).")],
    tier: Annotated[int, typer.Option(help="MatFormer tier to take out: the FFN keeps its first "
                                      "intermediate_size >> tier neurons.")],
    out: Annotated[Path, typer.Option(help="Directory to write (replaced if it exists).")],
    helpers: Annotated[str, typer.Option(help="Helper neurons to include: none (a tier submodel is its "
                                         "prefix alone).")] = "none",
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config naming the validation data for the manifest's val_loss; default "
        "configs/nanogpt-20m-run (the bundled sample), as `testnet eval`.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(
        help="Validation samples; default: the config's validation.num_samples.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass of the validation.")] = 8,
    threads: ThreadsOption = None,
) -> None:
    """Export a tier submodel: config.json, model.safetensors, tokenizer files and export.json (manifest).

    `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)`
    load it offline; its validation loss equals `testnet eval --checkpoint CHECKPOINT --tier T`.
    """
    from hetero_testnet.model.checkpoint import load_checkpoint
    from hetero_testnet.model.export import HELPER_CHOICES, export_tier
    from hetero_testnet.errors import ConfigError

    if helpers not in HELPER_CHOICES:
        raise ConfigError(f"--helpers must be one of {', '.join(HELPER_CHOICES)} (got {helpers!r})",
                          hint="a tier submodel is its prefix neurons alone")
    _set_threads(threads)
    if not (checkpoint / "config.json").is_file() and (checkpoint / "events.jsonl").is_file():
        from hetero_testnet.model.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(checkpoint)  # a run directory: its latest checkpoint
    ckpt = load_checkpoint(checkpoint)
    t0 = time.perf_counter()
    val, width, n = tier_val_loss(ckpt, tier, config, num_samples, batch_size)
    info = {"num_samples": n, "config": str(config) if config is not None else "configs/nanogpt-20m-run"}
    result = export_tier(ckpt, checkpoint, tier, out, helpers=helpers, val_loss=val, val_info=info)
    print(_kv(out=result.out, tier=tier, ffn_width=width, parameters=result.num_parameters,
              ffn_parameters=result.ffn_parameters, val_loss=val, num_samples=n, step=ckpt.meta.get("step"),
              export_time_s=round(time.perf_counter() - t0, 2)))


def register(app: typer.Typer) -> None:
    app.command("export")(export)

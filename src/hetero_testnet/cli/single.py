"""`testnet init`, `testnet train`, `testnet eval`: one process, no network.

- `init` writes the initial checkpoint a run with the same `--seed` starts from.
- `train` is the single-client baseline: the whole global batch per step at one tier.
- `eval` reports the validation loss of a checkpoint at a tier.

Each command parses its options, loads the config, calls one function of `checkpoint.py` or
`training.py`, and prints `key=value` lines. Errors are `ConfigError`s; `cli.main()` prints them.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hetero_testnet.config import DEFAULT_CONFIG
from hetero_testnet.errors import ConfigError

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Run config: a directory with config.yaml "
                                            "(or a Psyche state.toml), or the file itself.")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    "--threads", help="torch intra-op threads. Default: every core this process may use (a process "
    "training alone is fastest with all cores).")]


def _set_threads(threads: int | None) -> int:
    """Set torch's thread count deliberately (default: all cores in this process's affinity mask)."""
    import torch

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    torch.set_num_threads(threads)
    return threads


def _load_config(config: Path, seed: int | None, data_seed: int | None = None):
    from hetero_testnet.cli.options import warn_config
    from hetero_testnet.config import load_run_config

    cfg = warn_config(load_run_config(config))
    cfg = cfg if seed is None else cfg.replace(seed=seed)
    return cfg if data_seed is None else cfg.replace(data_seed=data_seed)


def _kv(**fields: Any) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in fields.items())


def init(
    config: ConfigOption = DEFAULT_CONFIG,
    seed: Annotated[Optional[int], typer.Option(help="Initialisation seed; default: the config's `seed`. "
                                                "`train`/`start` with the same seed start from exactly these weights.")] = None,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (replaced atomically if it exists).")]
        = Path("checkpoints/init"),
) -> None:
    """Write the initial checkpoint (model.safetensors, config.json, state.json) for a config and seed."""
    from hetero_testnet.model.checkpoint import write_initial_checkpoint

    cfg = _load_config(config, seed)
    path, params = write_initial_checkpoint(cfg, cfg.seed, out)
    print(_kv(checkpoint=path, seed=cfg.seed, parameters=params, parameters_m=f"{params / 1e6:.2f}"))


def train(
    steps: Annotated[int, typer.Option(help="Optimizer steps to run (each one global batch).")],
    config: ConfigOption = DEFAULT_CONFIG,
    tier: Annotated[int, typer.Option(help="MatFormer tier: the FFN computes intermediate_size >> tier neurons.")] = 0,
    helper_fraction: Annotated[float, typer.Option(
        help="Also train floor(ffn_width * F) suffix neurons per layer (tier > 0 only), in [0, 1].")] = 0.0,
    helper_rotation_interval: Annotated[int, typer.Option(
        help="Draw new helper neurons every this many steps.")] = 16,
    out: Annotated[Optional[Path], typer.Option(
        help="Output directory (the final checkpoint goes to OUT/checkpoint). Default: logs/train-<UTC time>.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Initialisation and helper seed, and the data order unless "
                                                "--data-seed; default: the config's `seed`.")] = None,
    data_seed: Annotated[Optional[int], typer.Option(help="Seed of the training-sample order; default: the seed.")
                         ] = None,
    threads: ThreadsOption = None,
) -> None:
    """Train one client alone on the whole global batch (the single-process baseline); checkpoint at the end.

    Prints one `step=... loss=... lr=... tok/s=...` line per step, and the validation loss
    at the start and at the end.
    """
    from hetero_testnet.model.matformer import ffn_width, sample_helpers
    from hetero_testnet.run.single import train_single

    if steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {steps})")
    n_threads = _set_threads(threads)
    cfg = _load_config(config, seed, data_seed)
    width = ffn_width(cfg.model.intermediate_size, tier)
    # validates the helper options before any work is done
    sample_helpers(cfg.model.intermediate_size, width, helper_fraction, seed=cfg.seed, step=0,
                   rotation_interval=helper_rotation_interval, num_layers=0)
    if out is None:
        out = Path("logs") / f"train-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    print(_kv(run_id=cfg.run_id, tier=tier, ffn_width=width, helper_fraction=helper_fraction, steps=steps,
              seed=cfg.seed, data_seed=cfg.data_order_seed, threads=n_threads, out=out), flush=True)

    def on_step(r: dict[str, Any]) -> None:
        print(f"step={r['step']} loss={r['loss']:.4f} lr={r['lr']:.3e} grad_norm={r['grad_norm']:.4f} "
              f"tok/s={r['tokens_per_sec']:.0f} step_time_s={r['step_time_s']:.3f}", flush=True)

    def on_eval(r: dict[str, Any]) -> None:
        print(_kv(step=r["step"], tier=r["tier"], val_loss=r["val_loss"], num_samples=r["num_samples"]), flush=True)

    result = train_single(cfg, tier, helper_fraction, helper_rotation_interval, steps, out, on_step,
                          on_eval=on_eval)
    print(_kv(parameters=result.num_parameters, initial_val_loss=result.initial_val_loss,
              final_val_loss=result.final_val_loss, wall_time_s=round(result.wall_time_s, 2),
              checkpoint=result.checkpoint), flush=True)


def eval_(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (from init, train or a run).")],
    tier: Annotated[int, typer.Option(help="MatFormer tier to evaluate (prefix of intermediate_size >> tier).")] = 0,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config naming the validation data; default configs/nanogpt-20m-run. "
        "The model shape always comes from the checkpoint.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(
        help="Validation samples (the first N, the same every time); default: the config's validation.num_samples.")]
        = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    threads: ThreadsOption = None,
) -> None:
    """Print the validation loss (`val_loss=`) of a checkpoint at a tier."""
    from hetero_testnet.model.checkpoint import load_checkpoint

    _set_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    t0 = time.perf_counter()
    val, width, n = tier_val_loss(ckpt, tier, config, num_samples, batch_size)
    print(_kv(val_loss=val, tier=tier, ffn_width=width, num_samples=n, step=ckpt.meta.get("step"),
              eval_time_s=round(time.perf_counter() - t0, 2)))


def tier_val_loss(ckpt, tier: int, config: Path | None, num_samples: int | None,
                  batch_size: int) -> tuple[float, int, int]:
    """(validation loss, FFN width, samples) of a loaded checkpoint at `tier`, on the validation data of
    `config` (default: the bundled 20M config's); `eval` and `export` report the same number."""
    from hetero_testnet.data.shards import open_split
    from hetero_testnet.model.matformer import NeuronSet, ffn_width
    from hetero_testnet.model.train import evaluate

    m = ckpt.model_config
    width = ffn_width(m.intermediate_size, tier)
    cfg = _load_config(config if config is not None else DEFAULT_CONFIG, None)
    n = cfg.data.val_samples if num_samples is None else num_samples
    if n < 1 or batch_size < 1:
        raise ConfigError("--num-samples and --batch-size must be >= 1")
    val_data = open_split(cfg.data, "val", m.max_seq_len, m.vocab_size)
    val = evaluate(ckpt.build_model(), val_data, NeuronSet(prefix_width=width), n, batch_size)
    return val, width, n


def register(app: typer.Typer) -> None:
    """Add `init`, `train` and `eval` to the top-level app."""
    app.command("init")(init)
    app.command("train")(train)
    app.command("eval")(eval_)

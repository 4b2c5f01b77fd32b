"""Parsers for the flags that are not plain numbers, and options shared by several commands.

The comma-list parsers turn `--tiers 0,1,1` and friends into typed lists and raise `ConfigError`
(one line, exit 2) naming the flag. They are called by the commands rather than registered as Typer
`parser=` callbacks, so that `--help` shows the flags as before and their errors keep their text.
What the values mean (ranges, cycling over clients) is checked in `run/plan.py`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetero_testnet.errors import ConfigError
from hetero_testnet.run.plan import TOKEN_ENV

DEVICES = ("auto", "cpu", "cuda", "mps")

TokenFileOption = Annotated[Optional[Path], typer.Option("--token-file", help="File holding the run token "
                                                          "(else HETERO_TESTNET_TOKEN).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]

# `--sync` and its mode flags (start and coordinator); None = the config's value (`run/sync_flags.py`).
SyncOption = Annotated[Optional[str], typer.Option(
    "--sync", help="allreduce (one shared model, exact average every step) | none (independent replicas, "
                   "ablations only) | demo (DeMo/DisTrO: compressed momentum, sign-SGD) | diloco (H local steps, "
                   "then one exact average). Default: the config's (allreduce; demo for a Psyche optimizer.Distro).")]
DemoTopkOption = Annotated[Optional[int], typer.Option("--demo-topk", help="demo: coefficients sent per DCT "
                                                       "block (default 32).")]
DemoChunkOption = Annotated[Optional[int], typer.Option("--demo-chunk", help="demo: largest DCT block side "
                                                        "(default 64); FFN blocks must divide every tier's width.")]
DemoDecayOption = Annotated[Optional[float], typer.Option("--demo-decay", help="demo: momentum decay beta "
                                                          "(default 0.999).")]
Demo1BitOption = Annotated[Optional[bool], typer.Option("--demo-1bit/--no-demo-1bit", help="demo: send only the "
                                                        "signs of the coefficients (default off).")]
DemoValuesOption = Annotated[Optional[str], typer.Option("--demo-values", help="demo: float32 | bfloat16 values "
                                                         "on the wire without 1-bit (default float32).")]
DemoApplyOption = Annotated[Optional[str], typer.Option("--demo-apply", help="demo: sign (DeMo's sign-SGD, "
                                                        "default) | raw (p -= decoded momentum; an ablation).")]
InnerStepsOption = Annotated[Optional[int], typer.Option("--inner-steps", help="diloco: local steps per round, "
                                                         "H (default 8); total_steps counts these.")]
OuterLrOption = Annotated[Optional[float], typer.Option("--outer-lr", help="diloco: outer Nesterov learning "
                                                        "rate (default 0.7).")]
OuterMomentumOption = Annotated[Optional[float], typer.Option("--outer-momentum", help="diloco: outer Nesterov "
                                                              "momentum (default 0.9).")]
DilocoBf16Option = Annotated[Optional[bool], typer.Option("--diloco-bf16/--no-diloco-bf16", help="diloco: "
                                                          "all-reduce pseudo-gradients as bfloat16.")]


def parse_int_list(text: str | None, option: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3]; empty or None -> []."""
    if text is None or not text.strip():
        return []
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(int(item))
        except ValueError:
            raise ConfigError(f"{option} must be comma-separated integers (got {item!r} in {text!r})") from None
    return values


def parse_float_list(text: str | None, option: str) -> list[float]:
    """`0,0.5` -> [0.0, 0.5]; empty or None -> []; every value finite."""
    if text is None or not text.strip():
        return []
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(f"{option} must be comma-separated numbers (got {item.strip()!r})") from None
        if not math.isfinite(v):
            raise ConfigError(f"{option} values must be finite (got {item.strip()!r})")
        values.append(v)
    return values


def parse_latency(text: str | None) -> tuple[float, float]:
    """`base[-jitter]` in milliseconds -> (base, jitter); empty or None -> (0, 0)."""
    if not text:
        return 0.0, 0.0
    parts = text.split("-")
    try:
        base = float(parts[0])
        jitter = float(parts[1]) if len(parts) > 1 else 0.0
    except (ValueError, IndexError):
        raise ConfigError(f"--fault-latency-ms must be BASE or BASE-JITTER in ms (got {text!r})") from None
    if len(parts) > 2 or base < 0 or jitter < 0:
        raise ConfigError(f"--fault-latency-ms must be BASE or BASE-JITTER, both >= 0 (got {text!r})")
    return base, jitter


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--coordinator must be HOST:PORT (got {text!r})")
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"--coordinator port must be an integer (got {port!r})") from None


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)} (got {value!r})")
    return value


def read_token(token_file: Path | None) -> str:
    """The run token from `token_file`, else from HETERO_TESTNET_TOKEN; never logged."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --token-file {token_file}: {e.strerror}") from e
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError("no run token: set HETERO_TESTNET_TOKEN or pass --token-file",
                          hint="`testnet start` writes it to logs/<name>/.token (mode 0600)")
    return token


def warn_config(cfg):
    """Print the config's one warning (Psyche fields with no effect here, fields nobody knows) on stderr;
    returns `cfg`. Each command that reads a config file calls this once."""
    import sys

    from hetero_testnet.config.psyche import config_warning

    line = config_warning(cfg.notes, cfg.source)
    if line:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return cfg


def resolve_device(device: str) -> str:
    """One client's `--device` as this machine can honour it: auto picks cuda when available, else cpu;
    `cuda:N` names one GPU (`testnet start` takes a list: `run/devices.py`)."""
    if device.startswith("cuda:"):
        from hetero_testnet.run.devices import available, client_devices, parse_devices

        entries = parse_devices(device)
        if len(entries) != 1:
            raise ConfigError(f"--device of one client is one device (got {device!r})")
        return client_devices(entries, 1, cuda_count=available()[0])[0]
    check_choice(device, DEVICES, "--device")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available")
    return device

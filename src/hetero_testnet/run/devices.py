"""Which device each client trains on, and which collective backend a run therefore uses.

`--device` is one value or a comma list that cycles over the clients like `--tiers`: `cpu`, `mps`,
`cuda` (clients spread round-robin over the GPUs present: client i on `cuda:(i mod n)`), `cuda:N`
(that GPU) or `auto` (`cuda` when a GPU is present, else `cpu`). The backend follows from the
devices actually assigned:

- NCCL only when every client is on its own CUDA device: NCCL refuses two ranks on one GPU
  ("Duplicate GPU detected"), so `--device cuda --num-clients 3` on a one-GPU machine must not use it;
- gloo otherwise: CPU clients, several clients sharing a GPU, MPS, or a mix. Gloo reduces host
  memory; tensors on an accelerator are staged through host memory around each collective
  (`exchange.formation.stages_through_host`), which works for every device (gloo has no MPS support at all,
  and only some collectives for CUDA tensors).

Pure functions of their arguments (the caller passes the GPU count), so they are tested on CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hetero_testnet.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def parse_devices(text: str) -> list[str]:
    """`--device` text -> its entries (`cuda:1,cpu` -> ["cuda:1", "cpu"]); ConfigError on a bad one."""
    entries = [item.strip() for item in text.split(",")] if text and text.strip() else ["auto"]
    for item in entries:
        m = _DEVICE.match(item)
        if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
            raise ConfigError(f"--device entries must be one of {', '.join(DEVICE_CHOICES)} (got {item!r})")
    return entries


def client_devices(entries: Sequence[str], num_clients: int, *, cuda_count: int, mps: bool = False) -> list[str]:
    """The device of each client: `entries` cycled over the clients, `cuda` and `auto` made concrete.

    ConfigError when a device is not present (no GPU, GPU index out of range, no MPS).
    """
    out = []
    next_gpu = 0
    for i in range(num_clients):
        entry = entries[i % len(entries)]
        if entry == "auto":
            entry = "cuda" if cuda_count else "cpu"
        if entry == "cuda":
            if not cuda_count:
                raise ConfigError("--device cuda but no CUDA device is available")
            entry, next_gpu = f"cuda:{next_gpu % cuda_count}", next_gpu + 1
        elif entry.startswith("cuda:") and int(entry[5:]) >= cuda_count:
            raise ConfigError(f"--device {entry} but this machine has {cuda_count} CUDA device(s)"
                              + (f" (cuda:0..cuda:{cuda_count - 1})" if cuda_count else ""))
        elif entry == "mps" and not mps:
            raise ConfigError("--device mps but MPS is not available")
        out.append(entry)
    return out


def choose_backend(devices: Sequence[str]) -> str:
    """nccl when every client has a CUDA device of its own (one process per GPU), else gloo."""
    if devices and all(d.startswith("cuda:") for d in devices) and len(set(devices)) == len(devices):
        return "nccl"
    return "gloo"


def describe(devices: Sequence[str], backend: str) -> str:
    """One line for the run's start: `devices cuda:0 x3 (gloo, staged through host)`."""
    from hetero_testnet.exchange.formation import stages_through_host  # imports torch

    counts: dict[str, int] = {}
    for d in devices:
        counts[d] = counts.get(d, 0) + 1
    shown = ", ".join(d if n == 1 else f"{d} x{n}" for d, n in counts.items())
    staged = any(stages_through_host(backend, d.split(":")[0]) for d in devices)
    return f"devices {shown} ({backend}{', staged through host' if staged else ''})"


def available() -> tuple[int, bool]:
    """(CUDA devices, MPS available) on this machine; imports torch."""
    import torch

    return torch.cuda.device_count(), bool(torch.backends.mps.is_available())


def assign_devices(specs: Sequence, text: str, *, present: tuple[int, bool] | None = None) -> str:
    """Set each client spec's `device` from `--device` text and return the run's backend.

    `present` is (CUDA devices, MPS) — found with `available()` only when an entry needs it.
    """
    entries = parse_devices(text)
    if present is None:
        present = (0, False) if all(e == "cpu" for e in entries) else available()
    devices = client_devices(entries, len(specs), cuda_count=present[0], mps=present[1])
    for spec, device in zip(specs, devices):
        spec.device = device
    return choose_backend(devices)

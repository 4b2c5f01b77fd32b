"""Every file of a run directory (`logs/<name>/`), named once, and the JSON I/O they are written with.

The coordinator, launcher, CLI, TUI, experiment runner and reports all find a run's files through
`RunDir`, so a file is never named twice. Writers use `write_json_atomic` (write, fsync, rename:
a reader never sees half a file and a crash never leaves one) and `append_jsonl` (one `os.write`
on an O_APPEND descriptor: concurrent writers never interleave inside a line).
"""

from __future__ import annotations

import hashlib

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunDir:
    """The files of one run; `path` need not exist yet."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def events(self) -> Path:
        """The one event stream (schema: docs/events.md)."""
        return self.path / "events.jsonl"

    @property
    def summary(self) -> Path:
        """Written by the coordinator when the run ends, amended by the launcher."""
        return self.path / "summary.json"

    @property
    def ready(self) -> Path:
        """The coordinator's address, written once it listens (the launcher waits for it)."""
        return self.path / "coordinator.json"

    @property
    def stop_request(self) -> Path:
        """Why the launcher asked the coordinator to stop (`{"reason": ...}`), written just before its
        SIGTERM, so the summary says who stopped the run (the dashboard's q, Ctrl-C, --exit-after-secs)."""
        return self.path / ".stop-request.json"

    @property
    def token(self) -> Path:
        """The per-run token, mode 0600; never on a command line or in a log."""
        return self.path / ".token"

    @property
    def config(self) -> Path:
        """The resolved config, headed by the command line that made it."""
        return self.path / "config.yaml"

    @property
    def checkpoint(self) -> Path:
        """The final checkpoint."""
        return self.path / "checkpoint"

    @property
    def checkpoints(self) -> Path:
        """Periodic checkpoints (`--checkpoint-every`), one folder per step."""
        return self.path / "checkpoints"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @property
    def coordinator_log(self) -> Path:
        return self.path / "coordinator.log"

    def client_log(self, client_id: int) -> Path:
        return self.path / f"client-{client_id}.log"


def write_json_atomic(path: Path, data: Any, *, default: Any = str) -> None:
    """Write `data` as indented JSON to a temporary file, fsync it, then rename it over `path`.

    Raises OSError when the directory cannot be written; `path` is then unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, default=default) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON value in `path`. Raises OSError (missing, unreadable) or ValueError (not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def read_json_or_none(path: Path) -> Any:
    """`read_json`, or None where the file is missing, unreadable or not JSON (readers of optional files)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single `os.write` (O_APPEND), so concurrent writers never interleave."""
    line = json.dumps(record, separators=(",", ":"), default=str, allow_nan=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object in a JSONL file ([] if it is missing); torn or invalid lines are skipped."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return []
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (shards, archives, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""The one event stream: human `event key=value` log lines plus a JSONL mirror.

Every process logs human lines through `setup_logging` (prefix `[role id tier step]`). Run-level
events go to `<run dir>/events.jsonl`, one JSON object per line with `ts`, `run_id`, `role`,
`client_id`, `step`, `event` first. Writers open the file with O_APPEND and write each line with
one `os.write`, so the coordinator and the launcher can append to the same file without
interleaving, and every line is on disk as soon as it is emitted (a crash loses nothing).

The TUI, headless progress lines, `testnet watch` and reports all read this file through
`EventTail`/`read_events`, so they never disagree. Emitting never blocks training for long:
it is one small local write.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

LOGGER_NAME = "hetero_testnet"


class RunState(StrEnum):
    """The run's states: the reference's six in order, plus the ones around them.

    The coordinator moves through them (`state` events carry `old`/`new`); the launcher, membership
    and the dashboard compare against these members, never against string literals.
    """

    UNINITIALIZED = "Uninitialized"
    """Before the coordinator has started waiting (the dashboard shows it until the first event)."""
    LAUNCHING = "Launching"
    """The dashboard's state while the launcher spawns processes (never sent by the coordinator)."""
    WAITING_FOR_MEMBERS = "WaitingForMembers"
    WARMUP = "Warmup"
    ROUND_TRAIN = "RoundTrain"
    ROUND_WITNESS = "RoundWitness"
    COOLDOWN = "Cooldown"
    FINISHED = "Finished"
    PAUSED = "Paused"
    """Held at a step boundary (SIGUSR1 / the dashboard's p key)."""

    @property
    def is_ending(self) -> bool:
        """Cooldown or Finished: no more joins, kills or restarts."""
        return self in (RunState.COOLDOWN, RunState.FINISHED)


class Event(StrEnum):
    """Every event name in `events.jsonl` (schema: docs/events.md). Emitters and all readers (the
    dashboard, headless progress, the launcher, the experiment runner and reports) use these."""

    LAUNCH = "launch"
    PROCESS_STARTED = "process_started"
    RUN_STARTED = "run_started"
    STATE = "state"
    CLIENT_JOINED = "client_joined"
    CLIENT_READY = "client_ready"
    CLIENT_REJECTED = "client_rejected"
    CLIENT_LOST = "client_lost"
    CLIENT_RESTARTED = "client_restarted"
    CLIENT_EXITED = "client_exited"
    FAULT_KILL = "fault_kill"
    GENERATION = "generation"
    GENERATION_FAILED = "generation_failed"
    CLIENT_REDUCED = "client_reduced"
    CLIENT_STEP = "client_step"
    STEP_COMMITTED = "step_committed"
    STEP_DISCARDED = "step_discarded"
    REPLICA_MISMATCH = "replica_mismatch"
    EPOCH = "epoch"
    EVAL = "eval"
    CHECKPOINT_SAVED = "checkpoint_saved"
    PAUSE = "pause"
    RESUME = "resume"
    PROTOCOL_ERROR = "protocol_error"
    CONNECTION_DROPPED = "connection_dropped"
    COMPUTE_DONE = "compute_done"
    SHARES = "shares"
    RESTORED = "restored"
    RUN_FINISHED = "run_finished"


def format_kv(event: str, fields: dict[str, Any]) -> str:
    """`event k=v k=v` in the given key order (the reference's line shape)."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}" if abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.4f}"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix_fn) -> None:
        super().__init__()
        self.prefix_fn = prefix_fn

    def filter(self, record: logging.LogRecord) -> bool:
        record.prefix = self.prefix_fn()
        return True


def setup_logging(prefix_fn, *, stream: TextIO | None = None, file: Path | None = None,
                  verbose: bool = False) -> logging.Logger:
    """Attach handlers to the package logger only. `prefix_fn()` gives `[role id tier step]`."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(prefix)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handlers: list[logging.Handler] = []
    if stream is not None:
        handlers.append(logging.StreamHandler(stream))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_PrefixFilter(prefix_fn))
        logger.addHandler(h)
    return logger


class EventWriter:
    """Appends events to a JSONL file and mirrors them as `event key=value` log lines."""

    def __init__(self, path: Path | None, *, run_id: str, role: str, client_id: int | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.path = path
        self.run_id = run_id
        self.role = role
        self.client_id = client_id
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: str, *, step: int | None = None, client_id: int | None = None,
             log: bool = True, level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": time.time(),
            "run_id": self.run_id,
            "role": self.role,
            "client_id": client_id if client_id is not None else self.client_id,
            "step": step,
            "event": event,
        }
        record.update(fields)
        if self._fd is not None:  # one write per line on an O_APPEND descriptor (see rundir.append_jsonl)
            line = json.dumps(record, separators=(",", ":"), default=str, allow_nan=True) + "\n"
            os.write(self._fd, line.encode("utf-8"))
        if log:
            shown = {"client_id": record["client_id"], "step": step, **fields} if client_id is not None else {
                "step": step, **fields}
            self.logger.log(level, format_kv(event, shown))
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in a JSONL file (a torn last line is ignored)."""
    return list(EventTail(path).poll())


class EventTail:
    """Follows an events file: each `poll()` yields the events appended since the last one.

    With `from_end=True` it starts at the file's current end (only events written from now on).
    """

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        self.path = path
        self._offset = 0
        if from_end:
            try:
                self._offset = path.stat().st_size
            except FileNotFoundError:
                pass
        self._partial = b""

    def poll(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

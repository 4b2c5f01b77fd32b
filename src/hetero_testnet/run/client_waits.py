"""The client's bounded waits: for a forming group, for `Go`, for a background save; and its last resort.

The client's main thread is the only reader of its control connection. Whenever it waits on
something else (a formation thread, the coordinator's `Go`), it keeps reading that connection, so
the coordinator can always redirect it: a message that is not the awaited one ends the wait and is
handed back to the main loop (`Interrupted`, `RoundCancelled`), which then handles it as usual.

Failure semantics:
- `wait_for_formation` returns the interrupting message (the coordinator moved on: a newer
  `Generation`, `Dropped`, `Shutdown`) or None; the caller abandons the formation in the first case
  and, when `done` is still unset at `deadline`, in the second too;
- `await_go` returns the `Go` for the step, or raises `RoundCancelled` (a `PeerLostError`, so the
  steppers treat it as a failed exchange and undo what they must) carrying the message that came
  instead (usually `Discard`); `PeerLostError` when the coordinator is silent past its timeout;
- `StuckWatchdog` ends the process with `EXIT_STUCK` (crash-only: the launcher restarts it) when
  an abandoned formation thread is still running past its hard deadline (10x its timeout + 30 s,
  `formation.AbandonedFormations.overdue_s`; wedges end by themselves after ~5x): a wedged gloo
  thread is not worth keeping, a fresh process is clean.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetero_testnet.errors import PeerLostError
from hetero_testnet.exchange.formation import AbandonedFormations
from hetero_testnet.model.checkpoint import Checkpoint, parameter_checksum, save_checkpoint
from hetero_testnet.run import protocol as P
from hetero_testnet.run.connection import Connection

log = logging.getLogger("hetero_testnet")

EXIT_STUCK = 75
"""Exit code (EX_TEMPFAIL) of a client that gave up on itself; the launcher restarts it."""
POLL_S = 0.02
"""How often a wait looks at the control connection while something else runs."""


class RoundCancelled(PeerLostError):
    """The coordinator ended the round before its exchange; `message` is what it sent instead."""

    def __init__(self, message: P.Message) -> None:
        super().__init__(f"round cancelled by the coordinator ({message.type})")
        self.message = message


def wait_for_formation(conn: Connection, done: threading.Event, deadline: float) -> P.Message | None:
    """Until `done` is set or `deadline` (monotonic): None, or the first message that is not a ping."""
    while not done.is_set() and time.monotonic() < deadline:
        if conn.poll(POLL_S):
            message = conn.recv(1.0)
            if not isinstance(message, P.Ping):
                return message
        else:
            done.wait(POLL_S)
    return None


def await_go(conn: Connection, step: int, timeout_s: float) -> P.Go:
    """The coordinator's `Go` for `step` (module docstring for what ends the wait otherwise)."""
    while True:
        message = conn.recv(timeout_s)
        if isinstance(message, P.Go) and message.step == step:
            return message
        if not isinstance(message, P.Ping):
            raise RoundCancelled(message)


class _StateDict:
    """Duck-types an optimizer for `save_checkpoint`: a frozen `state_dict()`."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class BackgroundSaver:
    """Checkpoints written by a thread from a snapshot taken at once (the training goes on).

    `save` copies the parameters and optimizer state now (memory speed), then writes them with
    `save_checkpoint` (atomic: a half-written checkpoint never replaces a good one) and calls
    `on_saved(checksum)` from the thread. One save at a time: a save requested while the previous
    one is still writing waits for it first.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def save(self, path: Path, model: torch.nn.Module, optimizer: Any, meta: dict[str, Any],
             on_saved: Callable[[str], None]) -> None:
        if self.thread is not None:
            self.thread.join()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt = {k: v.detach().clone() for k, v in optimizer.state_dict().items()} if optimizer is not None else None
        config = model.config

        def write() -> None:
            try:
                snapshot = Checkpoint(config, state, opt, dict(meta)).build_model()
                save_checkpoint(path, snapshot, _StateDict(opt) if opt is not None else None, dict(meta))
                on_saved(parameter_checksum(snapshot))
            except Exception as e:  # noqa: BLE001 - a failed background save is reported, never fatal
                log.warning("background checkpoint %s failed: %s", path, e)

        self.thread = threading.Thread(target=write, name="saver", daemon=True)
        self.thread.start()


class StuckWatchdog:
    """Crash-only last resort, checked from the heartbeat thread (module docstring)."""

    def __init__(self, abandoned: AbandonedFormations) -> None:
        self.abandoned = abandoned

    def check(self) -> None:
        overdue = self.abandoned.overdue_s()
        if overdue > 0:
            log.error("an abandoned process-group formation is stuck %.0f s past its hard deadline; exiting "
                      "with code %d to be restarted", overdue, EXIT_STUCK)
            logging.shutdown()
            os._exit(EXIT_STUCK)

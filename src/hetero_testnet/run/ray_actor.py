"""One client as a Ray actor: it runs the very `testnet client ...` command line of local mode as its
child process and supervises it, so the client's code path is the same in both engines and a killed
actor is a killed client.

This module never imports Ray at module level: `run/ray_engine.py` wraps `ClientActor` with
`ray.remote` when `--engine ray` is used. Ray calls `__init__` again, with the same job, whenever it
restarts the actor (`max_restarts`); `__init__` starts the client, which rejoins under its client id.

- Token: the run token reaches the actor only through its runtime environment (`env_vars`), and the
  child inherits it from there; it is never an argument, so it appears in no command line or log.
- Data: before the client starts, the actor checks the shards it will read against the head's
  manifest (`data/fingerprint.py`); a different copy is one error line (`status()["error"]`), and
  the launcher stops the run with it. With shipped shards it first writes them to a node cache.
- Logs: on the head's node the child writes `logs/<name>/client-K.log` itself, as in local mode;
  elsewhere it writes a file on its own node and the launcher pulls new bytes with `read_log`
  (appended to the head's `client-K.log`), so the head's log is complete up to the last pull.

Every method answers with plain data (ints, strings, dicts, bytes): nothing of this package travels
pickled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hetero_testnet.data.fingerprint import DataManifest, verify_copy, write_shipped
from hetero_testnet.errors import HeteroTestnetError
from hetero_testnet.run.processes import kill_tree, spawn_supervised, wait_all

READ_LOG_LIMIT = 1 << 20
"""Most bytes one `read_log` call returns (the launcher asks again for the rest)."""
NODE_DIR = "hetero-testnet"
"""Under the node's temp directory: shipped shards (`data/<digest>`) and the logs of remote clients."""


def _ray_context() -> tuple[str, bool]:
    """(this node's id, whether Ray restarted this actor); a function so tests can run the actor bare."""
    import warnings

    import ray

    ctx = ray.get_runtime_context()
    with warnings.catch_warnings():  # a deprecation note inside Ray's own property
        warnings.simplefilter("ignore")
        return ctx.get_node_id(), bool(ctx.was_current_actor_reconstructed)


class ClientActor:
    """Runs and supervises one `testnet client` process. `job` (plain data, from `RayEngine`):
    client_id, argv (the `testnet client` arguments), log_path (on the head), run_name, head_node,
    restart_delay_s, manifest (or None), data_dir (or None). `shipped`: shard bytes by name, or None."""

    def __init__(self, job: dict[str, Any], shipped: dict[str, bytes] | None = None) -> None:
        self.job = job
        self.node_id, reconstructed = _ray_context()
        self.host = socket.gethostname()
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        self.starts = 0
        self.remote_log = self.node_id != job["head_node"]
        self.log_path = self._node_dir() / job["run_name"] / Path(job["log_path"]).name if self.remote_log \
            else Path(job["log_path"])
        if self.remote_log and not reconstructed:  # a new run (or --resume): the head pulls from offset 0
            self.log_path.unlink(missing_ok=True)
        if reconstructed and job.get("restart_delay_s"):
            time.sleep(float(job["restart_delay_s"]))  # --kill-restart-delay, as the local launcher waits
        try:
            self.argv = list(job["argv"]) + self._prepare_data(shipped)
            self.start_client()
        except (HeteroTestnetError, OSError) as e:
            self.error = f"client {job['client_id']} on {self.host}: {e}"

    def _node_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / NODE_DIR

    def _prepare_data(self, shipped: dict[str, bytes] | None) -> list[str]:
        """The extra `--data-dir` arguments once this node's shards match the head's (DataError if not)."""
        raw = self.job.get("manifest")
        if raw is None:
            return []
        manifest = DataManifest.from_dict(raw)
        if shipped is not None:
            directory = write_shipped(manifest, shipped, self._node_dir() / "data")
            return ["--data-dir", str(directory)]
        data_dir = self.job.get("data_dir")
        verify_copy(manifest, Path(data_dir) if data_dir else None)
        return ["--data-dir", data_dir] if data_dir else []

    def start_client(self) -> int:
        """Start the client (again, after it exited asking for a restart); returns its pid."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = spawn_supervised([sys.executable, "-m", "hetero_testnet", *self.argv], log_path=self.log_path,
                                     env=dict(os.environ))
        self.starts += 1
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        """Where the client stands: pid and exit code (None while running), or why it never started."""
        return {"pid": self.proc.pid if self.proc is not None else None,
                "exit_code": self.proc.poll() if self.proc is not None else None, "error": self.error,
                "host": self.host, "node": self.node_id, "remote_log": self.remote_log, "starts": self.starts,
                "actor_pid": os.getpid()}

    def read_log(self, offset: int) -> bytes:
        """Up to READ_LOG_LIMIT bytes of this node's client log from `offset` (remote nodes only)."""
        if not self.remote_log:
            return b""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(READ_LOG_LIMIT)
        except OSError:
            return b""

    def stop(self, wait_s: float) -> dict[str, Any]:
        """End the client: up to `wait_s` to leave by itself (the coordinator told it to), then SIGKILL
        with its children. Returns the final status."""
        if self.proc is not None:
            wait_all([self.proc], wait_s)
            kill_tree([self.proc])
        return self.status()

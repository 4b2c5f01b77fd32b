"""Finding where a run can continue from: its latest checkpoint and the position it records.

`testnet start --checkpoint-every K` makes rank 0 save `checkpoints/step-<s>/` (model, optimizer,
and `state.json` with the step, data index, epoch and tokens seen) after step s is committed;
the final model goes to `checkpoint/`. `--resume logs/<name>` continues from the newest of these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hetero_testnet.errors import ConfigError

STATE_FILE = "state.json"


def load_checkpoint_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory} is not a checkpoint (no {STATE_FILE})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    for key in ("step", "data_index"):
        if not isinstance(meta.get(key), int):
            raise ConfigError(f"{path} has no integer {key!r}; it cannot be resumed from")
    return meta


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of `run_dir` with the highest step (periodic ones and the final one)."""
    candidates = [p for p in sorted((run_dir / "checkpoints").glob("step-*")) if (p / STATE_FILE).is_file()]
    final = run_dir / "checkpoint"
    if (final / STATE_FILE).is_file():
        candidates.append(final)
    if not candidates:
        raise ConfigError(f"{run_dir} has no checkpoint to resume from",
                          hint="runs save resumable checkpoints with --checkpoint-every K")
    return max(candidates, key=lambda p: load_checkpoint_meta(p)["step"])

"""Recovery points: the automatic checkpoints, and the rewind when nobody holds the current state.

Every `every` committed steps one member (round-robin over the generation) saves the state in the
background (`SaveCheckpoint.background`: a snapshot at once, written by a thread, so training does
not wait) to `checkpoints/auto-step-<step>/`, which `--resume` also finds. Periodic checkpoints of
`--checkpoint-every` are recovery points too. A point counts once its member reported it `Saved`
(the write is atomic). Only the newest confirmed automatic checkpoint and the ones still being
written are kept.

Failure semantics: when every member that held the current state is gone at once (all killed),
the coordinator rewinds to the newest confirmed point (`rewind`): step, data index, tokens seen and
epoch come from it, every member loads it (`Generation.restore`), and the steps after it are
trained again on the same samples (the data index is the checkpoint's, and a step's global sample
range depends only on it). The summary counts `replayed_steps` and `restores`. Before any point is
confirmed the rewind goes to the run's start ("initial": the seed, or the resumed checkpoint).
Points requested after the one rewound to are forgotten: they belonged to the abandoned lineage.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetero_testnet.events import Event, EventWriter
from hetero_testnet.run.summary import RunTotals
from hetero_testnet.rundir import RunDir

log = logging.getLogger("hetero_testnet")

AUTO_PREFIX = "auto-step-"


@dataclass(frozen=True)
class RecoveryPoint:
    step: int
    path: str
    """A checkpoint directory, or "initial" (the run's starting state)."""
    data_index: int
    tokens_seen: int
    epoch: int

    def meta(self, run_id: str, seed: int) -> dict[str, Any]:
        """The checkpoint's `state.json` (what `--resume` and a rewind read back)."""
        return {"step": self.step, "data_index": self.data_index, "epoch": self.epoch,
                "tokens_seen": self.tokens_seen, "run_id": run_id, "seed": seed}


class Recovery:
    def __init__(self, files: RunDir, every: int, start: RecoveryPoint) -> None:
        self.files = files
        self.every = every
        self.start = start
        self.points: dict[int, RecoveryPoint] = {}
        """step -> a requested point (confirmed once its step is among the saved steps)."""

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def auto_path(self, step: int) -> Path:
        return self.files.checkpoints / f"{AUTO_PREFIX}{step:06d}"

    def register(self, point: RecoveryPoint, saved_steps: set[int]) -> None:
        """A checkpoint was requested at `point`; prune the automatic ones it makes obsolete."""
        self.points[point.step] = point
        newest = self.newest(saved_steps)
        for step, p in list(self.points.items()):
            if step < newest.step and step in saved_steps:
                del self.points[step]
                if Path(p.path).name.startswith(AUTO_PREFIX):
                    shutil.rmtree(p.path, ignore_errors=True)

    def newest(self, saved_steps: set[int]) -> RecoveryPoint:
        """The newest confirmed point (the start when none is)."""
        confirmed = [p for step, p in self.points.items() if step in saved_steps and Path(p.path).is_dir()]
        return max(confirmed, key=lambda p: p.step, default=self.start)

    def rewind(self, totals: RunTotals, events: EventWriter) -> RecoveryPoint:
        """Move `totals` back to the newest confirmed point (counted, and a `restored` event); the
        requests after it (the abandoned lineage's) are forgotten. Returns the point."""
        point = self.newest(totals.saved_steps)
        for step in [s for s in self.points if s > point.step]:
            del self.points[step]
        replayed = totals.step - point.step
        totals.counters["restores"] += 1
        totals.counters["replayed_steps"] += replayed
        events.emit(Event.RESTORED, level=logging.WARNING, step=point.step, from_step=totals.step, path=point.path,
                    replayed_steps=replayed)
        totals.step, totals.data_index, totals.tokens_seen = point.step, point.data_index, point.tokens_seen
        return point

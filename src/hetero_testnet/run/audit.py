"""What a run committed, checked from its `events.jsonl` alone: the lineage audit of issue 11.

A run that rewinds to a recovery checkpoint (`restored` event) trains some steps twice; only the
last commit of each step belongs to the final model. `lineage` replays the events in order and
keeps, per step, the commit and the members' checksums of the lineage that survived. `audit` then
checks what fault tolerance promises:

- every step 0 .. total-1 was committed (once, in the final lineage);
- every member's checksum after each committed step is the same (replicas identical);
- the sample ranges of the committed steps tile the planned range exactly: step s starts where
  step s-1 ended, its members' ranges cover [start, start + count) with no gap and no overlap,
  so no sample is lost and none is trained twice.

It reads plain dicts (`events.read_events`), so tests, benchmarks and people can run it on any run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Lineage:
    commits: dict[int, dict[str, Any]] = field(default_factory=dict)
    """step -> its `step_committed` event in the final lineage."""
    checksums: dict[int, set[str]] = field(default_factory=dict)
    """step -> the distinct checksums members reported after applying it (final lineage)."""
    restores: int = 0
    replayed: int = 0
    """Commits superseded by a rewind (trained again)."""


def lineage(events: Iterable[dict[str, Any]]) -> Lineage:
    out = Lineage()
    for e in events:
        kind, step = e.get("event"), e.get("step")
        if kind == "restored":
            out.restores += 1
            gone = [s for s in out.commits if s >= step]
            out.replayed += len(gone)
            for s in gone:
                del out.commits[s]
            for s in [s for s in out.checksums if s >= step]:
                del out.checksums[s]
        elif kind == "step_committed":
            out.commits[step] = e
        elif kind == "client_step" and "checksum" in e:
            out.checksums.setdefault(step, set()).add(e["checksum"])
    return out


def _tiles(ranges: list[tuple[int, int]], start: int, count: int) -> bool:
    cursor = start
    for a, n in sorted(r for r in ranges if r[1] > 0):
        if a != cursor:
            return False
        cursor += n
    return cursor == start + count


def audit(events: Iterable[dict[str, Any]], total_steps: int) -> list[str]:
    """The broken promises (empty: the run kept them all); see the module docstring."""
    lin = lineage(events)
    problems: list[str] = []
    missing = [s for s in range(total_steps) if s not in lin.commits]
    if missing:
        problems.append(f"steps never committed: {missing[:10]}")
    cursor = 0
    for s in sorted(lin.commits):
        e = lin.commits[s]
        sums = lin.checksums.get(s, set())
        if len(sums) != 1:
            problems.append(f"step {s}: {len(sums)} distinct checksums")
        start, count = e.get("sample_start"), e.get("sample_count")
        if start is None or count is None:
            problems.append(f"step {s}: no sample range recorded")
            continue
        if start != cursor:
            problems.append(f"step {s} starts at sample {start}, the previous step ended at {cursor}")
        ranges = [(a, n) for parts in (e.get("samples") or {}).values() for a, n in parts]
        if not _tiles(ranges, start, count):
            problems.append(f"step {s}: member ranges {sorted(ranges)} do not tile [{start}, {start + count})")
        cursor = start + count
    return problems

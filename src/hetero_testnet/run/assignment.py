"""Per-round data assignment (the reference's rule), as a pure function.

The global batch of B sequences is split over the n trainers of the round: each gets B // n
sequences and the first B % n get one more; each gets one contiguous range of sample ids starting
at the round's data index. The trainers' order is shuffled deterministically from (run seed, step),
so the same run always assigns the same samples. The data index advances by B only when a step
is committed: a discarded step's samples are assigned again, so no batch is silently lost.
With `counts` (capacity-aware shares, `run/shares.py`) each trainer gets its count instead of the
equal split; the ranges are still contiguous, in the same shuffled order, and cover the batch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleRange:
    start: int
    count: int


def assign_samples(client_ids: list[int], global_batch: int, data_index: int, *, seed: int,
                   step: int, counts: Mapping[int, int] | None = None) -> dict[int, SampleRange]:
    """Each trainer's contiguous range of the step's `global_batch` samples (module docstring);
    `counts` (client id -> sequences, summing to `global_batch`) replaces the equal split."""
    if not client_ids:
        return {}
    if counts is not None and (set(counts) != set(client_ids) or sum(counts.values()) != global_batch
                               or min(counts.values()) < 0):
        raise ValueError(f"counts {dict(counts)} must cover {sorted(client_ids)} and sum to {global_batch}")
    order = sorted(client_ids)
    random.Random(f"{seed}/{step}").shuffle(order)
    n = len(order)
    base, extra = divmod(global_batch, n)
    ranges: dict[int, SampleRange] = {}
    cursor = data_index
    for position, client_id in enumerate(order):
        count = counts[client_id] if counts is not None else base + (1 if position < extra else 0)
        ranges[client_id] = SampleRange(cursor, count)
        cursor += count
    return ranges

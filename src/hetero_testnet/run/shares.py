"""Capacity-aware batch shares: how many of a step's sequences each member trains.

`--shares equal` (the reference's rule, `assignment.assign_samples`): B // n each, the first B % n
one more. `--shares proportional`: each member's share follows its measured throughput at its tier,
so that a device half as fast gets half the samples and every member finishes its compute at about
the same time (no one idles at the Ready->Go barrier waiting for the slowest).

Throughput is an exponential moving average (`EMA_ALPHA`) of sequences per second of compute, from
the `ComputeDone` of every round: the compute time a client reports includes its emulated slowdown
(`run/throttle.py`), so the shares see the device the client emulates, not the core it shares.
The split is re-planned when the membership changes and every `replan_every` steps, never in
between, so it is stable and each change is one `shares` event. A member not measured yet (a joiner,
the first rounds) counts at the median of the measured ones (1.0 each when none is); a member that
rejoins keeps the rate it was last measured at (the same device) until new rounds update it.

Why any split is exact: the exchange averages each parameter over the tokens of the members that
computed it (`exchange/aggregation.py`), so with equal tiers the committed gradient is that of
the whole global batch however it is cut; with mixed tiers the split decides which samples a wider
tier sees, which the `shares` events record.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from hetero_testnet.errors import ConfigError

SHARE_MODES = ("equal", "proportional")
DEFAULT_SHARES = "equal"
"""Equal stays the default: a proportional split depends on timing, so two runs of mixed tiers with
the same seed would train their wider tiers on different samples (see README "Devices")."""
DEFAULT_REPLAN_EVERY = 10
"""Steps between re-plans of a proportional split (membership changes re-plan at once)."""
EMA_ALPHA = 0.3
"""Weight of the newest round in the throughput average."""


def check_shares(mode: str, replan_every: int = DEFAULT_REPLAN_EVERY) -> str:
    """`mode` if it and `replan_every` are valid; ConfigError naming the flag otherwise."""
    if mode not in SHARE_MODES:
        raise ConfigError(f"--shares must be one of {', '.join(SHARE_MODES)} (got {mode!r})")
    if replan_every < 1:
        raise ConfigError(f"--replan-every must be >= 1 (got {replan_every})")
    return mode


def split_batch(total: int, weights: Mapping[int, float]) -> dict[int, int]:
    """`total` sequences cut in proportion to `weights` (client id -> weight > 0): largest remainder,
    at least one each while `total` allows, ties by client id; the counts sum to `total`."""
    ids = sorted(weights)
    if not ids:
        return {}
    if any(not math.isfinite(weights[c]) or weights[c] <= 0 for c in ids):
        raise ValueError(f"share weights must be finite and > 0 (got {dict(weights)})")
    whole = sum(weights[c] for c in ids)
    ideal = {c: total * weights[c] / whole for c in ids}
    floor = 1 if total >= len(ids) else 0
    counts = {c: max(floor, math.floor(ideal[c])) for c in ids}
    short = total - sum(counts.values())
    by_remainder = sorted(ids, key=lambda c: (-(ideal[c] - counts[c]), c))
    i = 0
    while short > 0:  # add to the largest remainders
        counts[by_remainder[i % len(ids)]] += 1
        short, i = short - 1, i + 1
    by_excess = sorted(ids, key=lambda c: (ideal[c] - counts[c], c))
    i = 0
    while short < 0:  # the floor took too much: take back from the most over-served
        c = by_excess[i % len(ids)]
        if counts[c] > floor:
            counts[c] -= 1
            short += 1
        i += 1
    return counts


class SharePlanner:
    """The coordinator's side of `--shares`: measured throughputs and the current split's weights."""

    def __init__(self, mode: str = DEFAULT_SHARES, replan_every: int = DEFAULT_REPLAN_EVERY) -> None:
        self.mode = check_shares(mode, replan_every)
        self.replan_every = replan_every
        self.rates: dict[int, float] = {}
        """client id -> EMA of sequences per second of compute."""
        self.planned: dict[int, float] | None = None
        """The weights of the current split (None: not planned yet, or equal shares)."""
        self.planned_at: int | None = None
        self.planned_for: tuple[int, ...] = ()

    def observe(self, client_id: int, sequences: int, compute_time_s: float) -> None:
        """Record one round of one member; rounds that trained nothing or took no time are ignored."""
        if sequences <= 0 or not math.isfinite(compute_time_s) or compute_time_s <= 0:
            return
        rate = sequences / compute_time_s
        old = self.rates.get(client_id)
        self.rates[client_id] = rate if old is None else EMA_ALPHA * rate + (1 - EMA_ALPHA) * old

    def weights(self, member_ids: Sequence[int], step: int) -> tuple[dict[int, float] | None, bool]:
        """(the weights of this step's split, True when it was re-planned now); (None, False) under
        equal shares."""
        if self.mode == "equal":
            return None, False
        members = tuple(sorted(member_ids))
        due = (self.planned is None or members != self.planned_for or self.planned_at is None
               or step - self.planned_at >= self.replan_every)
        if not due:
            return self.planned, False
        known = [self.rates[c] for c in members if c in self.rates]
        fallback = statistics.median(known) if known else 1.0
        self.planned = {c: self.rates.get(c, fallback) for c in members}
        self.planned_at, self.planned_for = step, members
        return self.planned, True

"""What each member trains in a round, and how a repeated diloco round keeps the survivors' work.

A pure decision, kept out of the coordinator's loop so it can be tested without a run.

- Every mode but diloco: one step per round; each attempt assigns the global batch afresh over the
  current members (`assignment.assign_samples`), so a discarded step's samples go to the survivors.
- diloco: a round is `inner_steps` = min(H, steps left) steps; its `inner_steps` global batches
  are assigned at once, one contiguous range per member (the client cuts it into inner steps).
  When a round is repeated (the same step, after a discard), every member of the failed attempt
  that is still here gets its *same* range again, so it keeps its local progress and redoes only
  the exchange (`exchange/diloco_stepper.py`); the ranges of members that are gone are handed to
  the survivors whole, round-robin in client-id order, as `extra` ranges to train before the
  exchange; a member new to the round gets nothing to train. No sample is lost or trained twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hetero_testnet.config import RunConfig
from hetero_testnet.run import protocol as P
from hetero_testnet.run.assignment import SampleRange, assign_samples
from hetero_testnet.run.shares import split_batch


@dataclass(frozen=True)
class MemberWork:
    """One member's share of a round."""

    main: SampleRange
    extra: tuple[SampleRange, ...] = ()

    def all_ranges(self) -> list[SampleRange]:
        return [self.main, *self.extra]


@dataclass(frozen=True)
class RoundPlan:
    step: int
    inner_steps: int
    work: dict[int, MemberWork] = field(default_factory=dict)
    """client id -> its share."""

    def message(self, client_id: int, *, epoch: int, generation: int) -> P.Round:
        """The `Round` that tells `client_id` its share."""
        w = self.work[client_id]
        return P.Round(step=self.step, epoch=epoch, generation=generation, sample_start=w.main.start,
                       sample_count=w.main.count, inner_steps=self.inner_steps,
                       extra_ranges=[[r.start, r.count] for r in w.extra])


class RoundPlanner:
    """Plans rounds; remembers the last attempt so a repeated diloco round keeps survivors' ranges."""

    def __init__(self, *, seed: int, inner_steps: int = 1, keep_on_retry: bool = False, start_step: int = 0) -> None:
        self.seed = seed
        self.inner_steps = inner_steps
        self.keep_on_retry = keep_on_retry
        self.last: RoundPlan | None = None
        """The last attempt, until it is committed."""
        self.last_committed = start_step - 1
        """The first step of the last committed round (start_step - 1 before any)."""

    @classmethod
    def for_run(cls, config: RunConfig, sync: str, *, start_step: int = 0) -> "RoundPlanner":
        """The planner of a run: H-step rounds that keep survivors' ranges under diloco, else 1-step rounds."""
        diloco = sync == "diloco"
        return cls(seed=config.seed, inner_steps=config.sync.diloco.inner_steps if diloco else 1,
                   keep_on_retry=diloco, start_step=start_step)

    def steps_in_round(self, step: int, total_steps: int) -> int:
        """min(H, steps left), at least 1 (a run extended past its schedule still trains)."""
        return max(1, min(self.inner_steps, total_steps - step))

    def plan(self, member_ids: Sequence[int], step: int, total_steps: int, batch: int,
             data_index: int, weights: Mapping[int, float] | None = None) -> RoundPlan:
        """The round at `step` for `member_ids`; `batch` sequences per step from `data_index`, split in
        proportion to `weights` (`run/shares.py`) or equally (None)."""
        last = self.last
        if self.keep_on_retry and last is not None and last.step == step:
            kept = sorted(c for c in member_ids if c in last.work)
            if kept:
                self.last = self._repeat(last, member_ids, kept)
                return self.last
        inner = self.steps_in_round(step, total_steps)
        counts = split_batch(inner * batch, {c: weights[c] for c in member_ids}) if weights is not None else None
        ranges = assign_samples(list(member_ids), inner * batch, data_index, seed=self.seed, step=step,
                                counts=counts)
        self.last = RoundPlan(step, inner, {c: MemberWork(r) for c, r in ranges.items()})
        return self.last

    def _repeat(self, last: RoundPlan, member_ids: Sequence[int], kept: list[int]) -> RoundPlan:
        orphans = [r for c, w in sorted(last.work.items()) if c not in member_ids for r in w.all_ranges()
                   if r.count > 0]
        extras: dict[int, list[SampleRange]] = {c: list(last.work[c].extra) for c in kept}
        for i, r in enumerate(orphans):
            extras[kept[i % len(kept)]].append(r)
        work = {c: MemberWork(last.work[c].main, tuple(extras[c])) for c in kept}
        empty = SampleRange(last.work[kept[0]].main.start, 0)
        work.update({c: MemberWork(empty) for c in member_ids if c not in work})
        return RoundPlan(last.step, last.inner_steps, work)

    def committed(self, step: int) -> None:
        """The round that starts at `step` was applied: the next plan is a new round."""
        self.last = None
        self.last_committed = step

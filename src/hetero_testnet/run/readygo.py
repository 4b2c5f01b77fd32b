"""The Ready->Go barrier of a round, and the timeouts of a generation's waits on its peers.

A round in two halves, so that no client ever waits inside a collective on a peer that is still
computing (or hung):

    coordinator -> members   Round
    member -> coordinator    ComputeDone(compute_time_s)     every member, by the round deadline
    coordinator -> members   Go(exchange_timeout_s)           or Discard (stragglers dropped)
    member -> coordinator    Reduced | RoundFailed            by the exchange deadline

The compute may take long and differ between tiers; it is bounded by the config's
`max_round_train_time` (a straggler is dropped at it) and by hang detection (a member silent for
`membership.HANG_TIMEOUT_S` is dropped at once). After `Go` every member enters the collective
within a message's latency of the others, so the collective needs only a short timeout, derived
from its measured cost: `EXCHANGE_TIMEOUT_FLOOR_S + EXCHANGE_TIMEOUT_FACTOR x` the slowest
member's collective time over the last `EXCHANGE_WINDOW` committed rounds (before any round was
measured: `max_round_train_time`). Gloo applies it to every operation, so a member hung after `Go`
costs the others at most that long. Group formation runs under `FORM_TIMEOUT_S`, in a thread the
client abandons as soon as the coordinator announces another generation.

Failure semantics of the round (the coordinator's side, `Coordinator.train_round`):
- a member lost, hung, or reporting `RoundFailed` before Go: Discard to all, nobody entered a
  collective; a member late at the round deadline is dropped (it may rejoin);
- after Go: the same, and the survivors' collectives fail at once (a killed peer) or after the
  exchange timeout (a hung one); a member silent past `reply_deadline_s` is dropped;
- `compute_done` events record every member's compute time and when it was ready (capacity data).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from hetero_testnet.events import Event, EventWriter
from hetero_testnet.run import protocol as P
from hetero_testnet.run.inbox import Gathered
from hetero_testnet.run.membership import Member, Membership

EXCHANGE_TIMEOUT_FLOOR_S = 4.0
"""Added to every derived exchange timeout: scheduling noise on a loaded machine (2 cores, 4 processes)."""
EXCHANGE_TIMEOUT_FACTOR = 8.0
"""The slowest recent collective time, times this."""
EXCHANGE_WINDOW = 20
"""Committed rounds whose collective times the timeout is derived from."""
REPLY_MARGIN_S = 2.0
"""After Go, the coordinator waits this long past the exchange's own bounds for the replies."""
FORM_TIMEOUT_S = 6.0
"""Forming a group and broadcasting the state to joiners (3-80 ms and ~0.1 s per 80 MB measured)."""


class ExchangeTimeouts:
    """The timeout of a round's collectives, from the measured cost of the recent rounds."""

    def __init__(self, initial_s: float) -> None:
        self.initial_s = initial_s
        self.collective_s: deque[float] = deque(maxlen=EXCHANGE_WINDOW)
        self.exchange_s: deque[float] = deque(maxlen=EXCHANGE_WINDOW)

    def observe(self, reduced: Mapping[int, P.Reduced]) -> None:
        """Record a committed round: its slowest member's collective and whole-exchange times."""
        if reduced:
            self.collective_s.append(max(r.collective_time_s for r in reduced.values()))
            self.exchange_s.append(max(r.exchange_time_s for r in reduced.values()))

    @property
    def timeout_s(self) -> float:
        """`Go.exchange_timeout_s`: the per-operation timeout of the round's collectives."""
        if not self.collective_s:
            return self.initial_s
        return round(EXCHANGE_TIMEOUT_FLOOR_S + EXCHANGE_TIMEOUT_FACTOR * max(self.collective_s), 3)

    @property
    def reply_deadline_s(self) -> float:
        """How long after Go the coordinator waits for every `Reduced`."""
        rest = EXCHANGE_TIMEOUT_FACTOR * max(self.exchange_s) if self.exchange_s else self.initial_s
        return self.timeout_s + rest + REPLY_MARGIN_S


def round_failure(gathered: Gathered, membership: Membership, step: int, deadline: str) -> str | None:
    """Why a round's gather failed (None: it did not); at a timeout the late members are dropped."""
    if not gathered.timed_out:
        return gathered.failure
    for m in gathered.late:
        membership.drop(m, f"missed the {deadline} at step {step}", step=step)
    return f"{deadline} missed by client(s) " + ", ".join(str(m.client_id) for m in gathered.late)


def accept_compute_done(events: EventWriter, step: int, generation: int, round_started: float,
                        on_ready: Callable[[Member, P.ComputeDone, float], None] | None = None
                        ) -> Callable[[Member, Any], bool | str]:
    """`Inbox.gather`'s accept for the Ready half: a `ComputeDone` of this round (recorded as a
    `compute_done` event and handed to `on_ready(member, message, ready_after_s)`), or the member's
    `RoundFailed`."""
    def accept(member: Member, message: Any) -> bool | str:
        if isinstance(message, P.ComputeDone) and message.step == step and message.generation == generation:
            ready_after = time.monotonic() - round_started
            events.emit(Event.COMPUTE_DONE, client_id=member.client_id, step=step, generation=generation,
                        tier=member.tier, compute_time_s=round(message.compute_time_s, 6),
                        emulated_s=round(message.throttle_s, 6), ready_after_s=round(ready_after, 6), log=False)
            if on_ready is not None:
                on_ready(member, message, ready_after)
            return True
        if isinstance(message, P.RoundFailed) and message.generation == generation:
            return f"client {member.client_id} failed step {step}: {message.reason}"
        return False
    return accept

"""Who is in a run: admission (token, tier, identity), loss, drops and liveness of clients.

Vocabulary: `client_id` is a stable identity that survives restarts; each connection of it is an
`incarnation`. A member is `alive` while its connection is; `in_generation` while it belongs to the
current process group; `state_step` is the step whose parameters it holds (None: unknown, so it
must receive them by broadcast before it trains). A generation is `broken` once a member of it is
lost. The coordinator decides what to do with these facts; this module keeps them, and drops
members that stopped answering.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.config import RunConfig
from hetero_testnet.config.devices import DeviceProfile, profile_from_fields
from hetero_testnet.errors import ConfigError
from hetero_testnet.events import Event, EventWriter, RunState
from hetero_testnet.model.matformer import ffn_width
from hetero_testnet.run import protocol as P
from hetero_testnet.run.plan import check_helper_fraction

log = logging.getLogger("hetero_testnet")

HANG_TIMEOUT_S = 5.0
"""A member silent this long (no heartbeat) is hung, e.g. SIGSTOPped, and is dropped."""


@dataclass
class Member:
    client_id: int
    tier: int
    ffn_width: int
    helper_fraction: float
    writer: asyncio.StreamWriter
    host: str
    pid: int
    incarnation: int
    state_step: int | None
    """The step whose state this client holds (None: unknown, it needs a broadcast)."""
    alive: bool = True
    in_generation: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    """When anything (a heartbeat included) last arrived from this client."""
    steps_trained: int = 0
    last_loss: float | None = None
    nan_inf: int = 0
    joins: int = 1
    bytes_sent: int = 0
    """Bytes on the wire over its committed rounds (all incarnations), as its `Reduced` reported them."""
    bytes_received: int = 0
    ready: bool = False
    """It reported `Ready` (its model is built): only ready members are put into a generation."""
    joined_at: float = field(default_factory=time.monotonic)
    """When this connection was admitted (a member not ready yet is setting up since then)."""
    profile: DeviceProfile | None = None
    """The device it says it emulates (`Hello.profile`); None: this machine's own speed and link."""

    def send(self, message: P.Message) -> None:
        """Queue a message; a dead or closing connection is ignored (its loss is reported elsewhere)."""
        if not self.alive:
            return
        try:
            self.writer.write(P.encode(message))
        except (OSError, RuntimeError) as e:
            log.debug("send to client %s failed: %s", self.client_id, e)


class Membership:
    def __init__(self, *, token: str, config: RunConfig, sync: str, events: EventWriter,
                 counters: dict[str, int]) -> None:
        self.token = token
        self.intermediate_size = config.model.intermediate_size
        self.tier_rule = tier_rule(config, sync)
        """Checks a joiner's tier beyond `ffn_width` (raises `ConfigError`); None when there is nothing to check."""
        self.events = events
        self.counters = counters
        self.members: dict[int, Member] = {}
        self.next_client_id = 1
        self.broken: str | None = None
        """Why the current generation broke (a member of it was lost, dropped or failed); None while
        it is whole. Latched: the first reason stays until the coordinator forms the next generation."""

    def admit(self, hello: P.Message, writer: asyncio.StreamWriter, peer: Any, *, step: int,
              run_state: RunState, holds_current_state: bool,
              on_replaced: Callable[[Member], None]) -> Member | None:
        """A new member from its first message, or None after sending `Reject` (and logging why).

        The token is compared in constant time and never logged. Nobody joins a run that is ending
        (`run_state.is_ending`). The tier and helper fraction follow matformer's rules. A client id
        already alive is treated as a restart: `on_replaced(old)` retires the old incarnation first.
        """
        def reject(reason: str) -> None:
            writer.write(P.encode(P.Reject(reason=reason)))
            self.counters["rejected"] += 1
            self.events.emit(Event.CLIENT_REJECTED, level=logging.WARNING, peer=str(peer), reason=reason)

        if not isinstance(hello, P.Hello):
            reject("the first message must be hello")
            return None
        if not hmac.compare_digest(hello.token.encode(), self.token.encode()):
            reject("invalid run token")
            return None
        if run_state.is_ending:
            reject(f"the run is in state {run_state}")
            return None
        try:
            width = ffn_width(self.intermediate_size, hello.tier)
            if self.tier_rule is not None:
                self.tier_rule(hello.tier)
            check_helper_fraction(hello.helper_fraction,
                                  error=f"helper fraction {hello.helper_fraction} is outside [0, 1]")
            profile = profile_from_hello(hello.profile)
        except ConfigError as e:
            reject(str(e))
            return None
        client_id = hello.client_id
        if client_id is None:
            while self.next_client_id in self.members:
                self.next_client_id += 1
            client_id = self.next_client_id
        previous = self.members.get(client_id)
        if previous is not None and previous.alive:
            on_replaced(previous)
        member = Member(client_id=client_id, tier=hello.tier, ffn_width=width,
                        helper_fraction=hello.helper_fraction, writer=writer, host=hello.host or str(peer),
                        pid=hello.pid, incarnation=(previous.incarnation + 1) if previous else 0,
                        state_step=step if holds_current_state else None,
                        joins=(previous.joins + 1) if previous else 1, profile=profile)
        if previous is not None:
            member.steps_trained, member.nan_inf = previous.steps_trained, previous.nan_inf
            member.bytes_sent, member.bytes_received = previous.bytes_sent, previous.bytes_received
            self.counters["rejoins"] += 1
        self.members[client_id] = member
        self.events.emit(Event.CLIENT_JOINED, client_id=client_id, step=step, tier=hello.tier, ffn_width=width,
                         helper_fraction=hello.helper_fraction, pid=hello.pid, host=member.host,
                         incarnation=member.incarnation, threads=hello.threads, device=hello.device,
                         profile=profile.to_dict() if profile is not None else None)
        return member

    def mark_lost(self, member: Member, reason: str, *, step: int) -> None:
        """Retire a member; if it was in the current generation, that generation is broken."""
        if not member.alive:
            return
        member.alive = False
        self.counters["clients_lost"] += 1
        self.events.emit(Event.CLIENT_LOST, level=logging.WARNING, client_id=member.client_id, step=step,
                         reason=reason)
        if member.in_generation:
            self.broken = self.broken or f"client {member.client_id} lost: {reason}"
        member.in_generation = False
        try:
            member.writer.close()
        except Exception:  # noqa: BLE001 - closing a dead transport
            pass

    def drop(self, member: Member, reason: str, *, step: int) -> None:
        """Remove a live but unresponsive client (it is told why); it may rejoin when it wakes up."""
        member.send(P.Dropped(reason=reason))
        self.counters["clients_dropped"] += 1
        self.mark_lost(member, f"dropped: {reason}", step=step)

    def drop_hung(self, members: list[Member], *, step: int) -> str | None:
        """Drop the members silent (no message, not even a heartbeat) for HANG_TIMEOUT_S; returns
        why, or None if none is. The others may be blocked in a collective with them, not hung."""
        now = time.monotonic()
        hung = [m for m in members if m.alive and now - m.last_seen > HANG_TIMEOUT_S]
        for m in hung:
            self.drop(m, f"no heartbeat for {HANG_TIMEOUT_S:.0f} s at step {step}", step=step)
        return "client(s) " + ", ".join(str(m.client_id) for m in hung) + " stopped responding" if hung else None

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.alive]

    def ready(self) -> list[Member]:
        """The live members that finished their setup (`Ready`): the ones a generation can include."""
        return [m for m in self.members.values() if m.alive and m.ready]


def profile_from_hello(raw: dict[str, Any]) -> DeviceProfile | None:
    """A joiner's `Hello.profile`, validated like a config's (ConfigError names what is wrong);
    None for {} (no emulation)."""
    if not raw:
        return None
    fields = dict(raw)
    name = fields.pop("name", "client")
    if not isinstance(name, str):
        raise ConfigError("device profile name must be a string")
    return profile_from_fields(name, fields, "hello.profile")


def tier_rule(config: RunConfig, sync: str) -> Callable[[int], None] | None:
    """What a tier must satisfy under `sync` beyond having FFN neurons: under demo, an FFN width that is
    a whole number of DeMo blocks (`ConfigError` otherwise, so the joiner is rejected with the reason)."""
    if sync != "demo":
        return None
    from hetero_testnet.exchange.demo_stepper import check_demo_tiers

    return lambda tier: check_demo_tiers(config, [tier])

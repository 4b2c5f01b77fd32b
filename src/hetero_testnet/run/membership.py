"""Who is in a run: admission (token, tier, identity), loss, drops and liveness of clients.

Vocabulary: `client_id` is a stable identity that survives restarts; each connection of it is an
`incarnation`. A member is `alive` while its connection is; `in_generation` while it belongs to the
current process group; `state_step` is the step whose parameters it holds (None: unknown, so it
must receive them by broadcast before it trains). The coordinator decides what to do with these
facts; this module only keeps them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.run import protocol as P
from hetero_testnet.errors import ConfigError
from hetero_testnet.events import EventWriter
from hetero_testnet.model.matformer import ffn_width

log = logging.getLogger("hetero_testnet")


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

    def send(self, message: P.Message) -> None:
        """Queue a message; a dead or closing connection is ignored (its loss is reported elsewhere)."""
        if not self.alive:
            return
        try:
            self.writer.write(P.encode(message))
        except (OSError, RuntimeError) as e:
            log.debug("send to client %s failed: %s", self.client_id, e)


class Membership:
    def __init__(self, *, token: str, intermediate_size: int, events: EventWriter,
                 counters: dict[str, int]) -> None:
        self.token = token
        self.intermediate_size = intermediate_size
        self.events = events
        self.counters = counters
        self.members: dict[int, Member] = {}
        self.next_client_id = 1

    def admit(self, hello: P.Message, writer: asyncio.StreamWriter, peer: Any, *, step: int,
              closed_reason: str | None, holds_current_state: bool,
              on_replaced: Callable[[Member], None]) -> Member | None:
        """A new member from its first message, or None after sending `Reject` (and logging why).

        The token is compared in constant time and never logged. A client id already alive is
        treated as a restart: `on_replaced(old)` retires the old incarnation first.
        """
        def reject(reason: str) -> None:
            writer.write(P.encode(P.Reject(reason=reason)))
            self.counters["rejected"] += 1
            self.events.emit("client_rejected", level=logging.WARNING, peer=str(peer), reason=reason)

        if not isinstance(hello, P.Hello):
            reject("the first message must be hello")
            return None
        if not hmac.compare_digest(hello.token.encode(), self.token.encode()):
            reject("invalid run token")
            return None
        if closed_reason:
            reject(closed_reason)
            return None
        try:
            width = ffn_width(self.intermediate_size, hello.tier)
            if not 0.0 <= hello.helper_fraction <= 1.0:
                raise ConfigError(f"helper fraction {hello.helper_fraction} is outside [0, 1]")
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
                        joins=(previous.joins + 1) if previous else 1)
        if previous is not None:
            member.steps_trained, member.nan_inf = previous.steps_trained, previous.nan_inf
            self.counters["rejoins"] += 1
        self.members[client_id] = member
        self.events.emit("client_joined", client_id=client_id, step=step, tier=hello.tier, ffn_width=width,
                         helper_fraction=hello.helper_fraction, pid=hello.pid, host=member.host,
                         incarnation=member.incarnation, threads=hello.threads, device=hello.device)
        return member

    def mark_lost(self, member: Member, reason: str, *, step: int) -> bool:
        """Retire a member; returns True if it was in the current generation (the group is broken)."""
        if not member.alive:
            return False
        member.alive = False
        self.counters["clients_lost"] += 1
        self.events.emit("client_lost", level=logging.WARNING, client_id=member.client_id, step=step,
                         reason=reason)
        was_in_generation, member.in_generation = member.in_generation, False
        try:
            member.writer.close()
        except Exception:  # noqa: BLE001 - closing a dead transport
            pass
        return was_in_generation

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.alive]

    def hung(self, members: list[Member], timeout_s: float) -> list[Member]:
        """Live members silent (no message, not even a heartbeat) for longer than `timeout_s`."""
        now = time.monotonic()
        return [m for m in members if m.alive and now - m.last_seen > timeout_s]

"""The coordinator's inbox: every member's messages, in arrival order, through one queue.

Each client connection gets a reader task, `handle_connection`: its first message must be a hello
(at most `protocol.MAX_HELLO_BYTES`) within HELLO_TIMEOUT_S, which the coordinator's `admit` turns
into a `Member` (or rejects: wrong token, bad tier, ...); after
that every message but heartbeats is queued (a heartbeat only refreshes `Member.last_seen`), and so
is the connection's end. The state machine waits only through `next_message`, so one place decides
what a wait sees.

Hostile input never stops or stalls the coordinator: each bad connection is logged once and closed
(`connection_dropped`: no hello in time, closed before hello, too many waiting; `protocol_error`:
a malformed frame or message, wrong field types included; `client_rejected`: a wrong token or a
bad hello). Message fields carry no client id: a connection speaks only for the member it
authenticated as, so nobody can send for another client.

Failure semantics of `next_message(deadline)`:
- it returns None at the deadline, never later;
- a closed connection is reported to `on_lost` (the member is lost, its generation broken) and is
  not returned; messages of members already lost are skipped;
- once `request_stop` was called it raises `RunAborted` (status interrupted);
- background messages (checksums, evals, saves) go to `StepRecords.record` (which raises
  `RunAborted` when the replicas diverged) and are returned too, so every wait re-checks its
  condition after each of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetero_testnet.errors import ProtocolError, RunAborted
from hetero_testnet.events import Event, EventWriter
from hetero_testnet.run import protocol as P
from hetero_testnet.run.membership import Member, Membership
from hetero_testnet.run.records import StepRecords

log = logging.getLogger("hetero_testnet")

HELLO_TIMEOUT_S = 10.0
"""A new connection must say hello within this time, or it is closed."""
MAX_PENDING_CONNECTIONS = 256
"""Connections that have not said hello yet; more are closed at once (an idle-connection flood)."""
HANG_CHECK_INTERVAL_S = 1.0
"""How often a wait for replies looks for hung members."""
_JOINED = object()
"""Queued (never sent) when a client is admitted, so waits re-check membership at once."""


@dataclass
class Gathered:
    """What `Inbox.gather` collected, and why it stopped early (if it did)."""

    replies: dict[int, Any]
    """client id -> the reply accepted from it."""
    failure: str | None = None
    """Why the wait failed: the generation broke, a member hung, or a member reported a failure."""
    timed_out: bool = False
    late: list[Member] = field(default_factory=list)
    """At a timeout: the live members without a reply (the caller drops them, with its reason)."""


class Inbox:
    def __init__(self, *, membership: Membership, records: StepRecords, events: EventWriter,
                 admit: Callable[[P.Message, asyncio.StreamWriter, Any], Member | None],
                 on_lost: Callable[[Member, str], None]) -> None:
        self.membership = membership
        self.records = records
        self.events = events
        self.admit = admit
        """hello -> a new member (its Welcome already written), or None (Reject written)."""
        self.on_lost = on_lost
        self.queue: asyncio.Queue[tuple[Member | None, Any]] = asyncio.Queue()
        """(member, message); message None: its connection closed; member None: only wake the wait."""
        self.stop_reason: str | None = None
        self.pending = 0
        """Connections waiting for their hello."""

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection, from hello to close (an asyncio server's callback). Whatever a peer
        sends, this never raises: a bad connection is logged once (module docstring) and closed."""
        peer = str(writer.get_extra_info("peername"))
        member: Member | None = None
        if self.pending >= MAX_PENDING_CONNECTIONS:
            self._dropped(peer, f"more than {MAX_PENDING_CONNECTIONS} connections are waiting to say hello")
            writer.close()
            return
        self.pending += 1
        try:
            try:
                hello = await asyncio.wait_for(P.read_message(reader, P.MAX_HELLO_BYTES), timeout=HELLO_TIMEOUT_S)
            finally:
                self.pending -= 1
            member = self.admit(hello, writer, peer)
            if member is None:
                await asyncio.wait_for(writer.drain(), HELLO_TIMEOUT_S)
                return
            self.queue.put_nowait((member, _JOINED))
            await self._serve_member(member, reader)
        except asyncio.TimeoutError:
            if member is None:
                self._dropped(peer, f"no hello within {HELLO_TIMEOUT_S:.0f} s")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if member is None:
                self._dropped(peer, f"closed before hello ({type(e).__name__})")
        except ProtocolError as e:
            self.membership.counters["protocol_errors"] += 1
            self.events.emit(Event.PROTOCOL_ERROR, level=logging.WARNING, peer=peer, reason=str(e)[:300],
                             client_id=member.client_id if member is not None else None)
        except asyncio.CancelledError:
            return  # the loop is shutting down; the member is reported by the run's end
        except Exception as e:  # noqa: BLE001 - a peer must never take the coordinator down
            log.exception("internal error serving %s", peer)
            self._dropped(peer, f"internal error: {type(e).__name__}: {e}"[:300])
        finally:
            if member is not None:
                await self.queue.put((member, None))
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a dead transport
                pass

    async def _serve_member(self, member: Member, reader: asyncio.StreamReader) -> None:
        while True:
            message = await P.read_message(reader)
            member.last_seen = time.monotonic()
            if not isinstance(message, P.Heartbeat):
                await self.queue.put((member, message))

    def _dropped(self, peer: str, reason: str) -> None:
        self.membership.counters["connections_dropped"] += 1
        self.events.emit(Event.CONNECTION_DROPPED, level=logging.INFO, peer=peer, reason=reason)

    def wake(self) -> None:
        """Make the current wait re-check its condition (a pause, a stop)."""
        self.queue.put_nowait((None, None))

    def request_stop(self, reason: str) -> None:
        """The next (or current) wait raises RunAborted(reason, status interrupted)."""
        self.stop_reason = reason
        self.wake()

    async def next_message(self, deadline: float) -> tuple[Member, Any] | None:
        """Next message from a live member before `deadline` (monotonic), else None (see the module
        docstring for what is skipped and what raises). It may be the `_JOINED` marker: ignore it."""
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            try:
                member, message = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
            if self.stop_reason:
                raise RunAborted(self.stop_reason, status="interrupted")
            if member is None:
                continue
            if message is None:
                if member.alive and self.membership.members.get(member.client_id) is member:
                    self.on_lost(member, "connection closed")
                continue
            if not member.alive:
                continue
            if isinstance(message, P.Ready):
                member.ready = True
            if message is not _JOINED:
                self.records.record(member, message)
            return member, message

    async def wait_for_members(self, *, need: int, expected: int, first: bool, timeout_s: float,
                               extra_time_s: float, setup_s: float = 0.0) -> None:
        """Until enough members are connected and ready: `max(need, expected)`, or `need` for `extra_time_s`.

        The first time without `expected` it always waits the extra time (late starters may join);
        afterwards `need` is enough at once. Raises RunAborted when fewer than `need` are ready
        after `timeout_s` without progress (a member connecting or becoming ready restarts the
        clock), unless enough others are connected and still setting up (for at most `setup_s` since
        they joined: a restarted client builds its model before it is `Ready`). The first wait of a
        launched run (`expected`) starts its clock at the first connection: its clients may take
        long to start (32 importing torch on 2 cores: about a minute), and the launcher fails the
        run when they all exit before joining. It waits for every expected client, never only the
        extra time (the launcher starts them in waves, the later ones seconds after the first):
        only `timeout_s` without one arriving starts the run with the `need` or more that came.
        """
        launched = first and expected > 0
        deadline = time.monotonic() + timeout_s
        enough_since: float | None = None
        most = (0, 0)  # the most members connected, and ready, so far: more is progress
        while True:
            alive = len(self.membership.ready())
            if alive >= max(need, expected) and (expected or not first):
                return
            if alive >= need and not launched:
                enough_since = enough_since or time.monotonic()
                if time.monotonic() - enough_since >= extra_time_s:
                    return
            elif enough_since is not None:
                enough_since = None
            wait_until = min(deadline, (enough_since + extra_time_s) if enough_since else deadline)
            item = await self.next_message(wait_until)
            now = time.monotonic()
            counts = (len(self.membership.alive()), len(self.membership.ready()))
            if counts[0] > most[0] or counts[1] > most[1] or (first and expected and not counts[0]):
                deadline = max(deadline, now + timeout_s)
            most = (max(most[0], counts[0]), max(most[1], counts[1]))
            if item is None and now >= deadline and launched and alive >= need:
                return  # the expected clients that came; the others may still join a later generation
            coming = [m for m in self.membership.alive() if not m.ready and now - m.joined_at < setup_s]
            if item is None and now >= deadline and alive + len(coming) >= need:
                deadline = min(m.joined_at for m in coming) + setup_s  # give them their setup time
            elif item is None and now >= deadline:
                raise RunAborted(f"only {alive} of the {need} clients needed (min_clients) were connected and ready "
                                 f"after {timeout_s:.0f} s without one arriving")

    async def gather(self, members: list[Member], accept: Callable[[Member, Any], bool | str],
                     deadline: float, *, step: int) -> Gathered:
        """Wait until each of `members` has sent a reply, the wait fails, or `deadline` (monotonic) passes.

        `accept(member, message)` returns True for a reply (kept by client id), a reason for a message
        that fails the wait (a `RoundFailed`), and False for anything else. It returns early when:
        - the generation broke (a member was lost or replaced): `failure` is `membership.broken`;
        - a member sent nothing, not even a heartbeat, for `membership.HANG_TIMEOUT_S`: it is
          dropped (it may rejoin) and `failure` names it; the others may be blocked in a collective
          with it, not hung;
        - `accept` returned a reason: that is the `failure`;
        - the deadline passed: `timed_out`, and `late` lists the live members without a reply, for
          the caller to drop with its own reason.
        The replies are complete only when none of these happened; the caller must not commit otherwise.
        """
        replies: dict[int, Any] = {}
        while len(replies) < len(members):
            if self.membership.broken:
                return Gathered(replies, failure=self.membership.broken)
            waiting = [m for m in members if m.client_id not in replies]
            hung = self.membership.drop_hung(waiting, step=step)
            if hung:
                return Gathered(replies, failure=hung)
            item = await self.next_message(min(deadline, time.monotonic() + HANG_CHECK_INTERVAL_S))
            if item is None:
                if time.monotonic() < deadline:
                    continue
                return Gathered(replies, timed_out=True, late=[m for m in waiting if m.alive])
            member, message = item
            verdict = accept(member, message)
            if verdict is True:
                replies[member.client_id] = message
            elif verdict:
                return Gathered(replies, failure=verdict)
        return Gathered(replies)

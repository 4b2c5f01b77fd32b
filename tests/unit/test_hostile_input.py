"""Hostile input to the control port: each class is logged once, dropped, and the coordinator keeps serving.

A real `Coordinator` (tiny config) serves its inbox on a loopback port in this process, with a task
draining `next_message` as the state machine would. Only 127.0.0.1 is ever targeted. After every
attack a well-behaved client must still be welcomed at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hetero_testnet.run import inbox as inbox_module
from hetero_testnet.run import protocol as P
from hetero_testnet.run.coordinator import Coordinator
from hetero_testnet.run.plan import CoordinatorOptions

TOKEN = "the-run-token"


@asynccontextmanager
async def serving(tiny_config, tmp_path: Path):
    c = Coordinator(tiny_config, CoordinatorOptions(run_dir=tmp_path, token=TOKEN))
    server = await asyncio.start_server(c.inbox.handle_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def drain() -> None:
        while True:
            await c.inbox.next_message(asyncio.get_running_loop().time() + 3600)

    drainer = asyncio.create_task(drain())
    try:
        yield c, port
    finally:
        drainer.cancel()
        server.close()


def events(tmp_path: Path, peer: str | None = None) -> list[dict]:
    out = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    return [e for e in out if peer is None or e.get("peer") == peer]


async def settle(tmp_path: Path, peer: str, timeout: float = 5.0) -> list[dict]:
    """The events about `peer`, once there is at least one (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = events(tmp_path, peer)
        if found:
            await asyncio.sleep(0.2)  # a second event would come right after the first
            return events(tmp_path, peer)
        await asyncio.sleep(0.02)
    return []


async def attack(port: int, payload: bytes, *, close: bool = True) -> tuple[str, asyncio.StreamReader,
                                                                          asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = str(writer.get_extra_info("sockname"))
    writer.write(payload)
    await writer.drain()
    if close:
        writer.close()
    return peer, reader, writer


KEPT: list[asyncio.StreamWriter] = []
"""Connections a test keeps open (a dropped StreamWriter closes its connection)."""


async def welcomed(port: int, *, client_id: int | None = None, keep: bool = False) -> P.Message:
    """A well-behaved client's hello and the reply (within 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(P.encode(P.Hello(token=TOKEN, client_id=client_id, tier=0)))
    await writer.drain()
    reply = await asyncio.wait_for(P.read_message(reader), 5.0)
    if keep:
        KEPT.append(writer)
    else:
        writer.close()
    return reply


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello_body(**fields) -> bytes:
    return json.dumps({"v": 1, "type": "hello", **fields}).encode()


CLASSES = {
    "random bytes": (os.urandom(4096), "protocol_error"),
    "zero length prefix": (struct.pack(">I", 0), "protocol_error"),
    "2^32-1 length prefix": (struct.pack(">I", 2**32 - 1) + b"x" * 100, "protocol_error"),
    "truncated frame": (struct.pack(">I", 100) + b'{"v": 1, "type"', "connection_dropped"),
    "wrong field types": (frame(hello_body(token=TOKEN, client_id=None, tier="zero")), "protocol_error"),
    "missing fields": (frame(hello_body(client_id=None, tier=0)), "protocol_error"),
    "not json": (frame(b"\x00\xff garbage"), "protocol_error"),
    "wrong token": (frame(hello_body(token="guess", client_id=None, tier=0)), "client_rejected"),
    "first message not a hello": (P.encode(P.Heartbeat()), "client_rejected"),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_hostile_class_is_logged_once_and_dropped(name, tiny_config, tmp_path):
    payload, expected = CLASSES[name]

    async def scenario() -> None:
        async with serving(tiny_config, tmp_path) as (c, port):
            if name == "random bytes":  # random, but never a valid small frame
                payload_ = struct.pack(">I", P.MAX_HELLO_BYTES + 1 + int.from_bytes(payload[:2], "big")) + payload
            else:
                payload_ = payload
            peer, _, _ = await attack(port, payload_)
            found = await settle(tmp_path, peer)
            assert [e["event"] for e in found] == [expected], found
            assert isinstance(await welcomed(port), P.Welcome)

    asyncio.run(scenario())


def test_a_forged_hello_for_another_clients_id_does_not_displace_it(tiny_config, tmp_path):
    async def scenario() -> None:
        async with serving(tiny_config, tmp_path) as (c, port):
            assert isinstance(await welcomed(port, client_id=1, keep=True), P.Welcome)
            peer, _, _ = await attack(port, frame(hello_body(token="forged", client_id=1, tier=0)))
            assert [e["event"] for e in await settle(tmp_path, peer)] == ["client_rejected"]
            assert c.members[1].alive and c.members[1].incarnation == 0
            KEPT.pop().close()

    asyncio.run(scenario())


def test_a_slow_sender_is_cut_off_at_the_hello_deadline(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(inbox_module, "HELLO_TIMEOUT_S", 1.0)

    async def scenario() -> None:
        async with serving(tiny_config, tmp_path) as (c, port):
            body = frame(hello_body(token=TOKEN, client_id=None, tier=0))
            peer, reader, writer = await attack(port, body[:1], close=False)
            for byte in body[1:12]:  # one byte every 0.2 s: slower than the deadline allows
                await asyncio.sleep(0.2)
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
            found = await settle(tmp_path, peer)
            assert [e["event"] for e in found] == ["connection_dropped"] and "no hello" in found[0]["reason"]
            assert isinstance(await welcomed(port), P.Welcome)
            writer.close()

    asyncio.run(scenario())


def test_idle_connections_are_dropped_and_never_crowd_out_a_client(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(inbox_module, "HELLO_TIMEOUT_S", 2.0)
    monkeypatch.setattr(inbox_module, "MAX_PENDING_CONNECTIONS", 100)

    async def scenario() -> None:
        async with serving(tiny_config, tmp_path) as (c, port):
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
            await asyncio.sleep(0.3)
            assert c.inbox.pending == 100
            extra, _, _ = await attack(port, b"", close=False)  # the 101st waits for nothing: closed at once
            assert "more than 100" in (await settle(tmp_path, extra))[0]["reason"]
            await asyncio.sleep(2.5)  # every idle one has passed its deadline
            assert c.inbox.pending == 0
            assert isinstance(await welcomed(port), P.Welcome)
            dropped = [e for e in events(tmp_path) if e["event"] == "connection_dropped"]
            assert len(dropped) == 101
            for _, writer in idle:
                writer.close()

    asyncio.run(scenario())

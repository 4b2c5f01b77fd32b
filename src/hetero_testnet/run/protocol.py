"""The control protocol between coordinator and clients: typed messages as length-prefixed JSON.

Wire format: a 4-byte big-endian length, then that many bytes of UTF-8 JSON
`{"v": PROTOCOL_VERSION, "type": <message type>, ...fields}`. Messages larger than
`MAX_MESSAGE_BYTES` are refused before they are read, a different `v` or an unknown type or
field is a `ProtocolError`. Tensors never travel here (they go through torch.distributed
collectives) and nothing is ever unpickled.

Flow of one step (the coordinator decides, clients compute):

    coordinator -> client   Round(step, lr, data range)        client trains, all-reduces
    client -> coordinator   Reduced(step, metrics)             every member, or a deadline
    coordinator -> client   Commit(step) | Discard(step)        a vote: all apply or none
    client -> coordinator   Applied(step, checksum)            replicas compared

Membership changes go through `Generation` (a new process group under a fresh store prefix,
with an optional state broadcast for joiners) answered by `GroupReady`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hetero_testnet.errors import PeerLostError, ProtocolError
from hetero_testnet.run.fieldcheck import check_fields, reject_constant

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_HELLO_BYTES = 64 * 1024
"""The first message of a connection (before the token is checked) may be at most this long."""
_HEADER = struct.Struct(">I")


@dataclass(kw_only=True)
class Message:
    type: ClassVar[str] = ""


# ----------------------------------------------------------------- client -> coordinator

@dataclass(kw_only=True)
class Hello(Message):
    """First message of a connection. `token` proves the client belongs to this run."""

    type: ClassVar[str] = "hello"
    token: str
    client_id: int | None
    tier: int
    helper_fraction: float = 0.0
    helper_rotation_interval: int = 16
    pid: int = 0
    host: str = ""
    device: str = "cpu"
    threads: int = 1
    profile: dict[str, Any] = field(default_factory=dict)
    """The device the client emulates (`config/devices.DeviceProfile.to_dict`; {} = this machine's own)."""


@dataclass(kw_only=True)
class Ready(Message):
    """The client is set up (model built, data open) and can form a group; sent once per connection."""

    type: ClassVar[str] = "ready"
    setup_s: dict[str, float] = field(default_factory=dict)
    """Seconds per start-up phase (`run/startup.PHASES`), for the `client_ready` event."""
    rss_mb: float = 0.0
    """Its resident memory once set up, MiB."""


@dataclass(kw_only=True)
class GroupReady(Message):
    type: ClassVar[str] = "group_ready"
    generation: int
    step: int
    checksum: str


@dataclass(kw_only=True)
class Reduced(Message):
    """A client finished its share of a step and the all-reduce; nothing is applied yet."""

    type: ClassVar[str] = "reduced"
    step: int
    generation: int
    loss: float | None
    tokens: int
    trained_batches: int
    ffn_width: int
    helper_neurons: int
    compute_time_s: float
    exchange_time_s: float
    grad_norm: float | None
    """None when the averaged gradient is not finite (JSON has no NaN)."""
    nan_inf: bool
    rss_mb: float
    collective_time_s: float = 0.0
    """Seconds inside the round's collectives after `Go` (what the exchange timeout is derived from)."""
    bytes_sent: int = 0
    """Bytes this client put on the wire for the round's exchange (`exchange/strategies.py`)."""
    bytes_received: int = 0
    inner_steps: int = 1
    """Steps the round covered (its `Round.inner_steps`): per-step figures divide by it."""
    throttle_s: float = 0.0
    """Seconds the round was held back to emulate a slower device (`run/throttle.py`); not in compute_time_s."""


@dataclass(kw_only=True)
class ComputeDone(Message):
    """Ready: the client finished its round's compute and waits for `Go` before any collective."""

    type: ClassVar[str] = "compute_done"
    step: int
    generation: int
    compute_time_s: float
    """From the round's start to now: the measured compute plus `throttle_s`."""
    throttle_s: float = 0.0
    """The part of it that emulated a slower device (`run/throttle.py`)."""


@dataclass(kw_only=True)
class Applied(Message):
    type: ClassVar[str] = "applied"
    step: int
    checksum: str
    apply_time_s: float


@dataclass(kw_only=True)
class RoundFailed(Message):
    """The client could not finish a step (a failed collective, an error); it waits for orders."""

    type: ClassVar[str] = "round_failed"
    step: int
    generation: int
    reason: str


@dataclass(kw_only=True)
class EvalResult(Message):
    type: ClassVar[str] = "eval_result"
    step: int
    results: list[dict[str, Any]]


@dataclass(kw_only=True)
class Saved(Message):
    type: ClassVar[str] = "saved"
    step: int
    path: str
    checksum: str


@dataclass(kw_only=True)
class Heartbeat(Message):
    """Sent every second by a client thread, also while training or blocked in a collective, so
    the coordinator can tell a hung (stopped) client from one waiting on its peers."""

    type: ClassVar[str] = "heartbeat"


# ----------------------------------------------------------------- coordinator -> client

@dataclass(kw_only=True)
class Welcome(Message):
    type: ClassVar[str] = "welcome"
    run_id: str
    client_id: int
    config: dict[str, Any]
    store_host: str
    store_port: int
    backend: str
    sync: str
    initial_checkpoint: str | None = None
    fault: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Reject(Message):
    type: ClassVar[str] = "reject"
    reason: str


@dataclass(kw_only=True)
class Generation(Message):
    """Form a new process group. `state_source_rank` broadcasts its state when someone is behind."""

    type: ClassVar[str] = "generation"
    generation: int
    rank: int
    world_size: int
    members: list[int]
    step: int
    state_source_rank: int | None
    timeout_s: float
    restore: str | None = None
    """Every member first loads this checkpoint (nobody holds the current state any more);
    "initial" rebuilds the run's starting state."""


@dataclass(kw_only=True)
class Round(Message):
    type: ClassVar[str] = "round"
    step: int
    epoch: int
    generation: int
    sample_start: int
    sample_count: int
    inner_steps: int = 1
    """Optimizer steps in this round (steps step .. step + inner_steps - 1); > 1 only under diloco,
    where the range is cut into that many pieces."""
    extra_ranges: list[list[int]] = field(default_factory=list)
    """[start, count] ranges of lost members to train as well (a diloco round repeated for survivors)."""


@dataclass(kw_only=True)
class Go(Message):
    """Every member is done computing: run the round's collectives, each within `exchange_timeout_s`."""

    type: ClassVar[str] = "go"
    step: int
    generation: int
    exchange_timeout_s: float


@dataclass(kw_only=True)
class Commit(Message):
    type: ClassVar[str] = "commit"
    step: int
    lr: float


@dataclass(kw_only=True)
class Discard(Message):
    type: ClassVar[str] = "discard"
    step: int
    reason: str


@dataclass(kw_only=True)
class Evaluate(Message):
    """Validate the current model at these tiers (tier 0 is the full model)."""

    type: ClassVar[str] = "evaluate"
    step: int
    tiers: list[int]


@dataclass(kw_only=True)
class SaveCheckpoint(Message):
    type: ClassVar[str] = "save_checkpoint"
    step: int
    path: str
    meta: dict[str, Any]
    background: bool = False
    """Snapshot now, write in a background thread (the automatic recovery checkpoints)."""


@dataclass(kw_only=True)
class Dropped(Message):
    """The coordinator removed this client (e.g. it missed a deadline); it may rejoin."""

    type: ClassVar[str] = "dropped"
    reason: str


@dataclass(kw_only=True)
class Ping(Message):
    """Sent to every client every few seconds, so a silent coordinator is noticed in bounded time."""

    type: ClassVar[str] = "ping"
    state: str = ""


@dataclass(kw_only=True)
class Shutdown(Message):
    type: ClassVar[str] = "shutdown"
    reason: str
    status: str


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Hello, Heartbeat, Ready, GroupReady, ComputeDone, Reduced, Applied, RoundFailed, EvalResult, Saved, Welcome, Reject,
                Generation, Round, Go, Commit, Discard, Evaluate, SaveCheckpoint, Dropped, Ping, Shutdown)
}


# ----------------------------------------------------------------- encoding

def encode(message: Message) -> bytes:
    body = {"v": PROTOCOL_VERSION, "type": message.type, **dataclasses.asdict(message)}
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{message.type} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _HEADER.pack(len(data)) + data


def decode_body(data: bytes) -> Message:
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"malformed message: {e}") from e
    if not isinstance(body, dict):
        raise ProtocolError("malformed message: not a JSON object")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this is {PROTOCOL_VERSION})")
    cls = MESSAGE_TYPES.get(body.pop("type", None))
    if cls is None:
        raise ProtocolError("unknown message type")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise ProtocolError(f"unknown field(s) {sorted(unknown)} in {cls.type} message")
    try:
        return cls(**check_fields(cls, body))
    except TypeError as e:
        raise ProtocolError(f"bad {cls.type} message: {e}") from e


def frame_length(header: bytes, limit: int = MAX_MESSAGE_BYTES) -> int:
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"message of {length} bytes exceeds the {limit}-byte limit")
    if length == 0:
        raise ProtocolError("empty message (a zero length prefix)")
    return length


HEADER_BYTES = _HEADER.size


async def read_message(reader: "asyncio.StreamReader", limit: int = MAX_MESSAGE_BYTES) -> Message:
    """One framed message (at most `limit` bytes) from an asyncio stream (the coordinator side); EOF
    raises IncompleteReadError, anything malformed ProtocolError."""
    header = await reader.readexactly(HEADER_BYTES)
    return decode_body(await reader.readexactly(frame_length(header, limit)))


def sanitize_float(x: float | None) -> float | None:
    """JSON has no NaN/Inf: they travel as None (and are counted by the sender)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return float(x)

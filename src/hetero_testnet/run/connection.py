"""The client's side of the control connection: blocking, framed (`protocol`'s wire format), with a
deadline on every receive and a lock on sends (the heartbeat thread sends too).

Failure contract: every method raises `PeerLostError` when the coordinator cannot be reached, closes
the connection, or sends nothing within the receive's deadline; a malformed frame is `protocol`'s
`ProtocolError`.
"""

from __future__ import annotations

import select
import socket
import threading

from hetero_testnet.errors import PeerLostError
from hetero_testnet.run.protocol import HEADER_BYTES, Message, decode_body, encode, frame_length


class Connection:
    """A blocking, framed connection (the client side). Every receive has a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()  # the heartbeat thread sends too

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float) -> "Connection":
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise PeerLostError(f"cannot reach coordinator at {host}:{port}: {e}") from e
        return cls(sock)

    def send(self, message: Message) -> None:
        data = encode(message)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as e:
            raise PeerLostError(f"connection to coordinator lost while sending: {e}") from e

    def _recv_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self.sock.recv(n - len(chunks))
            if not chunk:
                raise PeerLostError("coordinator closed the connection")
            chunks += chunk
        return bytes(chunks)

    def poll(self, timeout_s: float) -> bool:
        """True when a message (or the connection's end) is waiting to be read (`recv` then returns at once)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        except (OSError, ValueError):
            return True  # a closed socket: let recv report it
        return bool(readable)

    def recv(self, timeout_s: float | None) -> Message:
        """Next message; `PeerLostError` on EOF, reset, or no message within `timeout_s`."""
        self.sock.settimeout(timeout_s)
        try:
            length = frame_length(self._recv_exact(HEADER_BYTES))
            return decode_body(self._recv_exact(length))
        except socket.timeout as e:
            raise PeerLostError(f"no message from the coordinator within {timeout_s:.0f} s") from e
        except OSError as e:
            raise PeerLostError(f"connection to coordinator lost: {e}") from e

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

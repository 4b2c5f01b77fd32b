"""Listening TCP sockets, bound before anything that needs their port starts.

The launcher binds the coordinator's control socket (so the port is known and checked before any
process starts, and the coordinator inherits it); the coordinator binds its rendezvous store's
socket the same way and hands the descriptor to the store.

Failure contract: `bind_listening` raises `OSError` when the address cannot be bound; callers turn
it into the one-line error their user can act on.
"""

from __future__ import annotations

import socket

BACKLOG = 128
"""Connections that may wait to be accepted (every client of a large testnet connects at once)."""


def bind_listening(host: str, port: int, *, inheritable: bool = False) -> socket.socket:
    """A TCP socket listening on `host:port` (port 0: any free one), IPv6 when `host` is one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(inheritable)
    return sock

"""The project's one error hierarchy.

Domain code raises these with a message that says what to change; `cli.main()` is the
only place that catches them, prints `error: <message>` on one line and maps the class
to an exit code (2 for bad input, 1 for a failed run).
"""

from __future__ import annotations


class HeteroTestnetError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `hint` is an optional fix."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(HeteroTestnetError):
    """Bad user input: a flag, a config file or field, a tier, a path."""

    exit_code = 2


class DataError(ConfigError):
    """A data directory or shard that cannot be used as given."""


class ProtocolError(HeteroTestnetError):
    """A control message that is malformed, too large, of another version, or unauthenticated."""


class PeerLostError(HeteroTestnetError):
    """A peer (client or coordinator) vanished or stopped answering within its deadline."""


class RunFailedError(HeteroTestnetError):
    """The run ended without finishing (replicas diverged, too few clients, a crash)."""


class RunAborted(RunFailedError):
    """The coordinator cannot go on with the run; `status` is `failed`, or `interrupted` for a signal."""

    def __init__(self, message: str, status: str = "failed") -> None:
        super().__init__(message)
        self.status = status

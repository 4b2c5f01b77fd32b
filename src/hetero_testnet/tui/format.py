"""Small text formats shared by the dashboard and the headless progress lines."""

from __future__ import annotations


def fmt_duration(seconds: float | None) -> str:
    """`H:MM:SS` for a non-negative number of seconds (rounded); `-` for None (not known yet)."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"

"""Streaming a run's events to a metric sink while it runs, and replaying a finished run.

`EventFollower` is a thread in the launching process (never in the coordinator or a client, so a slow
or failing W&B never holds up training): every `poll_s` it reads what `events.jsonl` gained and writes
the scalars. Errors are latched in `error`, not raised: a metrics failure never stops a run; the
caller reports it after the run. `stop()` drains the file once more, closes the sink and waits at most
`join_timeout_s` for the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from hetero_testnet.events import EventTail, read_events
from hetero_testnet.metrics.mapping import MetricState, all_scalars, scalars
from hetero_testnet.metrics.sinks import MetricSink

POLL_S = 0.5
JOIN_TIMEOUT_S = 60.0
"""How long `stop()` waits for the sink to finish (W&B uploads its last batch then)."""


class EventFollower(threading.Thread):
    def __init__(self, events_path: Path, make_sink: Callable[[], MetricSink], *, poll_s: float = POLL_S) -> None:
        super().__init__(name="metrics", daemon=True)
        self.tail = EventTail(events_path, from_end=True)  # this run's events only (a resume appends)
        self.make_sink = make_sink
        self.poll_s = poll_s
        self.state = MetricState()
        self.error: BaseException | None = None
        self.written = 0
        self._halt = threading.Event()

    def run(self) -> None:
        sink = None
        try:
            sink = self.make_sink()
            while not self._halt.wait(self.poll_s):
                self._drain(sink)
            self._drain(sink)
        except BaseException as e:  # noqa: BLE001 - latched; the caller reports it after the run
            self.error = e
        finally:
            if sink is not None:
                try:
                    sink.close()
                except Exception as e:  # noqa: BLE001
                    self.error = self.error or e

    def _drain(self, sink: MetricSink) -> None:
        batch = [s for e in self.tail.poll() for s in scalars(e, self.state)]
        if batch:
            sink.write(batch)
            self.written += len(batch)

    def stop(self, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
        self._halt.set()
        self.join(join_timeout_s)



def replay(events_path: Path, make_sink: Callable[[dict], MetricSink]) -> tuple[int, MetricSink]:
    """Write every scalar of a finished run's events to the sink `make_sink(run_config)` builds (the
    config is what the `launch` and `run_started` events say), and close it; returns (count, sink)."""
    values, state = all_scalars(read_events(events_path))
    sink = make_sink(state.config)
    try:
        sink.write(values)
    finally:
        sink.close()
    return len(values), sink

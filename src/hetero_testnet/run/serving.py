"""The coordinator process around the state machine: listen, signals, heartbeats, and the end.

`serve` opens the listening socket (or takes the launcher's), starts the TCPStore every
generation's process group meets at (bound to the same address as the control socket: loopback
by default), installs the signal handlers (SIGINT/SIGTERM stop the run as
interrupted, SIGUSR1 pauses or resumes it at the next step boundary), writes the ready file the
launcher waits for, pings every member every PING_INTERVAL_S, and runs `Coordinator.run`. However
the run ends it writes `summary.json`, emits `run_finished`, tells every member to shut down and
returns the exit code: 0 finished, 130 interrupted, 1 otherwise (a coordinator bug included).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import torch.distributed as dist

from hetero_testnet.config import RunConfig
from hetero_testnet.errors import ConfigError, HeteroTestnetError, RunAborted
from hetero_testnet.events import Event, RunState
from hetero_testnet.run import protocol as P
from hetero_testnet.run.coordinator import Coordinator
from hetero_testnet.run.plan import CoordinatorOptions
from hetero_testnet.run.schedule import val_loss_key
from hetero_testnet.run.sockets import bind_listening
from hetero_testnet.run.summary import build_summary
from hetero_testnet.rundir import read_json_or_none, write_json_atomic

log = logging.getLogger("hetero_testnet")

PING_INTERVAL_S = 2.0
"""How often every member is told the run's state (it treats a silent coordinator as lost)."""
GOODBYE_DRAIN_S = 2.0
"""How long each member's connection may take to flush its `Shutdown`."""
EXIT_CODES = {"finished": 0, "interrupted": 130}
"""Exit code by final status; every other status exits 1."""


def run_coordinator(config: RunConfig, options: CoordinatorOptions) -> int:
    """Run one coordinator to the end; returns the exit code (0 finished, 1 failed, 130 interrupted)."""
    options.run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(serve(Coordinator(config, options)))


async def serve(c: Coordinator) -> int:
    server = await _listen(c)
    pinger = asyncio.create_task(_ping_loop(c))
    status, reason = "failed", "unknown"
    try:
        status, reason = await c.run()
    except RunAborted as e:
        status, reason = e.status, str(e)
    except asyncio.CancelledError:
        status, reason = "interrupted", c.inbox.stop_reason or "cancelled"
    except HeteroTestnetError as e:
        status, reason = "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a coordinator bug must still end the run cleanly
        log.exception("internal error")
        status, reason = "failed", f"internal coordinator error: {type(e).__name__}: {e}"
    finally:
        pinger.cancel()
        await _finish(c, status, reason)
        server.close()
    return EXIT_CODES.get(status, 1)


async def _listen(c: Coordinator) -> asyncio.Server:
    """Accept connections, start the store, install signal handlers, then write the ready file."""
    opts = c.opts
    try:
        if opts.listen_fd is not None:
            server = await asyncio.start_server(c.inbox.handle_connection, sock=socket.socket(fileno=opts.listen_fd))
        else:
            server = await asyncio.start_server(c.inbox.handle_connection, opts.host, opts.port, reuse_address=True)
    except OSError as e:
        raise ConfigError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}",
                          hint="pick another --server-port, or 0 for any free port") from e
    port = server.sockets[0].getsockname()[1]
    everywhere = opts.host in ("0.0.0.0", "::", "")
    c.store_host = opts.advertise_host or (socket.gethostname() if everywhere else opts.host)
    # The store listens where the control socket does (loopback by default), never on every interface
    # unless asked: it has no authentication, and its port is told only to clients that proved the token.
    c.store = dist.TCPStore(opts.host or "0.0.0.0", 0, is_master=True, wait_for_workers=False, use_libuv=True,
                            master_listen_fd=_bound_socket(opts.host or "0.0.0.0"))
    c.store_port = c.store.port
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _request_stop, c, sig)
    loop.add_signal_handler(signal.SIGUSR1, _toggle_pause, c)
    write_json_atomic(c.files.ready, {"host": opts.host, "port": port, "store_port": c.store_port,
                                      "pid": os.getpid()})
    log.info("listening on %s:%d (store port %d)", opts.host, port, c.store_port)
    return server


def _bound_socket(host: str) -> int:
    """A listening TCP socket on `host`, any free port; its descriptor is handed over to the store."""
    try:
        return bind_listening(host, 0).detach()
    except OSError as e:
        raise ConfigError(f"cannot open the rendezvous store on {host}: {e.strerror or e}") from e


async def _finish(c: Coordinator, status: str, reason: str) -> None:
    """The summary, `run_finished`, and a `Shutdown` to every member (flushed, bounded)."""
    c.set_state(RunState.FINISHED)
    curve = c.capacity.val_curve(c.records.eval_results, lambda r: val_loss_key(r, c.opts.sync))
    summary = build_summary(c.totals, c.members.values(), cfg=c.cfg, run_dir=c.files, sync=c.opts.sync,
                            status=status, reason=reason, capacity=c.capacity, val_curve=curve)
    write_json_atomic(c.files.summary, summary)
    asked = status == "interrupted" and c.files.stop_request.is_file()  # a stop someone asked for
    c.events.emit(Event.RUN_FINISHED, step=c.totals.step, status=status, reason=reason,
                  steps_completed=c.totals.step, total_steps=c.timing.total_steps,
                  replicas_identical=summary["replicas_identical"], final_val_loss=c.totals.val_losses,
                  stop_requested=True if asked else None,
                  level=logging.INFO if status == "finished" else logging.WARNING if asked else logging.ERROR)
    for m in c.membership.alive():
        m.send(P.Shutdown(reason=reason, status=status))
    await asyncio.sleep(0)
    for m in c.membership.alive():
        try:
            await asyncio.wait_for(m.writer.drain(), GOODBYE_DRAIN_S)
            m.writer.close()
        except Exception:  # noqa: BLE001
            pass


def _request_stop(c: Coordinator, sig: int) -> None:
    """A stop signal: the reason is the launcher's, when it wrote one (`RunDir.stop_request`)."""
    asked = read_json_or_none(c.files.stop_request)
    reason = asked.get("reason") if isinstance(asked, dict) else None
    if isinstance(reason, str) and reason:
        c.inbox.request_stop(reason if reason.startswith("stopped") else f"stopped: {reason}")
    else:
        c.inbox.request_stop(f"stopped by signal {signal.Signals(sig).name}")


def _toggle_pause(c: Coordinator) -> None:
    c.paused = not c.paused
    c.events.emit(Event.PAUSE if c.paused else Event.RESUME, step=c.totals.step)
    c.inbox.wake()


async def _ping_loop(c: Coordinator) -> None:
    while True:
        await asyncio.sleep(PING_INTERVAL_S)
        for m in c.membership.alive():
            m.send(P.Ping(state=c.state))

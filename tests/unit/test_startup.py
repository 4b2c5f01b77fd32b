"""Start-up at scale (issue 12, part 7): the coordinator's waits for members, the launcher's check that
some client can still join, the phases a client reports, and a model build without torch's compiler."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hetero_testnet.errors import RunAborted
from hetero_testnet.run import protocol as P
from hetero_testnet.run.inbox import Inbox
from hetero_testnet.run.records import StepRecords
from hetero_testnet.run.startup import PHASES, StartupClock, checked_phases, process_age_s


class _Members:
    """The two views of `Membership` that `wait_for_members` reads."""

    def __init__(self) -> None:
        self.members: list[SimpleNamespace] = []

    def alive(self) -> list[SimpleNamespace]:
        return list(self.members)

    def ready(self) -> list[SimpleNamespace]:
        return [m for m in self.members if m.ready]


def _inbox(arrivals: list[float]) -> tuple[Inbox, _Members]:
    """An inbox whose members connect (ready at once) at `arrivals` seconds from now."""
    members = _Members()
    inbox = Inbox(membership=members, records=None, events=None, admit=None, on_lost=None)
    t0 = time.monotonic()
    due = sorted(t0 + a for a in arrivals)

    async def next_message(deadline: float):
        wake = min([deadline, *due[:1]])
        await asyncio.sleep(max(0.0, wake - time.monotonic()))
        if due and time.monotonic() >= due[0]:
            due.pop(0)
            member = SimpleNamespace(ready=True, joined_at=time.monotonic(), client_id=len(members.members) + 1)
            members.members.append(member)
            return member, object()
        return None

    inbox.next_message = next_message
    return inbox, members


def _wait(inbox: Inbox, **kwargs) -> float:
    t0 = time.monotonic()
    asyncio.run(inbox.wait_for_members(**{"extra_time_s": 0.0, "setup_s": 0.0, **kwargs}))
    return time.monotonic() - t0


def test_the_first_wait_of_a_launched_run_counts_from_the_first_connection():
    # 32 clients importing torch on 2 cores connect about a minute after the coordinator is ready:
    # a launched run (expected clients) must not fail before the first of them arrives
    inbox, members = _inbox([0.6, 0.7])
    took = _wait(inbox, need=2, expected=2, first=True, timeout_s=0.2)
    assert took >= 0.6 and len(members.ready()) == 2


def test_a_launched_run_waits_for_every_expected_client_not_only_the_extra_time():
    # the launcher starts the first clients, then the rest once the coordinator is ready: under load the
    # later ones connect seconds after the first, and a run that began with one client re-formed twice
    inbox, members = _inbox([0.0, 0.4, 0.45])
    took = _wait(inbox, need=1, expected=3, first=True, timeout_s=0.6, extra_time_s=0.1)
    assert took >= 0.4 and len(members.ready()) == 3
    # a client that never comes: after timeout_s without an arrival the run starts with those that came
    inbox, members = _inbox([0.0, 0.1])
    took = _wait(inbox, need=1, expected=3, first=True, timeout_s=0.3, extra_time_s=0.05)
    assert 0.35 <= took < 1.5 and len(members.ready()) == 2


def test_members_arriving_keep_a_wait_alive_and_silence_ends_it():
    inbox, members = _inbox([0.15, 0.3, 0.45])  # each within the timeout of the one before
    _wait(inbox, need=3, expected=0, first=False, timeout_s=0.2)
    assert len(members.ready()) == 3

    inbox, members = _inbox([0.1])  # one arrives, then nobody: the wait fails 0.2 s after the last progress
    t0 = time.monotonic()
    with pytest.raises(RunAborted, match="only 1 of the 2 clients"):
        _wait(inbox, need=2, expected=0, first=False, timeout_s=0.2)
    assert 0.25 <= time.monotonic() - t0 < 1.0


def test_a_standalone_coordinator_still_gives_up_when_nobody_comes():
    inbox, _ = _inbox([])
    with pytest.raises(RunAborted, match="only 0 of the 1"):
        _wait(inbox, need=1, expected=0, first=True, timeout_s=0.2)


def test_ready_carries_the_start_up_phases_and_the_coordinator_keeps_only_known_sane_ones():
    body = P.encode(P.Ready(setup_s={"process": 2.5, "model": 0.1}, rss_mb=300.0))
    message = P.decode_body(body[4:])
    assert message == P.Ready(setup_s={"process": 2.5, "model": 0.1}, rss_mb=300.0)
    assert P.decode_body(P.encode(P.Ready())[4:]) == P.Ready()  # both fields are optional
    with pytest.raises(Exception, match="setup_s"):
        P.decode_body(json.dumps({"v": P.PROTOCOL_VERSION, "type": "ready", "setup_s": {"model": "x"}}).encode())
    assert checked_phases({"process": 1.0, "bogus": 1.0, "model": -1.0, "data": 1e12}) == {"process": 1.0}

    emitted = []
    events = SimpleNamespace(emit=lambda kind, **fields: emitted.append((kind, fields)))
    records = StepRecords(events, totals=None, sync="allreduce")
    member = SimpleNamespace(client_id=4)
    assert records.record(member, P.Ready(setup_s={"process": 1.5, "evil": 9.0}, rss_mb=-5.0))
    ((kind, fields),) = emitted
    assert kind == "client_ready" and fields["client_id"] == 4
    assert fields["setup_s"] == {"process": 1.5} and fields["rss_mb"] is None


def test_the_startup_clock_sums_phases_in_order():
    clock = StartupClock()
    time.sleep(0.02)
    clock.mark("connect")
    clock.mark("data")
    phases = clock.phases()
    assert set(phases) <= set(PHASES) and phases["connect"] >= 0.02 and phases["data"] < 0.02
    age = process_age_s()
    assert age is None or 0.0 < age < 3600.0


def test_building_a_model_imports_no_compiler_and_draws_nothing_from_the_global_rng():
    # On the meta device torch's reference ops imported sympy and torch._dynamo: 1.5-4 s of CPU
    # per client (a 26 s median when 32 clients started on 2 cores).
    code = ("import sys, torch\n"
            "from hetero_testnet.config import load_run_config\n"
            "from hetero_testnet.model.checkpoint import Checkpoint\n"
            "from hetero_testnet.model.nanogpt import build_model\n"
            "cfg = load_run_config('configs/tiny')\n"
            "state = torch.random.get_rng_state()\n"
            "m = build_model(cfg.model, 3)\n"
            "again = Checkpoint(cfg.model, m.state_dict(), None, {}).build_model()\n"
            "assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))\n"
            "assert torch.equal(state, torch.random.get_rng_state())\n"
            "print(sorted(k for k in ('sympy', 'torch._dynamo') if k in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

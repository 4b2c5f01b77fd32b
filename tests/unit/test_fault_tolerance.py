"""Issue 11's pure parts: message field types, the exchange timeout, recovery points, packet loss, hooks."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from hetero_testnet.errors import ConfigError, ProtocolError
from hetero_testnet.events import EventWriter
from hetero_testnet.exchange.faults import MSS_BYTES, NetworkFaults, lost_packets
from hetero_testnet.exchange.formation import AbandonedFormations
from hetero_testnet.run import protocol as P
from hetero_testnet.run.plan import check_recovery_and_network
from hetero_testnet.run.readygo import EXCHANGE_TIMEOUT_FACTOR, EXCHANGE_TIMEOUT_FLOOR_S, ExchangeTimeouts
from hetero_testnet.run.recovery import Recovery, RecoveryPoint
from hetero_testnet.run.summary import RunTotals
from hetero_testnet.run.testhooks import DeathHooks, parse_die_at
from hetero_testnet.rundir import RunDir


def _body(**fields) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


# ---------------------------------------------------------------- field types

@pytest.mark.parametrize("fields", [
    {"type": "hello", "token": "t", "client_id": None, "tier": "0"},              # str for int
    {"type": "hello", "token": "t", "client_id": None, "tier": True},             # bool is not an int
    {"type": "hello", "token": 7, "client_id": None, "tier": 0},                  # int for str
    {"type": "hello", "token": "t", "client_id": [1], "tier": 0},                 # list for int | None
    {"type": "hello", "token": "t", "client_id": None, "tier": 0, "helper_fraction": "x"},
    {"type": "go", "step": 1, "generation": 1, "exchange_timeout_s": None},        # None for float
    {"type": "eval_result", "step": 1, "results": {"tier": 0}},                   # dict for list
    {"type": "eval_result", "step": 1, "results": [1, 2]},                        # list items of the wrong type
    {"type": "generation", "generation": 1, "rank": 0, "world_size": 2, "members": ["a"], "step": 0,
     "state_source_rank": None, "timeout_s": 1.0},
])
def test_a_field_of_the_wrong_type_is_a_protocol_error(fields):
    with pytest.raises(ProtocolError, match="must be"):
        P.decode_body(_body(**fields))


@pytest.mark.parametrize("text", [b'{"v": 1, "type": "go", "step": 1, "generation": 1, "exchange_timeout_s": NaN}',
                                  b'{"v": 1, "type": "go", "step": 1, "generation": 1, "exchange_timeout_s": Infinity}',
                                  b'[' * 100000, b'\xff\xfe', b''])
def test_non_json_numbers_deep_nesting_and_garbage_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        P.decode_body(text)


def test_missing_fields_are_protocol_errors_and_ints_widen_to_floats():
    with pytest.raises(ProtocolError, match="bad go message"):
        P.decode_body(_body(type="go", step=1))
    go = P.decode_body(_body(type="go", step=1, generation=2, exchange_timeout_s=3))
    assert go == P.Go(step=1, generation=2, exchange_timeout_s=3.0) and isinstance(go.exchange_timeout_s, float)


def test_frame_lengths_zero_and_huge_are_refused_and_hellos_are_small():
    import struct

    with pytest.raises(ProtocolError, match="empty"):
        P.frame_length(struct.pack(">I", 0))
    with pytest.raises(ProtocolError):
        P.frame_length(struct.pack(">I", 2**32 - 1))
    with pytest.raises(ProtocolError):
        P.frame_length(struct.pack(">I", P.MAX_HELLO_BYTES + 1), P.MAX_HELLO_BYTES)


def test_every_message_type_round_trips_through_the_type_check():
    msgs = [P.ComputeDone(step=1, generation=2, compute_time_s=0.5), P.Go(step=1, generation=2, exchange_timeout_s=4.5),
            P.Generation(generation=1, rank=0, world_size=2, members=[1, 2], step=3, state_source_rank=None,
                         timeout_s=6.0, restore="initial"),
            P.SaveCheckpoint(step=5, path="/x", meta={"step": 5}, background=True)]
    for m in msgs:
        data = P.encode(m)
        assert P.decode_body(data[P.HEADER_BYTES:]) == m


# ---------------------------------------------------------------- the exchange timeout

def _reduced(collective: float, exchange: float) -> P.Reduced:
    return P.Reduced(step=0, generation=0, loss=1.0, tokens=1, trained_batches=1, ffn_width=1, helper_neurons=0,
                     compute_time_s=0.1, exchange_time_s=exchange, grad_norm=1.0, nan_inf=False, rss_mb=1.0,
                     collective_time_s=collective)


def test_exchange_timeout_is_the_round_deadline_until_measured_then_floor_plus_factor_times_the_slowest():
    t = ExchangeTimeouts(initial_s=60.0)
    assert t.timeout_s == 60.0
    t.observe({1: _reduced(0.05, 0.1), 2: _reduced(0.2, 0.3)})
    assert t.timeout_s == pytest.approx(EXCHANGE_TIMEOUT_FLOOR_S + EXCHANGE_TIMEOUT_FACTOR * 0.2)
    assert t.reply_deadline_s > t.timeout_s + EXCHANGE_TIMEOUT_FACTOR * 0.3
    for _ in range(30):  # the window forgets old slow rounds
        t.observe({1: _reduced(0.01, 0.02)})
    assert t.timeout_s == pytest.approx(EXCHANGE_TIMEOUT_FLOOR_S + EXCHANGE_TIMEOUT_FACTOR * 0.01)


# ---------------------------------------------------------------- recovery points

def test_recovery_rewinds_to_the_newest_confirmed_point_and_forgets_the_abandoned_lineage(tmp_path: Path):
    files = RunDir(tmp_path)
    r = Recovery(files, 5, RecoveryPoint(0, "initial", 0, 0, 0))
    totals = RunTotals(step=17, data_index=102, tokens_seen=3264)
    events = EventWriter(tmp_path / "events.jsonl", run_id="t", role="coordinator")
    assert r.due(5) and not r.due(6) and not Recovery(files, 0, r.start).due(5)
    for step in (5, 10, 15):
        path = r.auto_path(step)
        path.mkdir(parents=True)
        r.register(RecoveryPoint(step, str(path), step * 6, step * 192, 0), totals.saved_steps)
        if step < 15:
            totals.saved_steps.add(step)  # 15 is still being written
    assert not r.auto_path(5).exists()  # pruned once 10 was confirmed
    point = r.rewind(totals, events)
    assert point.step == 10 and (totals.step, totals.data_index, totals.tokens_seen) == (10, 60, 1920)
    assert totals.counters["replayed_steps"] == 7 and totals.counters["restores"] == 1
    assert 15 not in r.points
    restored = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert restored[-1]["event"] == "restored" and restored[-1]["from_step"] == 17


def test_recovery_before_any_checkpoint_goes_back_to_the_start(tmp_path: Path):
    r = Recovery(RunDir(tmp_path), 5, RecoveryPoint(0, "initial", 0, 0, 0))
    totals = RunTotals(step=3, data_index=18)
    point = r.rewind(totals, EventWriter(None, run_id="t", role="coordinator"))
    assert point.path == "initial" and totals.step == 0 and totals.counters["replayed_steps"] == 3


# ---------------------------------------------------------------- packet loss, network options

def test_packet_loss_costs_one_round_trip_per_lost_packet():
    rng = random.Random(0)
    assert lost_packets(100, 0.0, rng) == 0 and lost_packets(100, 0.999999, rng) == 100
    n = 1_000_000
    assert abs(lost_packets(n, 0.01, rng) - n * 0.01) < 6 * (n * 0.01) ** 0.5
    lossy = NetworkFaults(latency_ms=5.0, packet_loss=0.01)
    delays = [lossy.delay_s(MSS_BYTES * 10_000, rng) for _ in range(20)]
    expected = 0.005 + 10_000 * 0.01 * 0.010  # latency + lost packets x RTT (2 x 5 ms)
    assert abs(sum(delays) / len(delays) - expected) < 0.1 * expected
    assert NetworkFaults(packet_loss=0.5).delay_s(0, rng) == 0.0  # nothing sent, nothing lost
    with pytest.raises(ConfigError):
        NetworkFaults(packet_loss=1.0)
    with pytest.raises(ProtocolError):
        NetworkFaults.from_wire({"packet_loss": "a lot"})


@pytest.mark.parametrize("kwargs, needle", [
    ({"auto_checkpoint_every": -1, "bind": "127.0.0.1", "advertise_host": None}, "--auto-checkpoint-every"),
    ({"auto_checkpoint_every": 5, "bind": "0.0.0.0", "advertise_host": "0.0.0.0"}, "--advertise-host"),
    ({"auto_checkpoint_every": 5, "bind": "127.0.0.1", "advertise_host": "10.0.0.2"}, "differs from --bind"),
    ({"auto_checkpoint_every": 5, "bind": "0.0.0.0", "advertise_host": None, "gloo_ifname": "eth0,"}, "--gloo-ifname"),
])
def test_network_option_rules(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        check_recovery_and_network(**kwargs)
    check_recovery_and_network(auto_checkpoint_every=0, bind="0.0.0.0", advertise_host="10.0.0.2", gloo_ifname="wg0")


# ---------------------------------------------------------------- test hooks, the stuck watchdog's clock

def test_death_hooks_parse_and_stay_quiet_for_other_clients_and_points():
    assert parse_die_at("forming:0.2, broadcast") == {"forming": 0.2, "broadcast": 1.0}
    for bad in ("nowhere:1", "forming:2", "forming:x"):
        with pytest.raises(ValueError):
            parse_die_at(bad)
    hooks = DeathHooks.from_env({"HETERO_TESTNET_DIE_AT": "forming:1", "HETERO_TESTNET_DIE_CLIENTS": "2"})
    hooks.client_id = 1
    hooks.at("forming")  # client 1 is not listed: nothing is scheduled (the test process lives on)
    hooks.client_id = 2
    hooks.at("exchange")  # not a planned point
    assert DeathHooks.from_env({}).plan == {}


def test_abandoned_formations_report_how_far_the_worst_is_past_its_deadline():
    class Stuck:
        def __init__(self, started: float) -> None:
            self.started, self.done, self.abandoned, self.group = started, threading.Event(), False, None
            self.timeout_s = 6.0

        def abandon(self) -> None:
            self.abandoned = True

    abandoned = AbandonedFormations()
    now = time.monotonic()
    assert abandoned.overdue_s(now) == float("-inf")
    old, young = Stuck(now - 100), Stuck(now - 1)
    abandoned.add(old)
    abandoned.add(young)
    assert old.abandoned and len(abandoned) == 2 and abandoned.overdue_s(now) == pytest.approx(100 - 60 - 30)
    old.done.set()
    assert abandoned.overdue_s(now) == pytest.approx(1 - 90) and len(abandoned) == 1

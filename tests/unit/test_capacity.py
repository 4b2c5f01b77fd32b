"""Devices of unequal capacity without a run: profiles, the link shaper, the compute throttle, batch
shares, `--tiers auto`, and the per-round timing ledger."""

from __future__ import annotations

import random

import pytest

from hetero_testnet.config import load_run_config
from hetero_testnet.config.devices import PRESETS, DeviceProfile, DevicesConfig, parse_devices
from hetero_testnet.config.load import parse_run_config
from hetero_testnet.errors import ConfigError
from hetero_testnet.exchange.faults import NetworkFaults
from hetero_testnet.model.flops import tier_cost
from hetero_testnet.run import protocol as P
from hetero_testnet.run.assignment import assign_samples
from hetero_testnet.run.capacity import CapacityLedger
from hetero_testnet.run.membership import profile_from_hello
from hetero_testnet.run.profiles import ProfileFlags, auto_tiers, client_profiles, profile_args
from hetero_testnet.run.rounds import RoundPlanner
from hetero_testnet.run.shares import SharePlanner, check_shares, split_batch
from hetero_testnet.run.throttle import ComputeThrottle

from conftest import ROOT, TINY_CONFIG_DIR

SMALL = ROOT / "configs" / "small"


# ----------------------------------------------------------------- profiles

def test_profiles_are_validated_and_presets_only_slow_down():
    assert all(0 < p.speed <= 1 for p in PRESETS.values()) and not PRESETS["local"].emulated
    assert PRESETS["laptop"].emulated and "speed 0.5" in PRESETS["laptop"].describe()
    for bad in ({"speed": 0}, {"speed": 1.5}, {"speed": -1}, {"latency_ms": float("nan")}, {"packet_loss": 1.0},
                {"uplink_bytes_per_s": True}, {"speed": "fast"}):
        with pytest.raises(ConfigError):
            DeviceProfile(name="x", **bad)


def test_the_devices_section_names_profiles_and_round_trips():
    devices = parse_devices({"profiles": {"edge": {"speed": 0.3, "uplink_bytes_per_s": 2e6}},
                             "clients": ["datacenter-gpu", "edge"]})
    assert devices.profile("edge").speed == 0.3 and devices.profile("laptop") is PRESETS["laptop"]
    with pytest.raises(ConfigError, match="unknown device profile 'tablet'.*known: .*laptop"):
        devices.profile("tablet")
    with pytest.raises(ConfigError, match="devices.clients: unknown device profile"):
        parse_devices({"clients": ["nope"]})
    with pytest.raises(ConfigError, match="unknown config field devices.profiles.edge.cores"):
        parse_devices({"profiles": {"edge": {"cores": 2}}})
    with pytest.raises(ConfigError, match="built-in"):
        parse_devices({"profiles": {"laptop": {"speed": 0.9}}})
    cfg = load_run_config(TINY_CONFIG_DIR).replace(devices=devices)
    again = parse_run_config(cfg.to_dict(), base_dir=TINY_CONFIG_DIR)
    assert again.devices == devices
    assert "devices" not in load_run_config(TINY_CONFIG_DIR).to_dict()  # plain configs stay as they were


def test_client_profiles_cycle_and_flags_override_fields():
    devices = DevicesConfig(clients=("datacenter-gpu", "laptop"))
    names = [p.name for p in client_profiles(devices, 3)]
    assert names == ["datacenter-gpu", "laptop", "datacenter-gpu"]
    got = client_profiles(devices, 3, ProfileFlags(speeds=[1, 0.25], bandwidth=[5e7]))
    assert [p.speed for p in got] == [1.0, 0.25, 1.0]
    assert [p.name for p in got] == ["datacenter-gpu*", "laptop*", "datacenter-gpu*"]
    assert all(p.uplink_bytes_per_s == p.downlink_bytes_per_s == 5e7 for p in got)
    plain = client_profiles(DevicesConfig(), 2, ProfileFlags(speeds=[0.5], uplink=[1e6], latency_ms=[20]))
    assert plain[0] == DeviceProfile(name="custom", speed=0.5, uplink_bytes_per_s=1e6, latency_ms=20)
    with pytest.raises(ConfigError, match="client 1: .*speed"):
        client_profiles(DevicesConfig(), 1, ProfileFlags(speeds=[2.0]))
    assert profile_args(DeviceProfile()) == []
    assert profile_args(plain[0])[:4] == ["--profile-name", "custom", "--speed", "0.5"]


def test_a_hello_profile_is_checked_like_a_config():
    assert profile_from_hello({}) is None
    assert profile_from_hello({"name": "laptop", "speed": 0.5}).speed == 0.5
    for bad in ({"speed": 3}, {"name": 5, "speed": 0.5}, {"speed": 0.5, "gpus": 8}):
        with pytest.raises(ConfigError):
            profile_from_hello(bad)


# ----------------------------------------------------------------- the link shaper

def test_the_link_charges_the_slower_direction_and_links_combine_in_series():
    link = NetworkFaults.from_profile(DeviceProfile(name="l", uplink_bytes_per_s=1e6, downlink_bytes_per_s=4e6,
                                                    latency_ms=10))
    rng = random.Random(0)
    assert link.delay_s(2_000_000, rng) == pytest.approx(0.010 + 2.0)            # uplink decides
    assert link.delay_s(1_000_000, rng, received_bytes=8_000_000) == pytest.approx(0.010 + 2.0)  # downlink does
    run_faults = NetworkFaults(latency_ms=5, bandwidth_bytes_per_s=5e5, packet_loss=0.1)
    both = run_faults.combined(link)
    assert both.latency_ms == 15 and both.uplink == 5e5 and both.downlink == 5e5
    assert both.packet_loss == pytest.approx(0.1)
    assert NetworkFaults().combined(NetworkFaults()) == NetworkFaults()
    unlimited_down = NetworkFaults.from_profile(DeviceProfile(name="u", uplink_bytes_per_s=1e6))
    assert unlimited_down.transfer_s(0, 10**12) == 0.0 and unlimited_down.transfer_s(10**6, 0) == 1.0


# ----------------------------------------------------------------- the compute throttle

def test_the_throttle_holds_in_proportion_to_the_measured_compute():
    slept = []
    half = ComputeThrottle(DeviceProfile(name="h", speed=0.5), sleep=slept.append)
    quarter = ComputeThrottle(DeviceProfile(name="q", speed=0.25), sleep=slept.append)
    assert half.hold_s(1.2) == pytest.approx(1.2) and quarter.hold_s(1.0) == pytest.approx(3.0)
    assert ComputeThrottle(DeviceProfile()).hold_s(5.0) == 0.0 and half.hold_s(0.0) == 0.0
    half.hold(0.3)
    assert slept == [pytest.approx(0.3)]
    real = ComputeThrottle(DeviceProfile(name="r", speed=0.5))
    assert real.hold(0.05) >= 0.05  # a real sleep, measured


# ----------------------------------------------------------------- shares

def test_split_batch_is_proportional_floored_exact_and_deterministic():
    assert split_batch(18, {1: 1.0, 2: 1.0, 3: 1.0}) == {1: 6, 2: 6, 3: 6}
    got = split_batch(18, {1: 2.0, 2: 1.0, 3: 1.0})
    assert got == {1: 9, 2: 5, 3: 4}  # 9, 4.5, 4.5: the tie of remainders goes to the lower client id
    assert got == split_batch(18, {3: 1.0, 2: 1.0, 1: 2.0}) and sum(got.values()) == 18
    assert split_batch(10, {1: 1000.0, 2: 1.0, 3: 1.0}) == {1: 8, 2: 1, 3: 1}  # the floor of one sequence
    assert split_batch(2, {1: 1.0, 2: 5.0, 3: 1.0}) == {1: 0, 2: 2, 3: 0}      # too few to floor everyone
    for total in range(1, 40):
        counts = split_batch(total, {1: 0.3, 2: 1.7, 5: 0.9})
        assert sum(counts.values()) == total
    with pytest.raises(ValueError):
        split_batch(4, {1: 0.0})


def test_ranges_follow_the_counts_and_still_tile_the_batch():
    ranges = assign_samples([1, 2, 3], 12, 100, seed=7, step=3, counts={1: 6, 2: 3, 3: 3})
    assert {c: r.count for c, r in ranges.items()} == {1: 6, 2: 3, 3: 3}
    spans = sorted((r.start, r.start + r.count) for r in ranges.values())
    assert spans[0][0] == 100 and spans[-1][1] == 112 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # counts equal to the equal split give exactly the reference's ranges (the same shuffled order)
    assert assign_samples([1, 2, 3], 12, 100, seed=7, step=3, counts={1: 4, 2: 4, 3: 4}) == \
        assign_samples([1, 2, 3], 12, 100, seed=7, step=3)
    with pytest.raises(ValueError):
        assign_samples([1, 2], 12, 0, seed=1, step=0, counts={1: 6, 2: 5})


def test_the_share_planner_follows_measured_throughput_and_replans_on_schedule():
    planner = SharePlanner("proportional", replan_every=5)
    weights, replanned = planner.weights([1, 2, 3], step=0)
    assert replanned and weights == {1: 1.0, 2: 1.0, 3: 1.0}  # nothing measured yet: equal
    for _ in range(6):
        planner.observe(1, 6, 1.0)   # 6 seq/s
        planner.observe(2, 6, 2.0)   # 3 seq/s: a device at half speed
        planner.observe(3, 6, 2.0)
    assert planner.weights([1, 2, 3], step=3) == (weights, False)  # not due yet
    weights, replanned = planner.weights([1, 2, 3], step=5)
    assert replanned and weights == pytest.approx({1: 6.0, 2: 3.0, 3: 3.0})
    assert split_batch(18, weights) == {1: 9, 2: 5, 3: 4}
    weights, replanned = planner.weights([1, 2, 3, 4], step=6)  # a joiner: re-plan at once, median rate
    assert replanned and weights[4] == pytest.approx(3.0)
    assert SharePlanner("equal").weights([1, 2], 0) == (None, False)
    with pytest.raises(ConfigError, match="--shares"):
        check_shares("fair")
    with pytest.raises(ConfigError, match="--replan-every"):
        check_shares("proportional", 0)


def test_the_round_planner_cuts_the_batch_by_weight():
    plan = RoundPlanner(seed=1).plan([1, 2, 3], step=0, total_steps=10, batch=18, data_index=0,
                                     weights={1: 2.0, 2: 1.0, 3: 1.0})
    assert sorted(w.main.count for w in plan.work.values()) == [4, 5, 9] and plan.work[1].main.count == 9
    diloco = RoundPlanner(seed=1, inner_steps=4).plan([1, 2], step=0, total_steps=10, batch=6, data_index=0,
                                                      weights={1: 3.0, 2: 1.0})
    assert {c: w.main.count for c, w in diloco.work.items()} == {1: 18, 2: 6}


# ----------------------------------------------------------------- --tiers auto

def test_auto_tiers_balance_estimated_compute():
    model = load_run_config(SMALL).model
    flops = [tier_cost(model, t).train_flops_per_token for t in range(4)]
    choices = auto_tiers(model, [DeviceProfile(), DeviceProfile(name="w", speed=0.8), DeviceProfile(name="p", speed=0.5)])
    assert [c.tier for c in choices] == [0, 1, 3]
    assert flops[1] / 0.8 <= 1.10 * flops[0] < flops[0] / 0.8                  # tier 1 fits speed 0.8, tier 0 not
    assert "straggler" in choices[2].reason and "widest" in choices[0].reason
    same = auto_tiers(model, [DeviceProfile(name="a", speed=0.5), DeviceProfile(name="b", speed=0.5)])
    assert [c.tier for c in same] == [0, 0]  # equal devices: full width for all


# ----------------------------------------------------------------- the ledger

class _Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict]] = []

    def emit(self, event, **fields) -> None:
        self.emitted.append((str(event), fields))


class _Member:
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id


def _reduced(step: int, tokens: int, exchange: float, throttle: float = 0.0) -> P.Reduced:
    return P.Reduced(step=step, generation=0, loss=1.0, tokens=tokens, trained_batches=1, ffn_width=8,
                     helper_neurons=0, compute_time_s=0.0, exchange_time_s=exchange, grad_norm=1.0, nan_inf=False,
                     rss_mb=1.0, throttle_s=throttle)


def test_the_ledger_measures_waits_idle_shares_utilisation_and_flops():
    model = load_run_config(SMALL).model
    events = _Events()
    ledger = CapacityLedger(events, model, SharePlanner("proportional"), started=0.0)
    plan = RoundPlanner(seed=1).plan([1, 2], 0, 10, 4, 0, {1: 1.0, 2: 1.0})
    ledger.start_round(plan, replanned=True)
    assert events.emitted[-1][0] == "shares" and events.emitted[-1][1]["counts"] == {"1": 2, "2": 2}
    ledger.ready(_Member(1), P.ComputeDone(step=0, generation=0, compute_time_s=1.0), 1.1)
    ledger.ready(_Member(2), P.ComputeDone(step=0, generation=0, compute_time_s=2.0, throttle_s=1.0), 2.1)
    ledger.go(2.2)
    assert ledger.wait_s(1) == pytest.approx(1.1) and ledger.wait_s(2) == pytest.approx(0.1)
    flops = ledger.committed({1: _reduced(0, 512, 0.3), 2: _reduced(0, 512, 0.3, 1.0)}, {1: 0, 2: 2}, 2.5,
                             steps_done=1, tokens_trained=1024)
    assert flops == 512 * (tier_cost(model, 0).train_flops_per_token + tier_cost(model, 2).train_flops_per_token)
    one, two = ledger.member_summary(1), ledger.member_summary(2)
    assert one["compute_s"] == 1.0 and one["emulated_s"] == 0.0 and one["wait_s"] == pytest.approx(1.1)
    assert two["compute_s"] == 1.0 and two["emulated_s"] == 1.0 and one["exchange_s"] == 0.3
    assert one["idle_share"] == pytest.approx(1 - 1.0 / 2.5) and two["idle_share"] == pytest.approx(1 - 2.0 / 2.5)
    assert ledger.utilisation == pytest.approx(3.0 / 5.0)
    assert ledger.shares.rates == {1: pytest.approx(2.0), 2: pytest.approx(1.0)}  # sequences per second, held incl.
    curve = ledger.val_curve({0: [{"tier": 0, "val_loss": 9.0}], 1: [{"tier": 0, "val_loss": 8.0}]},
                             lambda r: f"tier{r['tier']}")
    assert curve[0] == {"step": 0, "wall_s": None, "tokens": 0, "flops": 0, "val_loss": {"tier0": 9.0}}
    assert curve[1]["tokens"] == 1024 and curve[1]["flops"] == flops and curve[1]["val_loss"] == {"tier0": 8.0}


def test_the_link_delay_is_exchange_time_after_the_ready_go_gate():
    """A slow link must never count as compute (the shares follow compute): the strategy passes the
    round's gate first, then holds for the link, then runs the collective."""
    import time

    import torch

    from hetero_testnet.exchange.strategies import AllReduceSync
    from thread_group import FakeExchange, ThreadGroup

    log: list[tuple[str, float]] = []

    class Recording(FakeExchange):
        def pass_gate(self) -> None:
            log.append(("gate", time.perf_counter()))

        def all_reduce_sum(self, tensor: torch.Tensor) -> None:
            log.append(("collective", time.perf_counter()))

    sync = AllReduceSync(Recording(ThreadGroup(1), 0), NetworkFaults(latency_ms=50))
    assert sync.exchange_buffer(torch.zeros(4)) == pytest.approx(0.05)
    assert [k for k, _ in log] == ["gate", "collective"] and log[1][1] - log[0][1] >= 0.05

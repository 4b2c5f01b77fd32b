"""Devices of unequal capacity in real testnets (issue 12's acceptance): the emulated speed and link
are really enforced and measured, and a proportional split of the batch trains the same model."""

from __future__ import annotations

import statistics

import pytest

from testnet_helpers import checksums_by_step, events, run_start, summary
from test_testnet import _final_params

pytestmark = pytest.mark.slow

LINK = 2e7
"""Client 3's link, bytes/s each way: tiny's exchange (~3.3 MB a step) takes >= ~0.16 s at this cap."""
COMMON = ("--num-clients", "3", "--tiers", "0,0,0", "--client-speeds", "1,0.5,0.5",
          "--client-bandwidth", f"0,0,{LINK:g}", "--seed", "5", "--total-steps", "8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("capacity")
    equal = run_start(logs, "equal", *COMMON)
    proportional = run_start(logs, "proportional", *COMMON, "--shares", "proportional", "--replan-every", "2")
    assert equal.returncode == 0, equal.stderr
    assert proportional.returncode == 0, proportional.stderr
    return logs / "equal", logs / "proportional"


def test_a_half_speed_client_takes_twice_its_natural_compute(runs):
    equal, _ = runs
    done = [e for e in events(equal) if e["event"] == "compute_done" and e["client_id"] in (2, 3)]
    assert len(done) == 16
    # the compute a half-speed client reports (its measured compute, then the hold, one clock) is 2x its
    # natural compute within 10%, and the coordinator, on its own clock (Round sent -> ComputeDone
    # received), really waited at least that long every round
    ratios = [e["compute_time_s"] / (e["compute_time_s"] - e["emulated_s"]) for e in done]
    assert 1.8 <= statistics.median(ratios) <= 2.2, ratios
    assert all(e["emulated_s"] > 0 and e["ready_after_s"] >= e["compute_time_s"] for e in done), done
    fast = [e for e in events(equal) if e["event"] == "compute_done" and e["client_id"] == 1]
    assert all(e["emulated_s"] == 0 for e in fast)


def test_a_capped_link_takes_at_least_bytes_over_bandwidth(runs):
    for run in runs:
        steps = [e for e in events(run) if e["event"] == "client_step" and e["client_id"] == 3]
        assert len(steps) == 8
        for e in steps:
            assert e["bytes_sent"] > 0 and e["exchange_time_s"] >= e["bytes_sent"] / LINK, e


def test_proportional_shares_train_the_same_model_as_equal_shares(runs):
    equal, proportional = runs
    a, b = _final_params(equal), _final_params(proportional)
    for name in a:
        diff = (a[name] - b[name]).norm()
        assert diff <= 1e-5 * a[name].norm() + 1e-7, (name, float(diff))
    for run in runs:
        sums = checksums_by_step(run)
        assert sorted(sums) == list(range(8)) and all(len(v) == 1 for v in sums.values())
    splits = [e for e in events(proportional) if e["event"] == "shares"]
    assert splits and splits[0]["counts"] == {"1": 2, "2": 2, "3": 2}  # nothing measured yet: equal
    later = splits[-1]["counts"]
    assert sum(later.values()) == 6 and later["1"] > later["2"] and later["1"] > later["3"], splits
    committed = [e for e in events(proportional) if e["event"] == "step_committed"]
    assert {c: n for c, [[_, n]] in committed[-1]["samples"].items()} == later


def test_the_summary_reports_profiles_timings_and_flops(runs):
    equal, proportional = runs
    s = summary(equal)
    assert s["shares"] == "equal" and summary(proportional)["shares"] == "proportional"
    assert 0 < s["utilisation"] <= 1 and s["flops_trained"] > 0
    slow = s["clients"]["2"]
    assert slow["profile"]["speed"] == 0.5 and slow["emulation"]["speed"].startswith("duty cycle")
    assert slow["emulated_s"] > 0 and 0 <= slow["idle_share"] < 1 and slow["bytes_sent"] > 0
    assert s["clients"]["1"]["wait_s"] > s["clients"]["2"]["wait_s"]  # the fast client waits for the slow ones
    assert s["clients"]["3"]["profile"]["uplink_bytes_per_s"] == LINK and s["clients"]["1"]["emulation"] is None
    curve = s["val_curve"]
    assert curve and curve[-1]["step"] == 8 and curve[-1]["flops"] == s["flops_trained"]
    assert curve[-1]["tokens"] == s["tokens_trained"] and curve[-1]["wall_s"] > 0
    steps = [e for e in events(equal) if e["event"] == "client_step"]
    assert all(e["wait_s"] is not None and e["wait_s"] >= 0 for e in steps)

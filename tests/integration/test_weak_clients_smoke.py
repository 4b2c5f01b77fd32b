"""configs/experiments/weak-clients-smoke.yaml and slow-link-smoke.yaml, the CI versions of
weak-clients.yaml and its second table slow-link.yaml: both matrices through the runner against a fake
`testnet start` (seconds; slow-link takes HET and DROP from weak-clients), the pre-registered analysis
recomputed from results.json alone, and (slow) one real run of an arm with its own global batch and one
real DeMo run on emulated laptops.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from hetero_testnet.experiments.derived import build_derived_config
from hetero_testnet.experiments.export import write_report
from hetero_testnet.experiments.report import build_report
from hetero_testnet.experiments.runner import ExperimentRunner
from hetero_testnet.experiments.spec import load_experiment
from hetero_testnet.experiments.stats import holm, paired, tost_paired

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiments" / "weak-clients-smoke.yaml"
FULL = ROOT / "configs" / "experiments" / "weak-clients.yaml"
SLOW_SMOKE = ROOT / "configs" / "experiments" / "slow-link-smoke.yaml"
SLOW_FULL = ROOT / "configs" / "experiments" / "slow-link.yaml"
OFFSETS = {"HET": 0.0, "CM": 0.004, "SMALL": 0.30, "DROP": 0.12, "ORACLE": -0.10, "DEMO": 0.005, "DILOCO": 0.03}

FAKE = textwrap.dedent('''
    import json, os, sys, time
    args = sys.argv[2:]
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--") and args[i] != "--headless"}
    run_dir = os.path.join(opt["--logs-dir"], opt["--name"]); os.makedirs(run_dir, exist_ok=True)
    label, seed = opt["--name"].rsplit("-seed", 1)
    seed = int(seed); tiers = [int(t) for t in opt["--tiers"].split(",")]
    offset = json.loads(os.environ["FAKE_OFFSETS"])[label]
    with open(os.path.join(run_dir, "events.jsonl"), "w") as f:
        def ev(event, step=None, cid=None, **kw):
            f.write(json.dumps({"ts": time.time(), "run_id": "fake", "role": "coordinator", "client_id": cid,
                                "step": step, "event": event, **kw}) + "\\n")
        ev("launch", tiers=tiers, helper_fractions=[0.0] * len(tiers), sync="allreduce", total_steps=2)
        for s in range(2):
            for c, t in enumerate(tiers, 1):
                ev("client_step", s, c, tier=t, loss=10.0 - s, grad_norm=1.0, nan_inf=False, tokens=32)
            ev("step_committed", s, tokens=32 * len(tiers), step_wall_s=0.1, loss_by_tier={})
        for t in sorted({0, 2, *tiers}):
            # tiers a mix never trained are bad; seed noise differs per arm so paired tests have spread
            untrained = 1.0 if t < min(tiers) else 0.0
            noise = 0.0003 * ((seed * sum(map(ord, label))) % 5)
            ev("eval", 2, 1, tier=t, val_loss=9.0 + offset + 0.05 * t + untrained + noise, num_samples=8)
    clients = {str(c): {"tier": t, "connected_at_end": True, "exit_code": 0, "kills": 0} for c, t in enumerate(tiers, 1)}
    json.dump({"status": "finished", "reason": "finished", "steps_completed": 2, "total_steps": 2, "sync": "allreduce",
               "wall_time_s": 1.0, "val_num_samples": 8, "clients": clients}, open(os.path.join(run_dir, "summary.json"), "w"))
''')


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("weak")
    script = tmp / "fake_start.py"
    script.write_text(FAKE)
    import os
    os.environ["FAKE_OFFSETS"] = json.dumps(OFFSETS)
    runner = ExperimentRunner(load_experiment(SMOKE), tmp / "logs", command_prefix=[sys.executable, str(script)],
                              poll_s=0.05)
    outcomes = runner.run()
    assert [o.status for o in outcomes] == ["finished"] * 10
    exp = runner.experiment_dir
    write_report(build_report(exp), exp / "report")
    return exp, json.loads((exp / "report" / "results.json").read_text())


def test_smoke_matches_the_full_experiment_file() -> None:
    smoke, full = load_experiment(SMOKE), load_experiment(FULL)
    assert [(c.label, c.tiers) for c in smoke.configurations] == [(c.label, c.tiers) for c in full.configurations]
    assert smoke.analysis == full.analysis.__class__(**{**full.analysis.to_dict(), "verdicts": smoke.analysis.verdicts,
                                                       "comparisons": full.analysis.comparisons,
                                                       "checks": full.analysis.checks,
                                                       "secondary": full.analysis.secondary})
    assert len(full.seeds) >= 5 and full.order == "seed" and full.analysis.delta == 0.02
    batches = {c.label: c.global_batch for c in full.configurations}
    assert batches == {"HET": 18, "CM": 13, "SMALL": 18, "DROP": 6, "ORACLE": 18}


def test_runs_seed_major_each_arm_from_its_own_config(smoke_report) -> None:
    exp, _ = smoke_report
    started = [json.loads(x) for x in (exp / "runs.jsonl").read_text().splitlines()]
    started = [r for r in started if r["event"] == "run_started"]
    assert [r["run"] for r in started][:5] == ["HET-seed1", "CM-seed1", "SMALL-seed1", "DROP-seed1", "ORACLE-seed1"]
    cm = next(r for r in started if r["run"] == "CM-seed1")["command"]
    config = Path(cm[cm.index("--config-path") + 1])
    assert config.name == "experiment-config-CM.yaml" and "global_batch_size_start: 5" in config.read_text()
    identity = json.loads((exp / "CM-seed1" / "experiment-run.json").read_text())
    assert identity["global_batch"] == 5


def test_analysis_in_results_json_recomputes_and_agrees_with_results_md(smoke_report) -> None:
    exp, results = smoke_report
    analysis = results["analysis"]
    by = _assert_recomputes(results)
    assert by["HET-SMALL"]["outcomes"][0] == "better" and by["HET-DROP"]["outcomes"][0] == "better"
    assert by["HET-CM"]["non_inferior"] and analysis["checks"][0]["passed"]
    assert analysis["verdict"] == "helps"
    _assert_md_agrees(exp, results)


def _assert_recomputes(results: dict) -> dict[str, dict]:
    """Recompute the primary comparisons from results.json alone (the widest trained tier of each run,
    paired by seed, Holm over the family, TOST at delta); returns them by name."""
    analysis = results["analysis"]
    declared = analysis["declared"]
    widest: dict[str, dict[int, float]] = {}
    for run in results["runs"]:
        widest.setdefault(run["label"], {})[run["seed"]] = run["val_loss_by_tier"][str(min(run["tiers"]))]
    comps = analysis["comparisons"]
    tests = [paired(widest[c["a"]], widest[c["b"]]) for c in comps]
    for c, t, p_adj in zip(comps, tests, holm([t.p for t in tests])):
        assert c["p"] == pytest.approx(t.p) and c["p_holm"] == pytest.approx(p_adj)
        assert c["significant"] == (p_adj < declared["alpha"])
        eq = tost_paired(widest[c["a"]], widest[c["b"]], declared["delta"])
        assert c["equivalent"] == eq.equivalent(declared["alpha"])
    return {c["comparison"]: c for c in comps}


def _assert_md_agrees(exp: Path, results: dict) -> None:
    """results.md states the analysis of results.json: the same decisions under the same field names."""
    analysis = results["analysis"]
    comps = analysis["comparisons"]
    md = (exp / "report" / "results.md").read_text()
    assert "## Pre-registered analysis" in md and f"**Verdict: {analysis['verdict']}**" in md
    for c in comps:   # the same decision under the same field names
        row = next(line for line in md.splitlines() if line.startswith(f"| `{c['comparison']}` |"))
        assert ("**true**" if c["significant"] else "false") in row.split("|")[14]
    header = next(line for line in md.splitlines() if line.startswith("| `comparison` |"))
    assert [h.strip(" `") for h in header.strip("|").split("|")] == list(analysis["comparisons"][0])[:-1]
    assert results["references"]["unigram"] is not None and "## Reference lines" in md
    assert (exp / "report" / "primary_diff.png").stat().st_size > 0
    assert all(c["significant"] in (True, False, None) for c in results["comparisons"])


def test_an_incomplete_matrix_has_no_verdict_yet(smoke_report, tmp_path: Path) -> None:
    import shutil

    exp, _ = smoke_report
    partial = tmp_path / "partial"
    shutil.copytree(exp, partial)
    (partial / "ORACLE-seed2" / "summary.json").unlink()   # one planned run not finished
    result = build_report(partial).analysis
    assert result.verdict == "pending" and result.verdict_reason.startswith("1 planned run(s) not finished yet")
    assert "would read: " in result.verdict_reason

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_real_arm_with_its_own_global_batch(tmp_path: Path) -> None:
    runner = ExperimentRunner(load_experiment(SMOKE), tmp_path / "logs", only=("CM-seed1",))
    (outcome,) = runner.run()
    assert outcome.status == "finished", outcome.reason
    events = [json.loads(x) for x in (outcome.run_dir / "events.jsonl").read_text().splitlines()]
    committed = [e for e in events if e["event"] == "step_committed"]
    assert len(committed) == 2 and all(e["tokens"] == 5 * 32 for e in committed)


# --------------------------------------------------------------------------- the second table: slow-link

def test_slow_link_smoke_matches_its_full_file_and_reuses_weak_clients_runs_exactly() -> None:
    smoke, full = load_experiment(SLOW_SMOKE), load_experiment(SLOW_FULL)
    shape = lambda spec: [(c.label, c.tiers, c.sync, c.devices, c.reuse is not None) for c in spec.configurations]
    assert shape(smoke) == shape(full)
    for field in ("comparisons", "secondary", "checks", "verdicts", "metric", "delta", "alpha"):
        assert getattr(smoke.analysis, field) == getattr(full.analysis, field)
    assert len(full.seeds) >= 5 and full.order == "seed"
    # the reused arms must be the very runs of weak-clients: the same derived config, hence fingerprint
    for slow, weak in ((full, load_experiment(FULL)), (smoke, load_experiment(SMOKE))):
        slow_fp = ExperimentRunner(slow, Path("unused")).fingerprints(build_derived_config(slow))
        weak_fp = ExperimentRunner(weak, Path("unused")).fingerprints(build_derived_config(weak))
        for c in slow.configurations:
            if c.reuse is not None:
                assert c.reuse == weak.name and slow_fp[c.label] == weak_fp[c.label], c.label
                assert weak.configuration(c.label).tiers == c.tiers


def test_slow_link_matrix_takes_het_and_drop_and_its_analysis_recomputes(smoke_report) -> None:
    weak_exp, _ = smoke_report
    script = weak_exp.parent.parent / "fake_start.py"
    runner = ExperimentRunner(load_experiment(SLOW_SMOKE), weak_exp.parent,
                              command_prefix=[sys.executable, str(script)], poll_s=0.05)
    outcomes = runner.run()
    assert {o.run.name: o.status for o in outcomes} == {
        **{f"{arm}-seed{s}": "reused" for arm in ("HET", "DROP") for s in (1, 2)},
        **{f"{arm}-seed{s}": "finished" for arm in ("DEMO", "DILOCO") for s in (1, 2)}}
    exp = runner.experiment_dir
    started = [json.loads(x) for x in (exp / "runs.jsonl").read_text().splitlines()]
    demo = next(r for r in started if r["event"] == "run_started" and r["run"] == "DEMO-seed1")["command"]
    assert demo[demo.index("--sync") + 1] == "demo"
    config = Path(demo[demo.index("--config-path") + 1]).read_text()
    assert "- laptop" in config and "chunk: 16" in config
    write_report(build_report(exp), exp / "report")
    results = json.loads((exp / "report" / "results.json").read_text())
    by = _assert_recomputes(results)
    assert by["DEMO-DROP"]["outcomes"][0] == "better" and by["DEMO-HET"]["non_inferior"]
    assert results["analysis"]["checks"][0]["passed"]
    _assert_md_agrees(exp, results)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_real_demo_run_on_emulated_laptops(tmp_path: Path) -> None:
    runner = ExperimentRunner(load_experiment(SLOW_SMOKE), tmp_path / "logs", only=("DEMO-seed1",))
    (outcome,) = runner.run()
    assert outcome.status == "finished", outcome.reason
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["sync"] == "demo"
    clients = summary["clients"]
    assert clients["1"]["profile"]["name"] == "local" and clients["2"]["profile"]["name"] == "laptop"
    laptop = clients["2"]
    # the link was charged: a laptop's exchange took at least what its bytes take on a 2.5 MB/s uplink
    assert laptop["exchange_s"] >= laptop["bytes_sent"] / laptop["profile"]["uplink_bytes_per_s"]
    assert laptop["emulated_s"] > 0 and "duty cycle" in laptop["emulation"]["speed"]

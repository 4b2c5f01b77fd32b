"""The report on synthetic runs: events.jsonl/summary.json written in the schema of docs/events.md."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from hetero_testnet.experiments.derived import build_derived_config, config_fingerprint
from hetero_testnet.experiments.spec import load_experiment
from hetero_testnet.experiments.runner import write_manifest
from hetero_testnet.experiments.report import build_report
from hetero_testnet.experiments.run_result import load_run
from hetero_testnet.experiments.export import csv_columns, write_report
from hetero_testnet.experiments.stats import paired, significance_word, welch

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- synthetic runs

def synth_run(run_dir: Path, *, tiers: list[int], seed: int, steps: int = 10, eval_every: int = 5,
              sync: str = "allreduce", base: float = 10.0, tier_penalty: float = 0.3, noise: float = 0.02,
              status: str = "finished", write_summary: bool = True, nan_at: tuple[int, int] | None = None,
              grad_spike_at: int | None = None, lost_client: int | None = None, val_offset: float = 0.0,
              tokens_per_step: int = 1200, step_wall_s: float = 0.5) -> dict:
    """Write a run's events.jsonl and summary.json. Train loss of client c at step s is
    base - 0.1*s + tier_penalty*tier + noise; val loss of tier t after k steps is
    base - 0.1*k + tier_penalty*t + val_offset + seed noise (per replica under sync none)."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_shift = rng.uniform(-noise, noise)
    events = []
    ts = [1000.0]

    def emit(event, *, client_id=None, step=None, role="coordinator", **kw):
        ts[0] += 0.01
        events.append({"ts": ts[0], "run_id": "synth", "role": role, "client_id": client_id, "step": step,
                       "event": event, **kw})

    n = len(tiers)
    emit("launch", role="launcher", name=run_dir.name, num_clients=n, tiers=tiers, helper_fractions=[0.0] * n,
         sync=sync, total_steps=steps, command_line="testnet start ...")
    emit("run_started", step=0, total_steps=steps, sync=sync, expected_clients=n, min_clients=n,
         resumed_from=None, config_source="synth")
    for cid, t in enumerate(tiers, 1):
        emit("client_joined", client_id=cid, step=0, tier=t, ffn_width=64 >> t, helper_fraction=0.0, pid=1,
             host="h", incarnation=0, threads=1, device="cpu")
    trained = {cid: 0 for cid in range(1, n + 1)}
    last_loss = {}
    for s in range(steps):
        by_tier = {}
        for cid, t in enumerate(tiers, 1):
            if lost_client == cid and s >= steps // 2:
                continue
            loss = base - 0.1 * s + tier_penalty * t + rng.uniform(-noise, noise)
            grad = 50.0 if grad_spike_at == s else 1.5
            is_nan = nan_at == (cid, s)
            emit("client_step", client_id=cid, step=s, epoch=0, generation=0, tier=t, ffn_width=64 >> t,
                 helper_neurons=0, loss=None if is_nan else loss, tokens=tokens_per_step // n, trained_batches=1,
                 step_time_s=0.4, compute_time_s=0.3, exchange_time_s=0.1, grad_norm=grad, lr=1e-3,
                 nan_inf=is_nan, rss_mb=100.0, tokens_per_sec=1000.0, checksum="x", apply_time_s=0.01)
            trained[cid] += 1
            last_loss[cid] = loss
            by_tier.setdefault(str(t), []).append(loss)
        emit("step_committed", step=s, epoch=0, generation=0, lr=1e-3,
             loss_by_tier={k: sum(v) / len(v) for k, v in by_tier.items()}, tokens=tokens_per_step,
             step_wall_s=step_wall_s, tokens_per_sec=tokens_per_step / step_wall_s, members=list(range(1, n + 1)),
             total_steps=steps)
        if lost_client is not None and s == steps // 2 - 1:
            emit("client_lost", client_id=lost_client, step=s, reason="connection closed")
        done = s + 1
        if (eval_every and done % eval_every == 0) or done == steps:
            if sync == "allreduce":
                for t in sorted({0, *tiers}):
                    emit("eval", client_id=1, step=done, tier=t, ffn_width=64 >> t,
                         val_loss=base - 0.1 * done + tier_penalty * t + val_offset + seed_shift,
                         num_samples=8, eval_time_s=0.1)
            else:
                for cid, ct in enumerate(tiers, 1):
                    for t in sorted({0, ct}):
                        emit("eval", client_id=cid, step=done, tier=t, ffn_width=64 >> t,
                             val_loss=base - 0.1 * done + tier_penalty * t + val_offset + 0.01 * cid + seed_shift,
                             num_samples=8, eval_time_s=0.1)
    emit("run_finished", step=steps, status=status, reason="synthetic", steps_completed=steps, total_steps=steps,
         replicas_identical=True, final_val_loss={})
    with open(run_dir / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    summary = {
        "status": status, "reason": "synthetic", "steps_completed": steps, "total_steps": steps, "sync": sync,
        "wall_time_s": 12.5, "train_time_s": 5.0, "tokens_trained": tokens_per_step * steps, "tokens_per_sec": 96.0,
        "mean_final_train_loss": None, "final_val_loss": {}, "val_num_samples": 8, "replicas_identical": True,
        "generations": 1, "discarded_steps": 0, "clients_lost": 0, "clients_dropped": 0, "rejoins": 0,
        "rejected_connections": 0, "nan_inf_steps": 0, "time_lost_s": 0.0, "checkpoint": None,
        "clients": {str(cid): {"tier": t, "ffn_width": 64 >> t, "helper_fraction": 0.0, "steps_trained": trained[cid],
                               "final_train_loss": last_loss.get(cid), "nan_inf_count": 0, "joins": 1,
                               "connected_at_end": cid != lost_client, "exit_code": 0 if cid != lost_client else -9,
                               "kills": 0, "restarts": 0}
                    for cid, t in enumerate(tiers, 1)},
        "faults": {},
    }
    if write_summary:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


SMOKE_LIKE = """
name: synth
base_config: {base}
steps: 10
eval_every: 5
seeds: [1, 2, 3]
report: {{last_k: 4, grad_norm_threshold: 10.0, baseline: 0-0}}
configurations:
  - {{label: 0-0, tiers: [0, 0]}}
  - {{label: 0-1, tiers: [0, 1]}}
  - {{label: none-0-1, tiers: [0, 1], sync: none, seeds: [1]}}
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """A complete synthetic experiment: 0-0 and 0-1 on 3 seeds (0-1 worse by 0.51-0.53 val, so the seed
    pairs differ), none-0-1 on 1."""
    yaml_path = tmp_path / "synth.yaml"
    yaml_path.write_text(SMOKE_LIKE.format(base=ROOT / "configs" / "tiny"))
    spec = load_experiment(yaml_path)
    exp = tmp_path / "logs" / "synth"
    exp.mkdir(parents=True)
    cfg = build_derived_config(spec)
    write_manifest(spec, exp, cfg, config_fingerprint(cfg))
    for seed in (1, 2, 3):
        synth_run(exp / f"0-0-seed{seed}", tiers=[0, 0], seed=seed)
        synth_run(exp / f"0-1-seed{seed}", tiers=[0, 1], seed=seed, val_offset=0.5 + 0.01 * seed)
    synth_run(exp / "none-0-1-seed1", tiers=[0, 1], seed=1, sync="none", val_offset=1.0)
    return exp


# --------------------------------------------------------------------------- one run

def test_load_run_final_losses_and_window(tmp_path: Path):
    synth_run(tmp_path / "r", tiers=[0, 1, 1], seed=7, steps=10, noise=0.0)
    r = load_run(tmp_path / "r", last_k=4)
    assert r.status == "finished" and r.steps_completed == 10
    assert r.train_window == (6, 9)
    # no noise: client loss at step s = 10 - 0.1 s + 0.3 tier; mean over s = 6..9 is 10 - 0.75 + 0.3 tier
    assert r.train_loss_by_tier[0] == pytest.approx(9.25)
    assert r.train_loss_by_tier[1] == pytest.approx(9.55)
    assert r.val_step == 10
    assert r.val_loss_by_tier[0] == pytest.approx(9.0)       # base - 0.1 * 10
    assert r.val_loss_by_tier[1] == pytest.approx(9.3)
    assert sorted(r.val_curve[0]) == [5, 10]
    assert r.train_tokens_per_sec == pytest.approx(1200 / 0.5)
    assert r.wall_time_s == 12.5
    assert (r.nan_inf_count, r.grad_norm_explosions, r.clients_completed, r.clients_crashed) == (0, 0, 3, 0)
    assert r.grad_norm_max == pytest.approx(1.5)


def test_tokens_per_sec_leaves_out_rounds_after_a_validation(tmp_path: Path):
    synth_run(tmp_path / "r", tiers=[0, 0], seed=1, steps=10, eval_every=5)
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    for e in events:
        if e["event"] == "step_committed" and e["step"] == 5:      # round 5 began after the eval at 5
            e["step_wall_s"] = 30.0
    (tmp_path / "r" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert load_run(tmp_path / "r").train_tokens_per_sec == pytest.approx(1200 / 0.5)


def test_load_run_counts_nan_and_explosions_from_numbers(tmp_path: Path):
    synth_run(tmp_path / "r", tiers=[0, 1], seed=1, steps=10, nan_at=(2, 8), grad_spike_at=3, lost_client=None)
    r = load_run(tmp_path / "r", last_k=4, grad_norm_threshold=10.0)
    assert r.nan_inf_count == 1
    assert r.grad_norm_explosions == 1            # one step, although both clients reported it
    assert r.grad_norm_max == pytest.approx(50.0)
    assert math.isnan(r.train_loss_by_tier[1])    # a NaN inside the window is not averaged away
    assert not math.isnan(r.train_loss_by_tier[0])
    assert load_run(tmp_path / "r", grad_norm_threshold=100.0).grad_norm_explosions == 0


def test_null_loss_without_tokens_is_missing_not_nan(tmp_path: Path):
    synth_run(tmp_path / "r", tiers=[0, 0], seed=1, steps=4, noise=0.0)
    lines = (tmp_path / "r" / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for e in events:
        if e["event"] == "client_step" and e["client_id"] == 2 and e["step"] == 3:
            e.update(loss=None, tokens=0)
    (tmp_path / "r" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    r = load_run(tmp_path / "r", last_k=2)
    assert r.nan_inf_count == 0
    assert r.train_loss_by_client[2] == pytest.approx(10.0 - 0.2)   # only step 2 remains in its window


def test_load_run_crashed_client_and_partial_run(tmp_path: Path):
    synth_run(tmp_path / "lost", tiers=[0, 0, 1], seed=1, steps=10, lost_client=3)
    r = load_run(tmp_path / "lost", last_k=3)
    assert (r.clients_total, r.clients_completed, r.clients_crashed) == (3, 2, 1)
    assert (r.client_drops, r.steps_discarded, r.client_nonzero_exits) == (1, 0, 1)
    assert 1 not in r.train_loss_by_tier          # the lost tier-1 client has no step in the window
    synth_run(tmp_path / "partial", tiers=[0], seed=1, steps=4, write_summary=False)
    p = load_run(tmp_path / "partial")
    assert not p.finished


def test_load_run_sync_none_is_per_replica(tmp_path: Path):
    synth_run(tmp_path / "n", tiers=[0, 1, 1], seed=1, steps=10, sync="none", noise=0.0)
    r = load_run(tmp_path / "n", last_k=4)
    assert set(r.val_by_replica) == {"client1_tier0", "client2_tier0", "client2_tier1", "client3_tier0",
                                     "client3_tier1"}
    # tier 0 evaluated by all three replicas (offsets 0.01, 0.02, 0.03): the mean over replicas
    assert r.val_loss_by_tier[0] == pytest.approx(9.0 + 0.02)
    assert r.val_loss_by_tier[1] == pytest.approx(9.3 + 0.025)


# --------------------------------------------------------------------------- the report

def test_report_statistics_match_stats_module(experiment: Path):
    rep = build_report(experiment)
    assert rep.baseline == "0-0" and rep.last_k == 4
    c01 = next(c for c in rep.configs if c.label == "0-1")
    c00 = next(c for c in rep.configs if c.label == "0-0")
    assert c01.stat("val_loss_tier0").n == 3
    cp = rep.comparisons["val_loss_tier0"]["0-1"]
    ref = welch(c01.values("val_loss_tier0"), c00.values("val_loss_tier0"))
    assert cp.p == pytest.approx(ref.p) and cp.diff == pytest.approx(0.5, abs=0.05)
    assert cp.significant() is True
    none = rep.comparisons["val_loss_tier0"]["none-0-1"]
    assert none.p is None and none.n_x == 1      # n = 1: n/a, never a p-value
    pair = rep.paired["val_loss_tier0"]["0-1"]
    ref = paired(c01.by_seed("val_loss_tier0"), c00.by_seed("val_loss_tier0"))
    assert pair.n_x == 3 and pair.p == pytest.approx(ref.p) and pair.diff == pytest.approx(cp.diff)
    assert rep.paired["val_loss_tier0"]["none-0-1"].p is None   # one common seed: no paired test


def test_significance_mark_follows_the_holm_adjusted_p():
    cp = welch([1.0, 1.1, 1.2], [0.0, 0.1, 0.05])
    assert cp.p < 0.05
    assert significance_word(cp, holm_p=cp.p) == "yes"
    assert significance_word(cp, holm_p=0.2) == "unadjusted only"
    assert significance_word(welch([1.0, 2.0], [1.1, 1.9]), holm_p=1.0) == "no"
    assert significance_word(welch([1.0], [1.1, 1.9]), holm_p=None) == "n/a"


def test_report_files_columns_and_sections(experiment: Path, tmp_path: Path):
    out = tmp_path / "out"
    paths = write_report(build_report(experiment), out)
    assert {p.name for p in paths} == {"results.md", "results.csv", "results.json", "val_loss.png", "train_loss.png",
                                       "val_loss_diff.png"}
    for p in paths:
        assert p.stat().st_size > 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header == csv_columns([0, 1])
    for col in ["config", "n_seeds", "train_loss_tier0_mean", "train_loss_tier1_ci95", "val_loss_tier0_mean",
                "val_loss_tier1_mean", "val_loss_tier0_diff_vs_baseline", "val_loss_tier0_diff_p_welch",
                "val_loss_tier0_diff_significant", "steps_completed_mean", "wall_time_s_mean",
                "train_tokens_per_sec_mean", "nan_inf_count", "grad_norm_explosions", "clients_completed",
                "clients_crashed", "client_drops", "steps_discarded", "client_nonzero_exits", "last_k"]:
        assert col in header
    by = {r["config"]: r for r in rows}
    assert by["0-1"]["val_loss_tier0_diff_significant"] == "yes"
    assert by["none-0-1"]["val_loss_tier0_diff_significant"] == "n/a"
    assert by["0-1"]["val_loss_tier0_paired_n"] == "3" and float(by["0-1"]["val_loss_tier0_paired_p"]) < 0.05
    assert by["none-0-1"]["val_loss_tier0_ci95"] == ""        # n = 1: no CI
    assert by["0-0"]["n_seeds"] == "3" and by["0-0"]["val_loss_tier1_mean"] == ""
    md = (out / "results.md").read_text()
    for section in ["## Setup", "## Final losses", "## Exploratory: difference vs baseline `0-0`, validation loss, tier 0",
                    "## Exploratory: paired by seed, validation loss, tier 0 (full model), vs `0-0`", "## Throughput and health",
                    "## Independent replicas", "## Runs", "## Plots",
                    "## What these numbers can and cannot tell", "## Columns of results.csv"]:
        assert section in md
    assert "K = 4" in md and "n=1, no CI" in md and "not a shared model" in md
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["baseline"] == "0-0"
    assert len(data["runs"]) == 7
    json.dumps(data, allow_nan=False)            # strict JSON: no NaN leaks


def test_report_excludes_unfinished_runs_and_counts_attempts(experiment: Path):
    bad = experiment / "0-0-seed3"
    (bad / "summary.json").unlink()
    records = [{"event": "run_started", "run": "0-0-seed2", "label": "0-0"},
               {"event": "run_ended", "run": "0-0-seed2", "label": "0-0", "status": "failed"},
               {"event": "run_started", "run": "0-0-seed2", "label": "0-0"},   # cut off: no end recorded
               {"event": "run_started", "run": "0-0-seed2", "label": "0-0"},
               {"event": "run_ended", "run": "0-0-seed2", "label": "0-0", "status": "finished"},
               {"event": "run_started", "run": "0-1-seed1", "label": "0-1"}]   # may still be running
    (experiment / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rep = build_report(experiment)
    c00 = next(c for c in rep.configs if c.label == "0-0")
    c01 = next(c for c in rep.configs if c.label == "0-1")
    assert len(c00.finished) == 2 and c00.runs_not_finished == 1 and c00.failed_attempts == 2
    assert c01.failed_attempts == 0
    assert c00.stat("val_loss_tier0").n == 2
    import shutil
    shutil.rmtree(experiment / "0-1-seed2")
    out = experiment / "out"
    write_report(build_report(experiment), out)
    md = (out / "results.md").read_text()
    assert "| 0-1-seed2 | 2 | not run |" in md and "| 0-0-seed3 | 3 | partial |" in md


def test_report_without_manifest_infers_configurations(tmp_path: Path):
    exp = tmp_path / "bare"
    for seed in (1, 2):
        synth_run(exp / f"a{seed}", tiers=[0, 0], seed=seed)
        synth_run(exp / f"b{seed}", tiers=[0, 1], seed=seed)
    (exp / "a1.failed-1").mkdir()                # moved-aside attempts are ignored
    rep = build_report(exp, last_k=2, baseline="tiers-0-0")
    assert sorted(c.label for c in rep.configs) == ["tiers-0-0", "tiers-0-1"]
    assert all(len(c.finished) == 2 for c in rep.configs)


def test_report_rejects_unknown_baseline(experiment: Path):
    from hetero_testnet.errors import ConfigError

    with pytest.raises(ConfigError, match="baseline"):
        build_report(experiment, baseline="nope")


def test_experiment_notes_end_up_in_the_conclusions(tmp_path: Path):
    """`report.notes` of the YAML: recorded in experiment.json; for an older experiment.json without
    them, read from the recorded source file; none when that is gone too."""
    yaml_path = tmp_path / "synth.yaml"
    note = "The reference measured 8.10 on one run."
    yaml_path.write_text(SMOKE_LIKE.format(base=ROOT / "configs" / "tiny").replace(
        "baseline: 0-0}", f"baseline: 0-0, notes: ['{note}']}}"))
    spec = load_experiment(yaml_path)
    exp = tmp_path / "logs" / "synth"
    exp.mkdir(parents=True)
    cfg = build_derived_config(spec)
    write_manifest(spec, exp, cfg, config_fingerprint(cfg))
    for seed in (1, 2):
        synth_run(exp / f"0-0-seed{seed}", tiers=[0, 0], seed=seed)
        synth_run(exp / f"0-1-seed{seed}", tiers=[0, 1], seed=seed)
    assert build_report(exp).notes == (note,)
    write_report(build_report(exp), tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    conclusions = md[md.index("## What these numbers can and cannot tell"):md.index("## Columns of results.csv")]
    assert f"- {note}\n" in conclusions
    manifest = json.loads((exp / "experiment.json").read_text())
    del manifest["report"]["notes"]                # written before notes were recorded
    (exp / "experiment.json").write_text(json.dumps(manifest))
    assert build_report(exp).notes == (note,)
    yaml_path.unlink()
    assert build_report(exp).notes == ()


def test_the_runner_writes_the_files_the_report_reads():
    from hetero_testnet.experiments import runner, spec

    assert (runner.MANIFEST_FILE, runner.RUNS_LOG_FILE, runner.RUN_SPEC_FILE) == \
        (spec.MANIFEST_FILE, spec.RUNS_LOG_FILE, spec.RUN_SPEC_FILE)


def test_json_significance_is_the_holm_decision_and_references_are_reported(experiment: Path, tmp_path: Path):
    from hetero_testnet.config import dump_yaml, load_run_config
    from hetero_testnet.experiments.export import to_json
    from hetero_testnet.experiments.stats import ALPHA

    rep = build_report(experiment)
    assert not rep.references.available and "experiment-config.yaml" in rep.references.reason
    data = to_json(rep)
    for c in data["comparisons"] + data["paired_comparisons"]:
        assert c["role"] == "exploratory"
        assert c["significant"] == (None if c.get("p_welch", c.get("p")) is None else
                                    (c["p_holm"] is not None and c["p_holm"] < ALPHA))
    assert data["analysis"] is None and "exploratory" in data["settings"]["analysis"]

    cfg = load_run_config(ROOT / "configs" / "tiny")            # the derived config the runner writes
    (experiment / "experiment-config.yaml").write_text(dump_yaml(cfg.to_dict()))
    rep = build_report(experiment)
    refs = rep.references
    assert refs.available and refs.val_targets == cfg.data.val_samples * cfg.model.max_seq_len
    assert refs.bigram < refs.unigram < refs.untrained and refs.untrained_seed == 1
    from hetero_testnet.experiments.render import render_markdown
    md = render_markdown(rep, [])
    assert "## Reference lines (the same validation tokens)" in md and f"{refs.unigram:.4f}" in md
    assert "at unigram level" in md or "above the unigram line" in md or "the bigram line" in md
    assert to_json(rep)["references"]["bigram"] == refs.bigram


def test_runs_that_measured_capacity_add_a_section_and_a_time_to_loss_plot(experiment: Path, tmp_path: Path):
    for run in sorted(experiment.glob("0-*-seed*")):
        s = json.loads((run / "summary.json").read_text())
        s["utilisation"], s["flops_trained"] = 0.6, 1.0e12
        s["val_curve"] = [{"step": 5, "wall_s": 3.0, "tokens": 160, "flops": 5e11, "val_loss": {"tier0": 6.5}},
                          {"step": 10, "wall_s": 6.0, "tokens": 320, "flops": 1e12, "val_loss": {"tier0": 6.0}}]
        for cid, c in s["clients"].items():
            c.update(idle_share=0.25 * int(cid), emulated_s=2.0, wait_s=1.0, rounds=10, bytes_sent_per_step=4e6,
                     profile={"name": "laptop", "speed": 0.5} if cid == "2" else None)
        (run / "summary.json").write_text(json.dumps(s))
    out = tmp_path / "out"
    paths = {p.name for p in write_report(build_report(experiment), out)}
    assert "time_to_loss.png" in paths and (out / "time_to_loss.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "## Capacity: utilisation, idle share and bytes per client" in md
    row = next(line for line in md.splitlines() if line.startswith("| `0-1` | 0.600"))
    assert "| 1 | 0 | local (1) | 0.250 " in row and "| 0.200 | 4.000 |" in row
    assert "| 2 | 1 | laptop (0.5) | 0.500 " in md
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["utilisation"] == 0.6 and run["capacity_by_client"]["2"]["profile"] == "laptop"


@pytest.mark.parametrize("data_seeds, needle", [
    ([1, 2], "the seed sets both"),                       # runs since seeds vary the data order
    ([None, None], "the seed does not change the data order"),   # older runs (tier-mix) keep their text
    ([1, 7], "not every run's data seed equals its seed"),       # --data-seed set apart from the seed
])
def test_the_paired_section_says_what_a_seed_shares(data_seeds, needle) -> None:
    from types import SimpleNamespace

    from hetero_testnet.experiments.render import _pairing_sentence

    runs = [SimpleNamespace(finished=True, seed=s, data_seed=d) for s, d in zip((1, 2), data_seeds)]
    assert needle in _pairing_sentence(SimpleNamespace(runs=runs))

"""A configuration's own devices and sync settings, and `reuse:` (runs taken from another experiment):
what the derived config says, when a run is taken, and the errors when it cannot be."""

import json
import sys
from pathlib import Path

import pytest

from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.derived import build_derived_config, configuration_config, has_own_config
from hetero_testnet.experiments.plan import REUSED_FROM_FILE
from hetero_testnet.experiments.runner import ExperimentRunner
from hetero_testnet.experiments.spec import load_experiment

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"

FAKE_START = """
import json, os, sys
args = sys.argv[2:]
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
run_dir = os.path.join(opt["--logs-dir"], opt["--name"]); os.makedirs(run_dir, exist_ok=True)
json.dump({"status": "finished", "reason": "finished"}, open(os.path.join(run_dir, "summary.json"), "w"))
"""


def _experiment(tmp_path: Path, name: str, configurations: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase_config: {TINY}\nsteps: 2\nseeds: [1]\nconfigurations:\n{configurations}")
    return path


def _runner(path: Path, logs: Path) -> ExperimentRunner:
    script = logs.parent / "fake_start.py"
    script.write_text(FAKE_START)
    return ExperimentRunner(load_experiment(path), logs, command_prefix=[sys.executable, str(script)], poll_s=0.02)


def test_devices_and_sync_settings_go_into_the_configurations_own_config(tmp_path):
    spec = load_experiment(_experiment(tmp_path, "own", """
  - {label: plain, tiers: [0, 0]}
  - {label: slow, tiers: [0, 2, 2], sync: diloco, devices: [local, laptop], sync_settings: {inner_steps: 4}}
"""))
    base = build_derived_config(spec)
    plain, slow = spec.configuration("plain"), spec.configuration("slow")
    assert not has_own_config(plain) and configuration_config(base, plain) == base
    cfg = configuration_config(base, slow)
    assert has_own_config(slow) and cfg.devices.clients == ("local", "laptop")
    assert cfg.sync.mode == "diloco" and cfg.sync.diloco.inner_steps == 4
    assert cfg.sync.diloco.outer_lr == base.sync.diloco.outer_lr      # unset settings keep the config's


@pytest.mark.parametrize("line, needle", [
    ("{label: x, tiers: [0], sync_settings: {topk: 4}}", "sync_settings are for sync demo or diloco"),
    ("{label: x, tiers: [0], devices: [1, 2]}", "devices must be a list of device profile names"),
    ("{label: x, tiers: [0], reuse: 'a/b'}", "reuse must name another experiment"),
    ("{label: x, tiers: [0], reuse: bad}", "reuses its own experiment 'bad'"),
])
def test_bad_configuration_fields_are_one_line_errors(tmp_path, line, needle):
    with pytest.raises(ConfigError) as info:
        load_experiment(_experiment(tmp_path, "bad", f"  - {line}\n"))
    assert needle in str(info.value)


@pytest.mark.parametrize("line, needle", [
    ("{label: x, tiers: [0], sync: demo, sync_settings: {top_k: 4}}", "sync_settings for demo may set topk"),
    ("{label: x, tiers: [0], sync: diloco, sync_settings: {inner_steps: 0}}", "inner_steps must be an integer >= 1"),
    ("{label: x, tiers: [0], devices: [toaster]}", "toaster"),
])
def test_settings_the_config_rejects_fail_before_any_run(tmp_path, line, needle):
    runner = _runner(_experiment(tmp_path, "bad", f"  - {line}\n"), tmp_path / "logs")
    with pytest.raises(ConfigError) as info:
        runner.prepare()
    assert needle in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_a_reused_run_is_copied_once_with_its_origin_and_without_checkpoints(tmp_path):
    logs = tmp_path / "logs"
    first = _runner(_experiment(tmp_path, "first", "  - {label: a, tiers: [0, 2]}\n"), logs)
    assert [o.status for o in first.run()] == ["finished"]
    (logs / "first" / "a-seed1" / "checkpoints").mkdir()
    (logs / "first" / "a-seed1" / "checkpoints" / "big.safetensors").write_bytes(b"x" * 100)
    second = _runner(_experiment(tmp_path, "second", """
  - {label: a, tiers: [0, 2], reuse: first}
  - {label: b, tiers: [0, 2], sync: demo, devices: [local, laptop]}
"""), logs)
    assert [a.action for a in second.prepare()[2]] == ["reuse", "run"]
    assert [o.status for o in second.run()] == ["reused", "finished"]
    copied = logs / "second" / "a-seed1"
    assert (copied / REUSED_FROM_FILE).read_text().strip() == str((logs / "first" / "a-seed1").resolve())
    assert (copied / "summary.json").exists() and not (copied / "checkpoints").exists()
    log = [json.loads(x) for x in (logs / "second" / "runs.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r["run"] == "a-seed1"] == ["reused"]
    manifest = json.loads((logs / "second" / "experiment.json").read_text())
    assert manifest["configurations"][0]["reuse"] == "first"
    assert manifest["configurations"][1]["devices"] == ["local", "laptop"]
    own = (logs / "second" / "experiment-config-b.yaml").read_text()
    assert "devices local,laptop" in own.splitlines()[0] and "laptop" in own
    assert [o.status for o in second.run()] == ["skipped", "skipped"]     # a second pass copies nothing


def test_a_run_made_differently_is_never_reused(tmp_path):
    logs = tmp_path / "logs"
    _runner(_experiment(tmp_path, "first", "  - {label: a, tiers: [0, 2]}\n"), logs).run()
    other = _runner(_experiment(tmp_path, "second", "  - {label: a, tiers: [0, 1], reuse: first}\n"), logs)
    with pytest.raises(ConfigError) as info:
        other.prepare()
    assert "run a-seed1 of experiment first finished with a different specification (tiers changed)" in str(info.value)


def test_a_run_not_finished_there_yet_fails_here_and_is_taken_on_the_next_pass(tmp_path):
    logs = tmp_path / "logs"
    source = _experiment(tmp_path, "first", "  - {label: a, tiers: [0, 2]}\n")
    second = _runner(_experiment(tmp_path, "second", "  - {label: a, tiers: [0, 2], reuse: first}\n"), logs)
    (action,) = second.prepare()[2]
    assert action.action == "reuse" and action.detail.endswith("not finished there yet")
    (outcome,) = second.run()
    assert outcome.status == "failed" and "has not finished" in outcome.reason
    assert not (logs / "second" / "a-seed1").exists()
    _runner(source, logs).run()
    assert [o.status for o in second.run()] == ["reused"]

"""Bad input, authentication, and the no-process-left-behind guarantee of `testnet start`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from testnet_helpers import (ROOT, TINY, assert_no_orphans, cli_cmd, client_pid, live_testnet, summary,
                             wait_for_step)

pytestmark = pytest.mark.slow


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0], lines[0]


def _start(tmp_path, *args):
    return subprocess.run(cli_cmd("start", "--headless", "--server-port", "0", "--logs-dir",
                                      str(tmp_path / "logs"), *args), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--tiers=-1"], "tier must be >= 0"),
    (["--tiers", "0,x"], "--tiers must be comma-separated integers"),
    (["--tiers", "0.5"], "--tiers must be comma-separated integers"),
    (["--tiers", "7"], "tier 7 leaves no FFN neurons"),
    (["--helper-fractions", "1.5"], "--helper-fractions values must be in [0, 1]"),
    (["--helper-fractions=-0.1"], "--helper-fractions values must be in [0, 1]"),
    (["--num-clients", "0"], "--num-clients must be >= 1"),
    (["--sync", "maybe"], "--sync must be one of"),
    (["--name", "../escape"], "must be one directory name"),
    (["--name", "a/b"], "must be one directory name"),
    (["--bogus"], "No such option: --bogus"),             # usage errors are one line too
    (["--num-clients", "x"], "Invalid value for '--num-clients'"),
])
def test_bad_flags(tmp_path, args, needle):
    _assert_one_line_error(_start(tmp_path, "--config-path", str(TINY), *args), needle)


def test_version_and_unknown_command():
    version = subprocess.run(cli_cmd("--version"), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("hetero-testnet 0.") and "torch" in version.stdout
    _assert_one_line_error(subprocess.run(cli_cmd("nocmd"), capture_output=True, text=True, cwd=ROOT, timeout=60),
                           "No such command 'nocmd'")


def _config_dir(tmp_path, text, name="config.yaml"):
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return d


TINY_TEXT = (TINY / "config.yaml").read_text()


@pytest.mark.parametrize("text, name, needle", [
    ("run_id: [unclosed\n", "config.yaml", "malformed config"),
    ("run_id = \n", "state.toml", "malformed config"),
    (TINY_TEXT + "surprise: 1\n", "config.yaml", "unknown config field surprise"),
])
def test_bad_config_files(tmp_path, text, name, needle):
    _assert_one_line_error(_start(tmp_path, "--config-path", str(_config_dir(tmp_path, text, name))), needle)


def test_missing_config(tmp_path):
    _assert_one_line_error(_start(tmp_path, "--config-path", str(tmp_path / "absent")), "does not exist")


def test_data_dir_without_shards(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = TINY_TEXT.replace("../../data/sample", str(empty))
    _assert_one_line_error(_start(tmp_path, "--config-path", str(_config_dir(tmp_path, text))), "no shards")


def test_too_few_clients_for_the_config(tmp_path):
    cfg = ROOT / "configs" / "nanogpt-20m-run"
    _assert_one_line_error(_start(tmp_path, "--config-path", str(cfg), "--num-clients", "2"),
                           "below the config's init_min_clients")


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(cli_cmd("start", "--headless", "--config-path", str(TINY), "--server-port",
                                            str(port), "--logs-dir", str(tmp_path / "logs")),
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    _assert_one_line_error(result, f"port {port}")


def test_wrong_token_is_refused_and_the_run_is_unaffected(logs_dir):
    with live_testnet(logs_dir, "auth", "--num-clients", "2", "--tiers", "0,1", "--total-steps", "30") as (proc, run):
        wait_for_step(run, 0)
        port = json.loads((run / "coordinator.json").read_text())["port"]
        env = {**os.environ, "HETERO_TESTNET_TOKEN": "not-the-token"}
        intruder = subprocess.run(cli_cmd("client", "--coordinator", f"127.0.0.1:{port}", "--tier", "0"),
                                  capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        _assert_one_line_error(intruder, "invalid run token")
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    s = summary(run)
    assert s["status"] == "finished" and s["replicas_identical"] and s["rejected_connections"] == 1
    assert "not-the-token" not in (run / "coordinator.log").read_text()
    assert_no_orphans(run)


def test_sigkill_of_a_client_is_survived_and_nothing_is_left(logs_dir):
    with live_testnet(logs_dir, "kc", "--num-clients", "3", "--tiers", "0,1,1", "--total-steps", "40") as (proc, run):
        wait_for_step(run, 3)
        os.kill(client_pid(run, 2), signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    s = summary(run)
    assert proc.returncode == 0, err
    assert s["status"] == "finished" and s["steps_completed"] == 40 and s["clients_lost"] >= 1
    assert s["clients"]["2"]["exit_code"] == -signal.SIGKILL
    assert_no_orphans(run)


def test_sigkill_of_the_coordinator_ends_everything(logs_dir):
    with live_testnet(logs_dir, "kco", "--num-clients", "2", "--total-steps", "200") as (proc, run):
        wait_for_step(run, 2)
        coordinator = json.loads((run / "coordinator.json").read_text())["pid"]
        os.kill(coordinator, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == 1
    s = summary(run)
    assert s["status"] == "failed" and "SIGKILL" in s["reason"]
    assert_no_orphans(run)
    for k in (1, 2):
        assert "coordinator lost" in (run / f"client-{k}.log").read_text()


def test_ctrl_c_interrupts_cleanly(logs_dir):
    with live_testnet(logs_dir, "cc", "--num-clients", "2", "--total-steps", "200") as (proc, run):
        wait_for_step(run, 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    s = summary(run)
    assert s["status"] == "interrupted" and 2 <= s["steps_completed"] < 200
    assert (run / "checkpoint").exists() is False or s["checkpoint"] is None
    assert_no_orphans(run)


def test_sigterm_stops_a_run_started_with_sigint_ignored(logs_dir):
    # A script's `testnet start &` (no job control), nohup, some CI runners: SIGINT is ignored, so
    # SIGTERM is how the run is stopped, cleanly (summary, client exit codes, nothing left).
    proc = subprocess.Popen(cli_cmd("start", "--headless", "--config-path", str(TINY), "--server-port", "0",
                                    "--logs-dir", str(logs_dir), "--name", "term", "--num-clients", "2",
                                    "--total-steps", "400"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run = logs_dir / "term"
    try:
        wait_for_step(run, 2)
        proc.send_signal(signal.SIGINT)  # ignored, as the shell arranged
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    s = summary(run)
    assert s["status"] == "interrupted" and "SIGTERM" in s["reason"] and 2 <= s["steps_completed"] < 400
    assert all(c["exit_code"] is not None for c in s["clients"].values())
    assert_no_orphans(run)

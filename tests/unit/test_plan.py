"""Launch planning without Typer and without spawning: `plan_launch`, `plan_coordinator` and the
command lines a `LaunchPlan` spells for the launcher."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hetero_testnet.config import dump_yaml, load_run_config
from hetero_testnet.errors import ConfigError
from hetero_testnet.run.plan import (ClientSpec, FaultPlan, check_helper_fraction, default_run_name, plan_coordinator,
                                     plan_launch, resume_position)

from conftest import ROOT, TINY_CONFIG_DIR

TWENTY_M = ROOT / "configs" / "nanogpt-20m-run"


def _plan(tmp_path: Path, **kwargs):
    kwargs.setdefault("num_clients", 3)
    kwargs.setdefault("config_path", TINY_CONFIG_DIR)
    kwargs.setdefault("logs_dir", tmp_path / "logs")
    kwargs.setdefault("name", "r")
    return plan_launch(**kwargs)


def _run_dir_with_checkpoints(tmp_path: Path, steps: dict[str, int]) -> Path:
    """A run directory as the launcher leaves it: its resolved config, and checkpoints at `steps`."""
    run = tmp_path / "logs" / "cut"
    run.mkdir(parents=True)
    cfg = load_run_config(TINY_CONFIG_DIR)
    (run / "config.yaml").write_text("# resolved by: testnet start ...\n" + dump_yaml(cfg.to_dict()))
    for folder, step in steps.items():
        d = run / folder
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step, "data_index": step * 6}))
        (d / "model.safetensors").write_bytes(b"")  # only its presence is checked when choosing
    return run


# ----------------------------------------------------------------- clients, threads, names

def test_per_client_lists_cycle_over_the_clients(tmp_path):
    plan = _plan(tmp_path, num_clients=5, tiers=[0, 1], helper_fractions=[0.5], rotation_intervals=[4, 8, 2])
    assert plan.clients == [ClientSpec(1, 0, 0.5, 4), ClientSpec(2, 1, 0.5, 8), ClientSpec(3, 0, 0.5, 2),
                            ClientSpec(4, 1, 0.5, 4), ClientSpec(5, 0, 0.5, 8)]


def test_empty_lists_give_the_reference_defaults(tmp_path):
    plan = _plan(tmp_path, num_clients=2)
    assert [(c.client_id, c.tier, c.helper_fraction, c.rotation_interval) for c in plan.clients] == [
        (1, 0, 0.0, 16), (2, 0, 0.0, 16)]


@pytest.mark.parametrize("cores, clients, threads, expected", [
    (8, 3, None, 2), (2, 3, None, 1), (16, 4, None, 4), (16, 4, 3, 3), (1, 1, None, 1)])
def test_cores_are_split_into_threads(tmp_path, cores, clients, threads, expected):
    plan = _plan(tmp_path, num_clients=clients, cores=cores, threads=threads)
    assert plan.threads_per_client == expected


def test_a_new_run_goes_under_logs_dir_with_its_name_or_tiers_and_time(tmp_path):
    assert _plan(tmp_path).run_dir == tmp_path / "logs" / "r"
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    plan = _plan(tmp_path, name=None, tiers=[0, 1, 1], now=now)
    assert plan.run_dir == tmp_path / "logs" / "tiers-0-1-1-20250102T030405Z"
    assert default_run_name([2], now) == "tiers-2-20250102T030405Z"


def test_the_plan_carries_every_setting(tmp_path):
    plan = _plan(tmp_path, seed=7, total_steps=3, sync="none", bind="0.0.0.0", server_port=0, device="cpu",
                 min_clients=2, checkpoint_every=2, exit_after_s=30.0, command_line="testnet start -n 3")
    assert plan.config.seed == 7 and plan.config.timing.total_steps == 3
    assert (plan.sync, plan.bind, plan.server_port, plan.min_clients, plan.checkpoint_every) == (
        "none", "0.0.0.0", 0, 2, 2)
    assert plan.exit_after_s == 30.0 and plan.command_line == "testnet start -n 3"
    assert plan.resume_checkpoint is None


def test_fault_plan_is_checked_and_seeded_by_the_run(tmp_path):
    faults = FaultPlan(random_kill_num=1, random_kill_interval_s=6, allowed_to_kill=[2, 3],
                       kill_restart_delay_s=0.5, latency_ms=300, latency_jitter_ms=20, seed=99)
    plan = _plan(tmp_path, faults=faults, seed=5)
    assert plan.faults.seed == 5 and plan.faults.allowed_to_kill == [2, 3] and plan.faults.random_kill_num == 1
    assert faults.seed == 99  # the caller's plan is not changed
    assert plan.faults.network() == {"latency_ms": 300, "latency_jitter_ms": 20, "bandwidth_bytes_per_s": 0.0}


# ----------------------------------------------------------------- resume

def test_resume_continues_the_run_dir_from_its_latest_checkpoint(tmp_path):
    run = _run_dir_with_checkpoints(tmp_path, {"checkpoints/step-000004": 4, "checkpoints/step-000008": 8})
    plan = _plan(tmp_path, resume=run, name="ignored", seed=123, config_path=TWENTY_M, total_steps=12)
    assert plan.run_dir == run
    assert plan.resume_checkpoint == run / "checkpoints" / "step-000008"
    assert plan.config.run_id == "tiny" and plan.config.seed == 1337  # the run's own config and seed
    assert plan.config.timing.total_steps == 12


def test_resume_of_a_finished_run_dir_is_allowed(tmp_path):
    run = _run_dir_with_checkpoints(tmp_path, {"checkpoint": 8})
    (run / "summary.json").write_text("{}")
    assert _plan(tmp_path, resume=run).resume_checkpoint == run / "checkpoint"


def test_resume_position_reads_step_and_data_index(tmp_path):
    run = _run_dir_with_checkpoints(tmp_path, {"checkpoint": 8})
    assert resume_position(run / "checkpoint") == (8, 48)
    (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 8}))
    with pytest.raises(ConfigError, match="records no step and data position"):
        resume_position(run / "checkpoint")


# ----------------------------------------------------------------- every bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_clients=0), r"--num-clients must be >= 1 \(got 0\)"),
    (dict(sync="maybe"), r"--sync must be one of allreduce, none, demo, diloco \(got 'maybe'\)"),
    (dict(server_port=70000), r"--server-port must be in 0..65535 \(got 70000\)"),
    (dict(server_port=-1), r"--server-port must be in 0..65535"),
    (dict(helper_fractions=[0.5, 1.5]), r"--helper-fractions values must be in \[0, 1\] \(got 1.5\)"),
    (dict(helper_fractions=[-0.1]), r"--helper-fractions values must be in \[0, 1\] \(got -0.1\)"),
    (dict(rotation_intervals=[0]), r"--helper-rotation-intervals values must be >= 1 \(got 0\)"),
    (dict(tiers=[0, 7]), r"tier 7 leaves no FFN neurons \(intermediate_size 64\); use a tier <= 6"),
    (dict(tiers=[-1]), r"tier must be >= 0 \(got -1\)"),
    (dict(min_clients=0), r"--min-clients must be >= 1 \(got 0\)"),
    (dict(config_path=TWENTY_M, num_clients=2), r"--num-clients 2 is below the config's init_min_clients 3"),
    (dict(name="../escape"), r"--name '../escape' must be one directory name"),
    (dict(name="a/b"), r"must be one directory name"),
    (dict(faults=FaultPlan(bandwidth_bytes_per_s=-1)), r"--fault-bandwidth-limit must be >= 0"),
    (dict(faults=FaultPlan(latency_ms=-1)), r"--fault-latency-ms must be BASE or BASE-JITTER, both >= 0"),
    (dict(faults=FaultPlan(allowed_to_kill=[4])), r"--allowed-to-kill names client 4, but clients are 1..3"),
    (dict(faults=FaultPlan(allowed_to_kill=[0])), r"--allowed-to-kill names client 0"),
    (dict(faults=FaultPlan(random_kill_num=-1)), r"--random-kill-num must be >= 0"),
    (dict(faults=FaultPlan(random_kill_interval_s=0)), r"--random-kill-interval > 0"),
    (dict(faults=FaultPlan(kill_restart_delay_s=-1)), r"--kill-restart-delay >= 0"),
    (dict(exit_after_s=0), r"--exit-after-secs must be > 0"),
    (dict(threads=0), r"--threads must be >= 1"),
])
def test_bad_input_is_one_config_error(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, **kwargs)


def test_a_finished_run_is_not_overwritten(tmp_path):
    (tmp_path / "logs" / "r").mkdir(parents=True)
    (tmp_path / "logs" / "r" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run") as e:
        _plan(tmp_path)
    assert e.value.hint == "choose another --name, or --resume it"


def test_too_few_clients_hints_at_min_clients(tmp_path):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, config_path=TWENTY_M, num_clients=2)
    assert e.value.hint == "add clients, or pass --min-clients to override"
    assert _plan(tmp_path, config_path=TWENTY_M, num_clients=2, min_clients=2).min_clients == 2


def test_resume_needs_a_run_dir_with_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"--resume .* is not a run directory \(no config.yaml\)"):
        _plan(tmp_path, resume=tmp_path / "nothing")
    run = _run_dir_with_checkpoints(tmp_path, {})
    with pytest.raises(ConfigError, match="no checkpoint in"):
        _plan(tmp_path, resume=run)


def test_bad_config_and_missing_data_fail_before_anything_is_spawned(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _plan(tmp_path, config_path=tmp_path / "absent")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (tmp_path / "empty").mkdir()
    text = (TINY_CONFIG_DIR / "config.yaml").read_text().replace("../../data/sample", str(tmp_path / "empty"))
    (cfg_dir / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="no shards"):
        _plan(tmp_path, config_path=cfg_dir)
    assert not (tmp_path / "logs").exists()  # planning writes nothing


def test_the_helper_fraction_rule_is_matformers():
    assert check_helper_fraction(0.25, error="x") == 0.25
    for bad in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match="^my message$"):
            check_helper_fraction(bad, error="my message")


# ----------------------------------------------------------------- the command lines

def test_coordinator_and_client_command_lines(tmp_path):
    faults = FaultPlan(latency_ms=300, latency_jitter_ms=20, bandwidth_bytes_per_s=1e6)
    plan = _plan(tmp_path, num_clients=2, tiers=[0, 1], helper_fractions=[0, 0.5], min_clients=2, faults=faults,
                 checkpoint_every=4, threads=3, device="cpu", bind="0.0.0.0")
    run = str(tmp_path / "logs" / "r")
    assert plan.coordinator_args(7) == [
        "coordinator", "--config-path", f"{run}/config.yaml", "--run-dir", run, "--bind", "0.0.0.0",
        "--listen-fd", "7", "--expect-clients", "2", "--sync", "allreduce", "--device", "cpu", "--backend", "gloo",
        "--checkpoint-every", "4", "--min-clients", "2", "--fault-latency-ms", "300-20",
        "--fault-bandwidth-limit", "1e+06"]
    assert plan.client_args(plan.clients[1], "127.0.0.1:5000") == [
        "client", "--coordinator", "127.0.0.1:5000", "--client-id", "2", "--tier", "1", "--helper-fraction", "0.5",
        "--helper-rotation-interval", "16", "--threads", "3", "--device", "cpu"]


def test_a_plain_coordinator_command_line_has_no_optional_flags(tmp_path):
    args = _plan(tmp_path, num_clients=1).coordinator_args(3)
    assert "--min-clients" not in args and "--resume-checkpoint" not in args
    assert not any(a.startswith("--fault") for a in args)


def test_a_resumed_coordinator_is_given_the_checkpoint(tmp_path):
    run = _run_dir_with_checkpoints(tmp_path, {"checkpoint": 8})
    args = _plan(tmp_path, resume=run).coordinator_args(3)
    assert args[args.index("--resume-checkpoint") + 1] == str(run / "checkpoint")


# ----------------------------------------------------------------- testnet coordinator

def test_plan_coordinator(tmp_path):
    run = _run_dir_with_checkpoints(tmp_path, {"checkpoint": 8})
    cfg, opts = plan_coordinator(config_path=run / "config.yaml", run_dir=run, token="t", device="cuda",
                                 resume_checkpoint=run / "checkpoint", expect_clients=3, listen_fd=5,
                                 network=FaultPlan(latency_ms=10, random_kill_num=2))
    assert cfg.run_id == "tiny"
    assert (opts.start_step, opts.start_data_index, opts.backend, opts.expected_clients, opts.listen_fd) == (
        8, 48, "nccl", 3, 5)
    assert opts.resume_checkpoint == (run / "checkpoint").resolve() and opts.token == "t"
    assert opts.fault == {"latency_ms": 10, "latency_jitter_ms": 0.0, "bandwidth_bytes_per_s": 0.0}
    _, fresh = plan_coordinator(config_path=TINY_CONFIG_DIR, run_dir=run, token="t", seed=3, total_steps=2)
    assert (fresh.start_step, fresh.start_data_index, fresh.backend, fresh.resume_checkpoint) == (0, 0, "gloo", None)
    with pytest.raises(ConfigError, match="--sync must be one of"):
        plan_coordinator(config_path=TINY_CONFIG_DIR, run_dir=run, token="t", sync="x")


# ----------------------------------------------------------------- random-kill eligibility

class _LiveProc:
    """A stand-in for a client's Popen: alive until killed."""

    def __init__(self, pid: int) -> None:
        self.pid, self.killed = pid, False

    def poll(self):
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> int:
        return -9


class _Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict]] = []

    def emit(self, event, **fields) -> None:
        self.emitted.append((str(event), fields))


def test_random_kills_hit_only_clients_that_trained_since_joining(tmp_path):
    from hetero_testnet.events import Event
    from hetero_testnet.run.launcher import Launcher
    from hetero_testnet.run.processes import Child

    plan = _plan(tmp_path, faults=FaultPlan(random_kill_num=1, random_kill_interval_s=5))
    launcher = Launcher(plan)
    launcher.events = _Events()
    proc = _LiveProc(pid=4242)
    launcher.children["client-2"] = Child("client", 2, proc, tmp_path / "c2.log")
    launcher._random_kill()                                     # started, not joined: nothing to kill
    launcher._note({"event": Event.CLIENT_JOINED, "client_id": 2, "pid": 9999})  # another process's join
    launcher._note({"event": Event.CLIENT_STEP, "client_id": 2, "step": 0})
    launcher._random_kill()
    launcher._note({"event": Event.CLIENT_JOINED, "client_id": 2, "pid": 4242})
    launcher._random_kill()                                     # joined, has not trained a round yet
    assert not proc.killed and launcher.fault_counts["kills"] == 0
    launcher._note({"event": Event.CLIENT_STEP, "client_id": 2, "step": 1})
    launcher._random_kill()
    assert proc.killed and launcher.fault_counts["kills"] == 1
    assert launcher.events.emitted[-1][0] == str(Event.FAULT_KILL)


def test_no_kills_once_only_the_last_round_is_left(tmp_path):
    from hetero_testnet.events import Event
    from hetero_testnet.run.launcher import Launcher

    launcher = Launcher(_plan(tmp_path, total_steps=10, faults=FaultPlan(random_kill_num=1)))
    launcher._note({"event": Event.STEP_COMMITTED, "step": 7, "inner_steps": 1})
    assert not launcher.last_round                    # steps 8 and 9 are left
    launcher._note({"event": Event.STEP_COMMITTED, "step": 8, "inner_steps": 1})
    assert launcher.last_round                        # only step 9: the next commit goes straight to Cooldown
    diloco = Launcher(_plan(tmp_path, total_steps=12, faults=FaultPlan(random_kill_num=1), name="d"))
    diloco._note({"event": Event.STEP_COMMITTED, "step": 0, "inner_steps": 4})
    assert not diloco.last_round                      # rounds at 4 and 8 are left
    diloco._note({"event": Event.STEP_COMMITTED, "step": 4, "inner_steps": 4})
    assert diloco.last_round                          # the round at 8 is the last


def test_the_run_stops_as_failed_when_every_client_exited_before_any_joined(tmp_path):
    from hetero_testnet.events import Event
    from hetero_testnet.run.launcher import Launcher
    from hetero_testnet.run.processes import Child

    launcher = Launcher(_plan(tmp_path))
    stops = []
    launcher.request_stop = stops.append
    first, second = _LiveProc(pid=1), _LiveProc(pid=2)
    (tmp_path / "c1.log").write_text("error: no module named torch\n")
    launcher.children["client-1"] = Child("client", 1, first, tmp_path / "c1.log")
    launcher.children["client-2"] = Child("client", 2, second, tmp_path / "c2.log")
    first.kill()
    launcher._fail_if_no_client_can_join()
    assert not stops                                  # one client is still starting: it may join
    second.kill()
    launcher.pending_restarts.append((0.0, 2))
    launcher._fail_if_no_client_can_join()
    assert not stops                                  # a restart is on its way
    launcher.pending_restarts.clear()
    launcher._fail_if_no_client_can_join()
    assert stops and "every client exited before joining" in stops[0] and "no module named torch" in stops[0]
    assert launcher.failure == stops[0]

    joined = Launcher(_plan(tmp_path, name="j"))
    joined.request_stop = stops.append
    joined.children["client-1"] = Child("client", 1, _LiveProc(pid=1), tmp_path / "c1.log")
    joined._note({"event": Event.CLIENT_JOINED, "client_id": 1, "pid": 1})
    joined.children["client-1"].proc.kill()
    joined._fail_if_no_client_can_join()
    assert len(stops) == 1                            # someone joined once: the coordinator's business

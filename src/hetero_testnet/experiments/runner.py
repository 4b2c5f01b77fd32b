"""Experiment matrices: expand a YAML file into testnet runs (configurations × seeds), run them, resume.

An experiment file names a base config, a step count, seeds and a list of *configurations* (a label,
the tiers of the clients, their helper fractions, the sync mode, optionally their own seeds). Every
(configuration, seed) pair is one *run*, named `<label>-seed<seed>`, launched as its own
`testnet start --headless` subprocess and logged to `<logs-dir>/<experiment>/<run>/` (events.jsonl,
summary.json, ...). Nothing is parsed from log text: the runner reads `summary.json` for the outcome
and follows `events.jsonl` for progress.

Run length and LR schedule. The base config is copied once per experiment to
`<logs-dir>/<experiment>/experiment-config.yaml` with `config.total_steps = steps` and, if given,
`validation.eval_every`, and any straggler deadlines from `deadlines:` (warmup_time, cooldown_time,
max_round_train_time, round_witness_time, waiting_for_members_timeout: they bound waits and never
change what is trained); its `lr_schedule` is left exactly as it was. A run therefore stops after
`steps` committed steps while the LR follows the base config's schedule (the 20M config warms up over
50 of 100 steps, so a 64-step run stops 14 steps into the cosine decay, as the reference's did).
`testnet start --total-steps` is deliberately not used: it moves the schedule's horizon too.

Resuming (plan.py). Running the same file again skips every run whose `summary.json` says `finished`;
a run directory without one (failed, interrupted, killed) is moved aside to `<run>.failed-<n>` (nothing
is deleted) and the run starts afresh. A finished run recorded with a different specification (tiers,
seed, steps, config) is an error, not a silent skip. A configuration with `reuse: OTHER` copies the
finished runs of experiment OTHER instead of running them, when they match exactly. Every attempt is
appended to `<logs-dir>/<experiment>/runs.jsonl`; a failed run is recorded there and the matrix goes on.

Failure semantics of `ExperimentRunner.run`:
- a run that exits 1 (failed) or hits its timeout is recorded and the next run starts;
- a run that exits 2 (bad input) stops the matrix with a `ConfigError`: every run would fail alike;
- Ctrl-C (KeyboardInterrupt) is forwarded to the running `testnet start` (SIGINT; it ends the run
  cleanly as interrupted), recorded, and re-raised after the child exited;
- every wait is bounded: a run gets `run_timeout_s` (passed as `--exit-after-secs`, a clean stop),
  then 120 s of grace before SIGINT, 60 s more before SIGTERM, 30 s more before SIGKILL.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero_testnet.config import RunConfig, dump_yaml
from hetero_testnet.errors import ConfigError, RunFailedError
from hetero_testnet.events import Event, EventTail
from hetero_testnet.run.processes import last_error_line, spawn_supervised, stop
from hetero_testnet.rundir import RunDir, append_jsonl, write_json_atomic
from hetero_testnet.experiments.derived import (build_derived_config, config_fingerprint, configuration_config,
                                               derived_config_name, has_own_config, run_identity)
from hetero_testnet.experiments.plan import (PlannedAction, check_reusable, copy_reused_run, move_aside,
                                            plan_actions, read_summary)
from hetero_testnet.experiments.spec import (DEADLINE_FIELDS, DERIVED_CONFIG_FILE, MANIFEST_FILE, RUN_SPEC_FILE,
                                            RUNS_LOG_FILE, Configuration, ExperimentSpec, PlannedRun, expand)

RUNNER_OUTPUT_FILE = "runner.out"
LOCK_FILE = ".runner.lock"

GRACE_AFTER_TIMEOUT_S = 120.0
SIGINT_WAIT_S = 60.0
SIGTERM_WAIT_S = 30.0
STOP_LADDER = ((signal.SIGINT, SIGINT_WAIT_S), (signal.SIGTERM, SIGTERM_WAIT_S), (signal.SIGKILL, SIGTERM_WAIT_S))
"""How a run that must end is stopped: SIGINT (a clean stop), then SIGTERM, then SIGKILL."""


# --------------------------------------------------------------------------- specification

def start_command(run: PlannedRun, *, config_path: Path, experiment_dir: Path, run_timeout_s: float,
                  threads: int | None) -> list[str]:
    """The `testnet start` invocation of one run (no --total-steps: see the module docstring)."""
    n = len(run.tiers)
    cmd = [sys.executable, "-m", "hetero_testnet", "start", "--headless",
           "--config-path", str(config_path),
           "--num-clients", str(n),
           "--tiers", ",".join(map(str, run.tiers)),
           "--helper-fractions", ",".join(f"{f:g}" for f in run.helper_fractions),
           "--sync", run.sync,
           "--seed", str(run.seed),
           "--server-port", "0",
           "--logs-dir", str(experiment_dir),
           "--name", run.name,
           "--min-clients", str(n),
           "--exit-after-secs", f"{run_timeout_s:g}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


# --------------------------------------------------------------------------- running

@dataclass
class RunOutcome:
    run: PlannedRun
    status: str
    """finished | failed | interrupted | timeout | bad_input | skipped."""
    exit_code: int | None
    reason: str
    wall_s: float
    run_dir: Path
    moved_aside: Path | None = None


class RunnerObserver:
    """Progress hooks (a do-nothing base: the CLI's Rich view overrides them)."""

    def planned(self, actions: list[PlannedAction]) -> None: ...

    def run_started(self, run: PlannedRun, index: int, total: int) -> None: ...

    def steps_done(self, run: PlannedRun, steps: int) -> None: ...

    def run_ended(self, outcome: RunOutcome) -> None: ...


@dataclass
class ExperimentRunner:
    """Runs an experiment's matrix, one `testnet start` subprocess at a time (each uses every core)."""

    spec: ExperimentSpec
    logs_dir: Path
    only: Sequence[str] = ()
    observer: RunnerObserver = field(default_factory=RunnerObserver)
    command_prefix: Sequence[str] | None = None
    """Replace `[python, -m, hetero_testnet]` (tests substitute a fake launcher)."""
    poll_s: float = 0.5
    grace_s: float = GRACE_AFTER_TIMEOUT_S
    """After run_timeout_s (when `testnet start` should have stopped itself) wait this long, then signal."""

    @property
    def experiment_dir(self) -> Path:
        return self.logs_dir / self.spec.name

    def prepare(self) -> tuple[RunConfig, str, list[PlannedAction]]:
        """Build the derived config and the plan; touches nothing on disk."""
        cfg = build_derived_config(self.spec)
        fingerprint = config_fingerprint(cfg)
        runs = expand(self.spec, self.only)
        return cfg, fingerprint, plan_actions(self.spec, runs, self.experiment_dir, self.fingerprints(cfg))

    def label_configs(self, cfg: RunConfig) -> dict[str, RunConfig]:
        """Per configuration label its run config: the derived one with the configuration's own global
        batch, device profiles and sync settings (derived.py). Raises ConfigError on a bad one."""
        return {c.label: configuration_config(cfg, c) for c in self.spec.configurations}

    def fingerprints(self, cfg: RunConfig) -> dict[str, str]:
        return {label: config_fingerprint(c) for label, c in self.label_configs(cfg).items()}

    def config_path(self, label: str) -> Path:
        """The derived config file a configuration's runs start from."""
        own = has_own_config(self.spec.configuration(label))
        return self.experiment_dir / derived_config_name(label if own else None)

    def commands(self, actions: Sequence[PlannedAction]) -> list[list[str]]:
        """The commands a real run would execute (for --dry-run)."""
        return [self._command(a.run, self.config_path(a.run.label)) for a in actions
                if a.action not in ("skip", "reuse")]

    def run(self) -> list[RunOutcome]:
        """Execute the plan. Returns one outcome per planned run (skips included); raises
        ConfigError on a run rejecting its input, KeyboardInterrupt after forwarding Ctrl-C."""
        exp = self.experiment_dir
        exp.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(exp / LOCK_FILE):
            cfg, fingerprint, actions = self.prepare()
            header = (f"# written by `testnet experiment run {self.spec.source}`: base config "
                      f"{self.spec.base_config} with total_steps={self.spec.steps}"
                      f"{'' if self.spec.eval_every is None else f', eval_every={self.spec.eval_every}'}; "
                      "lr_schedule unchanged")
            (exp / DERIVED_CONFIG_FILE).write_text(header + "\n" + dump_yaml(cfg.to_dict()))
            own_configs = self.label_configs(cfg)
            for c in self.spec.configurations:
                if has_own_config(c):
                    self.config_path(c.label).write_text(
                        f"{header}; {_own_settings(c)} (configuration {c.label})\n"
                        + dump_yaml(own_configs[c.label].to_dict()))
            fingerprints = {label: config_fingerprint(c) for label, c in own_configs.items()}
            write_manifest(self.spec, exp, cfg, fingerprint)
            self.observer.planned(actions)
            outcomes: list[RunOutcome] = []
            to_run = [a for a in actions if a.action not in ("skip", "reuse")]
            index = 0
            for a in actions:
                if a.action in ("skip", "reuse"):
                    outcomes.append(self._take_finished(a, fingerprints[a.run.label]))
                    continue
                index += 1
                outcome = self._run_one(a, self.config_path(a.run.label), fingerprints[a.run.label], index,
                                        len(to_run))
                outcomes.append(outcome)
                if outcome.status == "bad_input":
                    raise ConfigError(f"run {a.run.name} rejected its input: {outcome.reason}",
                                      hint=f"see {outcome.run_dir / RUNNER_OUTPUT_FILE}")
            return outcomes

    # ---------------------------------------------------------------- one run
    def _take_finished(self, action: PlannedAction, fingerprint: str) -> RunOutcome:
        """A run that needs no running: finished here earlier, or copied from another experiment (checked
        again now: a run still going there when the plan was made is `failed` here, for the next try)."""
        run_dir = self.experiment_dir / action.run.name
        if action.action == "skip":
            return RunOutcome(action.run, "skipped", None, "finished earlier", 0.0, run_dir)
        assert action.source is not None
        reuse = self.spec.configuration(action.run.label).reuse or ""
        try:
            check_reusable(action.source, run_identity(action.run, fingerprint),
                           action.run.name, reuse)
        except ConfigError as e:
            _log_attempt(self.experiment_dir / RUNS_LOG_FILE, {"event": "not_reused", "run": action.run.name,
                                                               "reason": str(e)})
            return RunOutcome(action.run, "failed", None, str(e), 0.0, run_dir)
        copy_reused_run(action.source, run_dir)
        _log_attempt(self.experiment_dir / RUNS_LOG_FILE, {"event": "reused", "run": action.run.name,
                                                           "from": str(action.source)})
        return RunOutcome(action.run, "reused", None, action.detail, 0.0, run_dir)

    def _command(self, run: PlannedRun, config_path: Path) -> list[str]:
        cmd = start_command(run, config_path=config_path, experiment_dir=self.experiment_dir,
                            run_timeout_s=self.spec.run_timeout_s, threads=self.spec.threads)
        if self.command_prefix is not None:
            cmd = [*self.command_prefix, *cmd[3:]]
        return cmd

    def _run_one(self, action: PlannedAction, config_path: Path, fingerprint: str, index: int,
                 total: int) -> RunOutcome:
        run = action.run
        exp = self.experiment_dir
        run_dir = exp / run.name
        moved = None
        if run_dir.exists():
            moved = move_aside(run_dir)
            _log_attempt(exp / RUNS_LOG_FILE, {"event": "moved_aside", "run": run.name, "to": moved.name,
                                               "detail": action.detail})
        run_dir.mkdir(parents=True)
        (run_dir / RUN_SPEC_FILE).write_text(json.dumps(run_identity(run, fingerprint), indent=2) + "\n")
        cmd = self._command(run, config_path)
        _log_attempt(exp / RUNS_LOG_FILE, {"event": "run_started", "run": run.name, "label": run.label,
                                           "seed": run.seed, "command": cmd})
        self.observer.run_started(run, index, total)
        t0 = time.monotonic()
        code, forced = None, None
        interrupted = False
        proc = spawn_supervised(cmd, log_path=run_dir / RUNNER_OUTPUT_FILE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code, forced = self._wait(proc, run, run_dir, t0)
        except KeyboardInterrupt:
            interrupted = True
            code = stop(proc, STOP_LADDER, ctrl_c_escalates=True)
        outcome = self._outcome(run, run_dir, code, forced, interrupted, time.monotonic() - t0, moved)
        _log_attempt(exp / RUNS_LOG_FILE, {"event": "run_ended", "run": run.name, "label": run.label,
                                           "seed": run.seed, "status": outcome.status, "exit_code": code,
                                           "reason": outcome.reason, "wall_s": round(outcome.wall_s, 3)})
        self.observer.run_ended(outcome)
        if interrupted:
            raise KeyboardInterrupt
        return outcome

    def _wait(self, proc: subprocess.Popen, run: PlannedRun, run_dir: Path, t0: float) -> tuple[int, str | None]:
        """Wait for the run, reporting committed steps; escalate past the timeout plus grace."""
        tail = EventTail(RunDir(run_dir).events)
        steps = 0
        deadline = t0 + self.spec.run_timeout_s + self.grace_s
        while True:
            try:
                code = proc.wait(timeout=self.poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            steps = self._count_steps(tail, run, steps)
            if time.monotonic() > deadline:
                code = stop(proc, STOP_LADDER, ctrl_c_escalates=True)
                return code, f"no exit within run_timeout_s {self.spec.run_timeout_s:g} s + " \
                             f"{self.grace_s:g} s grace; stopped by signal"
        self._count_steps(tail, run, steps)
        return code, None

    def _count_steps(self, tail: EventTail, run: PlannedRun, steps: int) -> int:
        new = steps
        for e in tail.poll():
            if e.get("event") == Event.STEP_COMMITTED and isinstance(e.get("step"), int):
                new = max(new, e["step"] + 1)
        if new != steps:
            self.observer.steps_done(run, new)
        return new

    def _outcome(self, run: PlannedRun, run_dir: Path, code: int | None, forced: str | None,
                 interrupted: bool, wall_s: float, moved: Path | None) -> RunOutcome:
        summary = read_summary(run_dir)
        s_status = summary.get("status") if summary else None
        s_reason = str(summary.get("reason")) if summary and summary.get("reason") is not None else None
        if interrupted:
            status, reason = "interrupted", "Ctrl-C"
        elif forced:
            status, reason = "timeout", forced
        elif code == 0 and s_status == "finished":
            status, reason = "finished", s_reason or "finished"
        elif code == 2:
            status, reason = "bad_input", s_reason or last_error_line(run_dir / RUNNER_OUTPUT_FILE) or "exit code 2"
        elif s_status == "interrupted" or code == 130:
            status = "timeout"
            reason = f"stopped early ({s_reason or 'exit code 130'}); run_timeout_s is {self.spec.run_timeout_s:g} s"
        else:
            status = "failed"
            reason = s_reason or f"exit code {code} without a summary.json"
            if code == 0 and s_status != "finished":
                reason = f"exit code 0 but summary status {s_status!r}: {reason}"
        return RunOutcome(run, status, code, reason, wall_s, run_dir, moved)


def write_manifest(spec: ExperimentSpec, experiment_dir: Path, cfg: RunConfig, fingerprint: str) -> None:
    """`experiment.json`: the whole matrix (not only `--only`'s part), for the report."""
    manifest = {
        "name": spec.name, "description": spec.description, "source": str(spec.source),
        "base_config": str(spec.base_config), "derived_config": DERIVED_CONFIG_FILE,
        "config_fingerprint": fingerprint, "steps": spec.steps,
        "eval_every": cfg.data.eval_every, "val_num_samples": cfg.data.val_samples,
        "deadlines": {k: getattr(cfg.timing, k) for k in DEADLINE_FIELDS},
        "lr_schedule": dataclasses.asdict(cfg.lr_schedule), "seeds": list(spec.seeds),
        "run_timeout_s": spec.run_timeout_s,
        "report": dataclasses.asdict(spec.report),
        "configurations": [_manifest_configuration(c) for c in spec.configurations],
        "runs": [r.to_dict() for r in expand(spec)],
    }
    if spec.analysis is not None:
        manifest["analysis"] = spec.analysis.to_dict()
    write_json_atomic(experiment_dir / MANIFEST_FILE, manifest)


def _manifest_configuration(c: Configuration) -> dict[str, Any]:
    """A configuration as experiment.json records it (optional fields only when set)."""
    d: dict[str, Any] = {"label": c.label, "tiers": list(c.tiers), "helper_fractions": list(c.helper_fractions),
                         "sync": c.sync, "seeds": list(c.seeds)}
    if c.global_batch is not None:
        d["global_batch"] = c.global_batch
    if c.devices:
        d["devices"] = list(c.devices)
    if c.sync_settings:
        d["sync_settings"] = dict(c.sync_settings)
    if c.reuse is not None:
        d["reuse"] = c.reuse
    if has_own_config(c):
        d["derived_config"] = derived_config_name(c.label)
    return d


def _own_settings(c: Configuration) -> str:
    """`global batch 13, devices local,laptop` for the header of a configuration's own config file."""
    parts = [] if c.global_batch is None else [f"global batch {c.global_batch}"]
    if c.devices:
        parts.append(f"devices {','.join(c.devices)}")
    if c.sync_settings:
        parts.append(f"sync {c.sync} " + ", ".join(f"{k}={v}" for k, v in sorted(c.sync_settings.items())))
    return "; ".join(parts)


# --------------------------------------------------------------------------- helpers

class _exclusive_lock:
    """Only one `experiment run` per experiment directory at a time (flock; released on exit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_exclusive_lock":
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunFailedError(f"another `testnet experiment run` is using {self.path.parent}",
                                 hint="wait for it to finish, or use another --logs-dir") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _log_attempt(path: Path, record: dict[str, Any]) -> None:
    """One line of `runs.jsonl`, stamped with the time."""
    append_jsonl(path, {"ts": time.time(), **record})

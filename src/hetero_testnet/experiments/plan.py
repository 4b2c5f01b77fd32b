"""What `testnet experiment run` will do with each run: start it, redo it, skip it, or take it from
another experiment; and the file moves those decisions need.

A run directory is `<logs-dir>/<experiment>/<label>-seed<seed>/`. Finished (its summary.json says so)
and recorded with the same identity: skipped. Unfinished: moved aside to `<run>.failed-<n>` (nothing is
deleted) and run again. A configuration with `reuse: OTHER` takes `<logs-dir>/OTHER/<run>/` instead of
running, when that run finished with exactly this run's identity: the two experiments then share one
set of reference runs, and the copy says where it came from (`REUSED_FROM_FILE`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import RunDir, read_json_or_none
from hetero_testnet.experiments.derived import run_identity
from hetero_testnet.experiments.spec import RUN_SPEC_FILE, ExperimentSpec, PlannedRun

REUSED_FROM_FILE = "reused-from.txt"
"""In a run directory copied from another experiment: the source directory, one line."""
NOT_COPIED = ("checkpoints",)
"""What a reused run leaves behind (large, and nothing the report reads)."""

_FAILED_DIR = re.compile(r"^(?P<run>.+)\.failed-(?P<n>\d+)$")


@dataclass(frozen=True, slots=True)
class PlannedAction:
    run: PlannedRun
    action: str
    """`run` (new), `rerun` (an unfinished directory is moved aside first), `skip` (finished) or
    `reuse` (copied from `source`, a finished run of another experiment)."""
    detail: str = ""
    source: Path | None = None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    data = read_json_or_none(RunDir(run_dir).summary)
    return data if isinstance(data, dict) else None


def plan_actions(spec: ExperimentSpec, runs: Sequence[PlannedRun], experiment_dir: Path,
                 fingerprints: Mapping[str, str]) -> list[PlannedAction]:
    """Decide per run: skip (finished, same spec), rerun (unfinished dir), reuse or run (no dir).
    `fingerprints`: each configuration label's config fingerprint.

    A run to be reused that has not finished in its experiment yet is still planned as `reuse` (its
    detail says so): the runner checks it again when its turn comes, so a matrix can start while the
    one it borrows from is still running. Raises ConfigError when a finished run (here, or to be
    reused) was made with another specification."""
    actions = []
    for r in runs:
        d = experiment_dir / r.name
        wanted = run_identity(r, fingerprints[r.label])
        reuse = spec.configuration(r.label).reuse
        if not d.exists():
            if reuse is None:
                actions.append(PlannedAction(r, "run"))
            else:
                source = experiment_dir.parent / reuse / r.name
                finished = _is_finished(source)
                if finished:
                    check_reusable(source, wanted, r.name, reuse)
                detail = f"from experiment {reuse}" + ("" if finished else ", not finished there yet")
                actions.append(PlannedAction(r, "reuse", detail, source))
            continue
        if _is_finished(d):
            _check_finished_as(d, wanted, f"run {r.name} in {experiment_dir}",
                               hint="use another --logs-dir, or move that run directory away to redo it")
            actions.append(PlannedAction(r, "skip", "finished"))
        elif reuse is not None:
            raise ConfigError(f"run {r.name} in {experiment_dir} is taken from experiment {reuse} but is an "
                              f"unfinished copy", hint=f"remove {d} and run again")
        else:
            summary = read_summary(d)
            status = summary.get("status") if summary else "no summary.json"
            actions.append(PlannedAction(r, "rerun", f"previous attempt: {status}"))
    return actions


def check_reusable(source: Path, wanted: dict[str, Any], run: str, experiment: str) -> None:
    """ConfigError unless `source`, run `run` of `experiment`, finished with the identity `wanted`."""
    _check_finished_as(source, wanted, f"run {run} of experiment {experiment}",
                       hint=f"run experiment {experiment} first (same --logs-dir), or drop `reuse:`")


def _is_finished(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary.get("status") == "finished"


def _check_finished_as(run_dir: Path, wanted: dict[str, Any], what: str, *, hint: str) -> None:
    """ConfigError unless `run_dir` finished and recorded the identity `wanted` (a directory without a
    record, from before records existed, passes when finished)."""
    if not _is_finished(run_dir):
        raise ConfigError(f"{what} has not finished ({run_dir})", hint=hint)
    recorded = read_json_or_none(run_dir / RUN_SPEC_FILE)
    if recorded is not None and recorded != wanted:
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        raise ConfigError(f"{what} finished with a different specification ({', '.join(changed)} changed)",
                          hint=hint)


def copy_reused_run(source: Path, run_dir: Path) -> None:
    """Copy a finished run of another experiment into this one (no checkpoints), through a temporary
    name so that an interrupted copy never looks finished. Raises OSError if the copy fails."""
    partial = run_dir.with_name(run_dir.name + ".copying")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (partial / REUSED_FROM_FILE).write_text(f"{source.resolve()}\n")
    partial.rename(run_dir)


def move_aside(run_dir: Path) -> Path:
    """Rename an unfinished run directory to `<run>.failed-<n>` (n = 1 + the highest in use)."""
    used = [int(m.group("n")) for p in run_dir.parent.iterdir()
            if (m := _FAILED_DIR.match(p.name)) and m.group("run") == run_dir.name]
    target = run_dir.with_name(f"{run_dir.name}.failed-{max(used, default=0) + 1}")
    run_dir.rename(target)
    return target

"""Experiment files: the YAML matrix (configurations x seeds) as validated, frozen dataclasses.

See `runner.py` for how the runs are executed and resumed. Here: parsing with errors that
name the field (`FILE: configurations[2]: tiers must ...`), expansion into named runs
(`<label>-seed<seed>`), and the derived run config (steps, eval settings and deadlines changed,
the LR schedule never; a configuration's own `global_batch`, if any, in a config of its own), and the
pre-registered `analysis:` (prereg.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetero_testnet.config import DIRECTORY_NAME, SYNC_MODES, load_run_config
from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.prereg import Analysis, parse_analysis

# Files of an experiment directory (<logs-dir>/<name>/) that runner.py writes and the report reads.
# Named here, beside the spec both import, so the report needs nothing of the runner (which needs run/).
MANIFEST_FILE = "experiment.json"
"""The whole matrix and the derived settings (`runner.write_manifest`)."""
RUNS_LOG_FILE = "runs.jsonl"
"""One record per attempt: run_started, run_ended, moved_aside."""
RUN_SPEC_FILE = "experiment-run.json"
"""In each run directory: the `run_identity` it was started with."""
DERIVED_CONFIG_FILE = "experiment-config.yaml"
"""The base config with the experiment's steps, eval settings and deadlines (runner.py writes it)."""
DEADLINE_FIELDS = ("warmup_time", "cooldown_time", "max_round_train_time", "round_witness_time",
                   "waiting_for_members_timeout")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportSettings:
    """How `testnet experiment report` summarises the runs (all but `notes` can be overridden on its
    command line). These defaults are also the report's for a directory without settings of its own
    (`DEFAULT_REPORT`)."""

    last_k: int = 8
    """Final train loss = mean of each client's losses over the run's last K committed steps."""
    grad_norm_threshold: float = 10.0
    """A step whose aggregated gradient norm (before clipping) exceeds this is an explosion."""
    baseline: str | None = None
    """Label differences are taken against; default: the first configuration."""
    notes: tuple[str, ...] = ()
    """Statements about this experiment the numbers cannot carry (e.g. how a published result was
    measured), listed in the report's "What these numbers can and cannot tell" after the generic
    ones; one Markdown paragraph each."""

    def __post_init__(self) -> None:
        _require(self.last_k >= 1, "report.last_k must be >= 1")
        _require(self.grad_norm_threshold > 0, "report.grad_norm_threshold must be > 0")


DEFAULT_REPORT = ReportSettings()


@dataclass(frozen=True, kw_only=True, slots=True)
class Configuration:
    """One row of the results table: a tier mix, helper fractions and sync mode, over some seeds."""

    label: str
    tiers: tuple[int, ...]
    """Tier of each client (client k gets tiers[k-1]); the number of clients is len(tiers)."""
    helper_fractions: tuple[float, ...]
    """One per client (a shorter list cycles, as `--helper-fractions` does)."""
    sync: str = "allreduce"
    seeds: tuple[int, ...]
    global_batch: int | None = None
    """Sequences per step for this configuration (config.global_batch_size_start/end); None keeps the
    base config's. Runs of such a configuration get their own derived config file (derived.py)."""
    devices: tuple[str, ...] = ()
    """Device profile of each client (config `devices.clients`, cycling; presets or the base config's
    own profiles); () keeps the base config's."""
    sync_settings: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the sync mode (config `sync.demo` or `sync.diloco`, e.g. {inner_steps: 16}); only for
    demo and diloco."""
    reuse: str | None = None
    """Name of another experiment (a sibling under the same --logs-dir) whose finished runs of this
    label are taken instead of run again, when their identity (tiers, seed, steps, batch, config
    fingerprint) is exactly this configuration's: a reference arm shared by two tables."""

    @property
    def num_clients(self) -> int:
        return len(self.tiers)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentSpec:
    name: str
    description: str
    source: Path
    base_config: Path
    steps: int
    """Committed steps per run (config.total_steps); the LR schedule stays the base config's."""
    eval_every: int | None
    """Validation every N steps (and always at the end); None keeps the base config's value."""
    eval_tiers: tuple[int, ...]
    """Tiers validated in every run even if no client trains them (so every mix has them all)."""
    deadlines: dict[str, float]
    """Overrides of the config's straggler deadlines (s); keys from DEADLINE_FIELDS."""
    seeds: tuple[int, ...]
    run_timeout_s: float
    threads: int | None
    """Torch threads per client; None lets `testnet start` pick (cores // clients)."""
    report: ReportSettings
    configurations: tuple[Configuration, ...]
    order: str = "configuration"
    """Run order: `configuration` (every seed of one configuration, then the next) or `seed` (every
    configuration on seed 1, then seed 2, ...: a matrix cut short stays paired)."""
    analysis: Analysis | None = None
    """The pre-registered analysis (prereg.py), or None: then every test in the report is exploratory."""

    def configuration(self, label: str) -> Configuration:
        for c in self.configurations:
            if c.label == label:
                return c
        raise ConfigError(f"no configuration labelled {label!r} in {self.source}",
                          hint=f"labels: {', '.join(c.label for c in self.configurations)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedRun:
    """One (configuration, seed) pair: a `testnet start` invocation and its log directory name."""

    name: str
    label: str
    seed: int
    tiers: tuple[int, ...]
    helper_fractions: tuple[float, ...]
    sync: str
    steps: int
    global_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run's identity; `global_batch` only when the configuration sets one (so runs recorded
        before the field existed keep their identity)."""
        d: dict[str, Any] = {"name": self.name, "label": self.label, "seed": self.seed, "tiers": list(self.tiers),
                             "helper_fractions": list(self.helper_fractions), "sync": self.sync,
                             "steps": self.steps, "num_clients": len(self.tiers)}
        if self.global_batch is not None:
            d["global_batch"] = self.global_batch
        return d


def run_name(label: str, seed: int) -> str:
    return f"{label}-seed{seed}"


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Parse and validate an experiment YAML file (format: module docstring and configs/experiments/)."""
    path = Path(path)
    top = _read_mapping(path)
    where = str(path)
    name = _take(top, "name", str, where)
    _require(bool(DIRECTORY_NAME.match(name)), f"{where}: name {name!r} must be letters, digits, '.', '_', '+', '-'")
    description = _take(top, "description", str, where, "")
    base = Path(_take(top, "base_config", str, where)).expanduser()
    base_config = base if base.is_absolute() else (path.parent / base).resolve()
    steps = _take(top, "steps", int, where)
    _require(steps >= 1, f"{where}: steps must be >= 1 (got {steps})")
    eval_every = _take(top, "eval_every", int, where, None)
    _require(eval_every is None or eval_every >= 0, f"{where}: eval_every must be >= 0")
    eval_tiers = tuple(_take(top, "eval_tiers", list, where, []))
    _require(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eval_tiers),
             f"{where}: eval_tiers must be integers >= 0")
    seeds = _seeds(_take(top, "seeds", list, where, [1]), f"{where}: seeds")
    deadlines = _deadlines(top, where)
    run_timeout_s = float(_take(top, "run_timeout_s", (int, float), where, 3600.0))
    _require(run_timeout_s > 0, f"{where}: run_timeout_s must be > 0")
    threads = _take(top, "threads", int, where, None)
    _require(threads is None or threads >= 1, f"{where}: threads must be >= 1")
    report = _report_settings(top, where)
    configurations = _configurations(top, seeds, where)
    order = _take(top, "order", str, where, "configuration")
    _require(order in ("configuration", "seed"), f"{where}: order must be configuration or seed (got {order!r})")
    raw_analysis = top.pop("analysis", None)
    analysis = None if raw_analysis is None else \
        parse_analysis(raw_analysis, f"{where}: analysis", {c.label for c in configurations})
    _no_leftovers(top, where)
    for c in configurations:
        _require(c.reuse != name, f"{where}: configuration {c.label!r} reuses its own experiment {name!r}")
    if report.baseline is not None and report.baseline not in [c.label for c in configurations]:
        raise ConfigError(f"{where}: report.baseline {report.baseline!r} is not a configuration label",
                          hint=f"labels: {', '.join(c.label for c in configurations)}")
    spec = ExperimentSpec(name=name, description=description.strip(), source=path.resolve(),
                          base_config=base_config, steps=steps, eval_every=eval_every, eval_tiers=eval_tiers,
                          deadlines=deadlines, seeds=seeds, run_timeout_s=run_timeout_s, threads=threads,
                          report=report, configurations=configurations, order=order,
                          analysis=analysis)
    _check_tiers_fit(spec, where)
    return spec


def load_report_notes(path: Path) -> tuple[str, ...]:
    """`report.notes` of an experiment file, the rest unchecked; () when there is no such file.

    For reports on runs whose experiment.json was written before it recorded the notes."""
    if not path.is_file():
        return ()
    report = dict(_take(_read_mapping(path), "report", dict, str(path), {}) or {})
    return _notes(report, f"{path}: report")


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read experiment file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed experiment file {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {path} must be a mapping at the top level")
    return dict(raw)


def _deadlines(top: dict, where: str) -> dict[str, float]:
    raw = dict(_take(top, "deadlines", dict, where, {}) or {})
    deadlines = {k: float(_take(raw, k, (int, float), f"{where}: deadlines")) for k in DEADLINE_FIELDS if k in raw}
    _no_leftovers(raw, f"{where}: deadlines (allowed: {', '.join(DEADLINE_FIELDS)})")
    _require(all(v > 0 for v in deadlines.values()), f"{where}: deadlines must be > 0 seconds")
    return deadlines


def _report_settings(top: dict, where: str) -> ReportSettings:
    raw = dict(_take(top, "report", dict, where, {}) or {})
    here = f"{where}: report"
    report = ReportSettings(
        last_k=_take(raw, "last_k", int, here, DEFAULT_REPORT.last_k),
        grad_norm_threshold=float(_take(raw, "grad_norm_threshold", (int, float), here,
                                        DEFAULT_REPORT.grad_norm_threshold)),
        baseline=_take(raw, "baseline", str, here, DEFAULT_REPORT.baseline),
        notes=_notes(raw, here))
    _no_leftovers(raw, here)
    return report


def _notes(report: dict, where: str) -> tuple[str, ...]:
    notes = _take(report, "notes", list, where, [])
    _require(all(isinstance(n, str) and n.strip() for n in notes), f"{where}: notes must be a list of non-empty "
             "strings (one statement each)")
    return tuple(n.strip() for n in notes)


def _configurations(top: dict, default_seeds: tuple[int, ...], where: str) -> tuple[Configuration, ...]:
    items = _take(top, "configurations", list, where)
    _require(bool(items), f"{where}: configurations must list at least one configuration")
    configurations = tuple(_configuration(item, i, default_seeds, f"{where}: configurations[{i}]")
                           for i, item in enumerate(items))
    labels = [c.label for c in configurations]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    _require(not dupes, f"{where}: configuration labels must be unique (repeated: {', '.join(dupes)})")
    return configurations


def _check_tiers_fit(spec: ExperimentSpec, where: str) -> None:
    """Load the base config (fails early on a bad one) and check every tier leaves FFN neurons."""
    cfg = load_run_config(spec.base_config)
    for c in spec.configurations:
        for t in c.tiers:
            if cfg.model.intermediate_size >> t < 1:
                raise ConfigError(f"{where}: configuration {c.label!r} uses tier {t}, which leaves no FFN "
                                  f"neurons at intermediate_size {cfg.model.intermediate_size}")


def _configuration(item: Any, index: int, default_seeds: tuple[int, ...], where: str) -> Configuration:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping with label, tiers, ...")
    d = dict(item)
    label = str(_take(d, "label", (str, int), where))
    _require(bool(DIRECTORY_NAME.match(label)),
             f"{where}: label {label!r} must be letters, digits, '.', '_', '+', '-' (it names directories)")
    tiers = _take(d, "tiers", list, where)
    _require(bool(tiers) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tiers),
             f"{where}: tiers must be a non-empty list of integers >= 0 (got {tiers!r})")
    fractions = _take(d, "helper_fractions", list, where, [0.0])
    _require(bool(fractions) and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1
                                     for f in fractions),
             f"{where}: helper_fractions must be numbers in [0, 1] (got {fractions!r})")
    _require(len(fractions) <= len(tiers),
             f"{where}: helper_fractions has more entries ({len(fractions)}) than clients ({len(tiers)})")
    per_client = tuple(float(fractions[i % len(fractions)]) for i in range(len(tiers)))
    sync = _take(d, "sync", str, where, "allreduce")
    _require(sync in SYNC_MODES, f"{where}: sync must be one of {', '.join(SYNC_MODES)} (got {sync!r})")
    seeds_raw = _take(d, "seeds", list, where, None)
    seeds = _seeds(seeds_raw, f"{where}: seeds") if seeds_raw is not None else default_seeds
    global_batch = _take(d, "global_batch", int, where, None)
    _require(global_batch is None or global_batch >= len(tiers),
             f"{where}: global_batch must be >= the number of clients ({len(tiers)}), got {global_batch}")
    devices = _take(d, "devices", list, where, [])
    _require(all(isinstance(n, str) and n for n in devices),
             f"{where}: devices must be a list of device profile names (got {devices!r})")
    sync_settings = _take(d, "sync_settings", dict, where, {})
    _require(not sync_settings or sync in ("demo", "diloco"),
             f"{where}: sync_settings are for sync demo or diloco (this configuration's sync is {sync})")
    reuse = _take(d, "reuse", str, where, None)
    _require(reuse is None or bool(DIRECTORY_NAME.match(reuse)),
             f"{where}: reuse must name another experiment (got {reuse!r})")
    _no_leftovers(d, where)
    return Configuration(label=label, tiers=tuple(tiers), helper_fractions=per_client, sync=sync, seeds=seeds,
                         global_batch=global_batch, devices=tuple(devices), sync_settings=dict(sync_settings),
                         reuse=reuse)


def expand(spec: ExperimentSpec, only: Sequence[str] = ()) -> list[PlannedRun]:
    """Every (configuration, seed) run in file order; `only` keeps runs whose name or label matches
    one of the shell-style patterns (e.g. `0-1-1*`, `*-seed1`)."""
    runs = [PlannedRun(name=run_name(c.label, s), label=c.label, seed=s, tiers=c.tiers,
                       helper_fractions=c.helper_fractions, sync=c.sync, steps=spec.steps, global_batch=c.global_batch)
            for c in spec.configurations for s in c.seeds]
    if spec.order == "seed":
        runs.sort(key=lambda r: r.seed)                # stable: configurations keep their file order
    if only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.label, p)
                                       for p in only)]
        if not runs:
            raise ConfigError(f"--only {' '.join(only)} matches no run of experiment {spec.name}",
                              hint="run names are <label>-seed<seed>; see --dry-run without --only")
    return runs


def _seeds(values: Any, where: str) -> tuple[int, ...]:
    _require(isinstance(values, list) and bool(values)
             and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values),
             f"{where} must be a non-empty list of integers >= 0 (got {values!r})")
    _require(len(set(values)) == len(values), f"{where} repeats a seed: {values!r}")
    return tuple(values)


_MISSING = object()


def _take(d: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING) -> Any:
    if key not in d or d[key] is None:
        d.pop(key, None)
        if default is _MISSING:
            raise ConfigError(f"{where}: field {key!r} is required")
        return default
    value = d.pop(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: field {key!r} must be {names} (got {value!r})")
    return value


def _no_leftovers(d: dict, where: str) -> None:
    if d:
        raise ConfigError(f"{where}: unknown field {', '.join(map(repr, d))}")

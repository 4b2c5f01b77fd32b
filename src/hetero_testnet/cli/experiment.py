"""`testnet experiment run|report`: matrices of testnet runs (tier mixes × seeds) and their reports.

`run` expands an experiment YAML (configs/experiments/) into runs and executes them one after
another with a Rich progress bar (runs done, steps, ETA); it is resumable (rerun the same command:
finished runs are skipped, unfinished ones moved aside and retried). `report` turns an experiment's
logs directory into results.md/csv/json and plots. Domain logic lives in experiments.py and
report.py; this module parses options and renders.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from hetero_testnet.errors import ConfigError, RunFailedError
from hetero_testnet.experiments.runner import RunnerObserver

experiment_app = typer.Typer(
    name="experiment",
    help="Run matrices of testnet runs (tier mixes × seeds) and report them with statistics.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")


# --------------------------------------------------------------------------- progress view

class RichRunnerView(RunnerObserver):
    """RunnerObserver drawing two bars (runs, steps with ETA) and one line per finished run."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, speed_estimate_period=900.0)
        self.runs_task: TaskID | None = None
        self.steps_task: TaskID | None = None
        self.run_base = 0
        self.current_steps = 0

    def __enter__(self) -> "RichRunnerView":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def planned(self, actions) -> None:
        todo = [a for a in actions if a.action not in ("skip", "reuse")]
        skipped = sum(a.action == "skip" for a in actions)
        reused = [a for a in actions if a.action == "reuse"]
        if skipped:
            self.console.print(f"{skipped} run(s) already finished: skipped")
        if reused:
            self.console.print(f"{len(reused)} run(s) taken from another experiment ({reused[0].detail}, ...)")
        if not todo:
            return
        self.runs_task = self.progress.add_task("runs", total=len(todo))
        self.steps_task = self.progress.add_task("steps", total=sum(a.run.steps for a in todo) or 1)

    def run_started(self, run, index: int, total: int) -> None:
        self.current_steps = 0
        self.progress.update(self.steps_task, description=f"steps ({run.name}, {index}/{total})")

    def steps_done(self, run, steps: int) -> None:
        self.current_steps = min(steps, run.steps)
        self.progress.update(self.steps_task, completed=self.run_base + self.current_steps)

    def run_ended(self, outcome) -> None:
        self.run_base += outcome.run.steps
        self.progress.update(self.steps_task, completed=self.run_base)
        self.progress.advance(self.runs_task)
        mark = "[green]ok[/]" if outcome.status == "finished" else f"[red]{outcome.status}[/]"
        reason = "" if outcome.status == "finished" else f": {outcome.reason}"
        moved = f" (previous attempt kept as {outcome.moved_aside.name})" if outcome.moved_aside else ""
        self.console.print(f"{mark} {outcome.run.name} in {outcome.wall_s:.0f} s{reason}{moved}",
                           markup=True, highlight=False)


# --------------------------------------------------------------------------- commands

@experiment_app.command("run")
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML, e.g. configs/experiments/tier-mix.yaml.")],
    only: Annotated[Optional[list[str]], typer.Option(
        "--only", help="Only runs whose name (<label>-seed<seed>) or label matches this shell pattern, e.g. "
        "'0-1-1*' or '*-seed1'; repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and the commands; run and write "
                                          "nothing.")] = False,
    logs_dir: Annotated[Path, typer.Option("--logs-dir", help="Parent of the experiment directory: runs go to "
                                           "<logs-dir>/<experiment name>/<run>/.")] = Path("logs"),
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the report into the experiment "
                                         "directory when the matrix is done.")] = True,
) -> None:
    """Run every (configuration, seed) of an experiment, one at a time; resumable.

    Finished runs are skipped; an unfinished run directory is moved aside to <run>.failed-<n> and the
    run starts afresh. A configuration with `reuse: OTHER` copies experiment OTHER's finished runs
    (same --logs-dir) when they were made exactly alike, instead of running them. A failed run is
    recorded in runs.jsonl and the matrix goes on; the command exits 1 if any run did not finish
    (rerun it to retry those).
    """
    from hetero_testnet.experiments.spec import load_experiment
    from hetero_testnet.experiments.runner import ExperimentRunner

    console = Console(highlight=False)
    spec = load_experiment(file)
    runner = ExperimentRunner(spec, logs_dir, tuple(only or ()))
    if dry_run:
        _, _, actions = runner.prepare()
        _render_plan(console, runner, actions)
        return
    console.print(f"experiment {spec.name}: logs in {runner.experiment_dir}/")
    with RichRunnerView(console) as view:
        runner.observer = view
        outcomes = runner.run()
    not_finished = [o for o in outcomes if o.status not in ("finished", "skipped", "reused")]
    if report:
        _report_after_run(console, runner.experiment_dir)
    if not_finished:
        names = ", ".join(o.run.name for o in not_finished)
        raise RunFailedError(f"{len(not_finished)} of {len(outcomes)} runs did not finish: {names}",
                             hint=f"see {runner.experiment_dir / 'runs.jsonl'}; rerun the same command to retry "
                                  "them (finished runs are skipped)")


@experiment_app.command("report")
def report_cmd(
    directory: Annotated[Path, typer.Argument(help="An experiment's logs directory, e.g. logs/tier-mix.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write results.* and plots "
                                                "(default: DIRECTORY).")] = None,
    last_k: Annotated[Optional[int], typer.Option("--last-k", help="Final train loss = mean over the last K "
                                                  "committed steps (default: the experiment's, else 8).")] = None,
    grad_norm_threshold: Annotated[Optional[float], typer.Option(
        "--grad-norm-threshold", help="Pre-clip gradient norm counted as an explosion (default: the "
        "experiment's, else 10).")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Configuration label differences are "
                                                    "taken against (default: the experiment's, else the "
                                                    "first).")] = None,
    references: Annotated[bool, typer.Option("--references/--no-references", help="Compute the reference lines "
                                             "(unigram, bigram, untrained model) from the runs' config and data.")]
        = True,
) -> None:
    """Write results.md, results.csv, results.json and the plots (val_loss, train_loss, val_loss_diff,
    time_to_loss, and primary_diff for a pre-registered analysis)."""
    from hetero_testnet.experiments.report import build_report
    from hetero_testnet.experiments.export import write_report

    if last_k is not None and last_k < 1:
        raise ConfigError(f"--last-k must be >= 1 (got {last_k})")
    if grad_norm_threshold is not None and grad_norm_threshold <= 0:
        raise ConfigError(f"--grad-norm-threshold must be > 0 (got {grad_norm_threshold:g})")
    console = Console(highlight=False)
    rep = build_report(directory, last_k=last_k, grad_norm_threshold=grad_norm_threshold, baseline=baseline,
                       references=references)
    paths = write_report(rep, out or directory)
    _render_headline(console, rep)
    console.print("wrote " + ", ".join(str(p) for p in paths))


# --------------------------------------------------------------------------- rendering

def _render_plan(console: Console, runner, actions) -> None:
    table = Table(title=f"experiment {runner.spec.name}: {len(actions)} run(s) in {runner.experiment_dir}/")
    for col in ("run", "tiers", "helper fractions", "sync", "seed", "steps", "action"):
        table.add_column(col)
    for a in actions:
        r = a.run
        action = a.action + (f" ({a.detail})" if a.detail else "")
        if a.action == "rerun":
            action += ", old directory moved aside"
        table.add_row(r.name, ",".join(map(str, r.tiers)), ",".join(f"{f:g}" for f in r.helper_fractions), r.sync,
                      str(r.seed), str(r.steps), action)
    console.print(table)
    spec = runner.spec
    console.print(f"base config {spec.base_config} -> {runner.experiment_dir / 'experiment-config.yaml'} "
                  f"(total_steps={spec.steps}"
                  f"{'' if spec.eval_every is None else f', eval_every={spec.eval_every}'}, lr_schedule unchanged)")
    for cmd in runner.commands(actions):
        console.print(shlex.join(cmd), soft_wrap=True)


def _render_headline(console: Console, rep) -> None:
    from hetero_testnet.experiments.format import fmt, fmt_ci, fmt_p

    table = Table(title=f"{rep.experiment.get('name', '')}: final validation loss, full model "
                        f"(mean ± 95% CI over seeds)")
    for col in ("configuration", "sync", "n", "val loss tier 0", f"Δ vs {rep.baseline}", "p (Welch)", "p (Holm)"):
        table.add_column(col)
    comps = rep.comparisons.get("val_loss_tier0", {})
    for c in rep.configs:
        cp = comps.get(c.label)
        table.add_row(c.label, c.sync, str(len(c.finished)), fmt_ci(c.stat("val_loss_tier0")),
                      fmt(cp.diff, signed=True) if cp else "—", fmt_p(cp.p) if cp else "—",
                      fmt_p(rep.holm("val_loss_tier0", c.label)) if cp else "—")
    console.print(table)
    refs = rep.references
    if refs.available:
        console.print("reference lines (same validation tokens): " + ", ".join(f"{label} {v:.4f}"
                                                                              for label, v in refs.lines()))
    if rep.analysis is not None:
        console.print(f"pre-registered verdict: {rep.analysis.verdict} ({rep.analysis.verdict_reason})")


def _report_after_run(console: Console, experiment_dir: Path) -> None:
    from hetero_testnet.experiments.report import build_report
    from hetero_testnet.experiments.export import write_report

    try:
        rep = build_report(experiment_dir)
    except ConfigError as e:
        console.print(f"no report: {e}")
        return
    paths = write_report(rep, experiment_dir)
    _render_headline(console, rep)
    console.print(f"report: {paths[0]}")

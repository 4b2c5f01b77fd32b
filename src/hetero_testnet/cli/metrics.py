"""`testnet export-metrics`, and the W&B stream behind `testnet start --wandb-project`.

Both turn `events.jsonl` into scalars through `metrics.mapping` (the one mapping), so a finished run
replayed and a run streamed live give the same metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hetero_testnet.cli.options import check_choice
from hetero_testnet.errors import ConfigError
from hetero_testnet.rundir import RunDir

TARGETS = ("tensorboard", "wandb")
WandbProjectOption = Annotated[Optional[str], typer.Option(
    "--wandb-project", help="Stream the run's metrics to this W&B project (offline without an API key; "
    "needs pip install 'hetero-testnet[wandb]').")]
WandbGroupOption = Annotated[Optional[str], typer.Option("--wandb-group", help="W&B run group.")]
WandbEntityOption = Annotated[Optional[str], typer.Option("--wandb-entity", help="W&B entity (user or team).")]


def start_wandb_stream(run_dir: Path, *, project: str, group: str | None, entity: str | None,
                       config: dict[str, Any]):
    """A started follower streaming `run_dir`'s events to a W&B run named after it (files in `run_dir`)."""
    from hetero_testnet.metrics.follow import EventFollower
    from hetero_testnet.metrics.sinks import WandbSink, require_wandb

    require_wandb()  # a missing package is bad input, reported before anything starts

    def make_sink() -> WandbSink:
        return WandbSink(project=project, group=group, entity=entity, name=run_dir.name, directory=run_dir,
                         config=config)

    follower = EventFollower(RunDir(run_dir).events, make_sink)
    follower.start()
    return follower


def finish_stream(follower) -> None:
    """Stop a follower after the run; a failure is one warning line (the run's result stands)."""
    follower.stop()
    if follower.error is not None:
        print(f"warning: W&B stream failed: {type(follower.error).__name__}: {follower.error}", file=sys.stderr)
    elif follower.is_alive():
        print("warning: W&B stream still busy; its last metrics may be missing", file=sys.stderr)


def export_metrics(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (logs/<name>) with events.jsonl.")],
    to: Annotated[str, typer.Option("--to", help="tensorboard | wandb.")] = "tensorboard",
    out: Annotated[Optional[Path], typer.Option(help="tensorboard: event-file directory (default "
                                                "RUN_DIR/tensorboard); wandb: where the W&B files go "
                                                "(default RUN_DIR).")] = None,
    wandb_project: Annotated[str, typer.Option("--wandb-project", help="wandb: the project.")] = "hetero-testnet",
    wandb_group: WandbGroupOption = None,
    wandb_entity: WandbEntityOption = None,
) -> None:
    """Turn a run's events.jsonl into TensorBoard scalars or a W&B run (offline without an API key)."""
    from hetero_testnet.metrics.follow import replay
    from hetero_testnet.metrics.sinks import TensorBoardSink, WandbSink

    check_choice(to, TARGETS, "--to")
    events = RunDir(run_dir).events
    if not events.is_file():
        raise ConfigError(f"{run_dir} has no events.jsonl (is it a run directory, logs/<name>?)")
    if to == "tensorboard":
        target = out or run_dir / "tensorboard"
        count, _ = replay(events, lambda _config: TensorBoardSink(target))
        print(f"scalars={count} to=tensorboard logdir={target} (tensorboard --logdir {target})")
        return
    count, sink = replay(events, lambda config: WandbSink(project=wandb_project, group=wandb_group,
                                                          entity=wandb_entity, name=run_dir.name,
                                                          directory=out or run_dir, config=config))
    print(f"scalars={count} to=wandb mode={sink.mode} run_dir={sink.run_dir}")


def register(app: typer.Typer) -> None:
    app.command("export-metrics")(export_metrics)

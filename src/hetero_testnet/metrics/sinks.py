"""Where scalars go: TensorBoard event files or a W&B run, each library imported only when asked for.

A missing library is a `ConfigError` (one line, exit 2) naming the install command. W&B runs offline
when no API key is configured (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc) or WANDB_MODE says
so; `wandb sync <dir>` uploads an offline run later.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from hetero_testnet.errors import ConfigError
from hetero_testnet.metrics.mapping import Scalar

TENSORBOARD_INSTALL = "pip install 'hetero-testnet[tensorboard]'"
WANDB_INSTALL = "pip install 'hetero-testnet[wandb]'"


class MetricSink(Protocol):
    def write(self, scalars: Sequence[Scalar]) -> None: ...
    def close(self) -> None: ...


def require_tensorboard() -> None:
    """Raise ConfigError (with the install command) unless TensorBoard logging can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ConfigError(f"TensorBoard export needs the tensorboard package: {TENSORBOARD_INSTALL}") from e


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"W&B export needs the wandb package: {WANDB_INSTALL}") from e


class TensorBoardSink:
    """Scalars as TensorBoard event files in `logdir` (torch's `SummaryWriter`), at the event's wall time."""

    def __init__(self, logdir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))

    def write(self, scalars: Sequence[Scalar]) -> None:
        for s in scalars:
            self.writer.add_scalar(s.tag, s.value, global_step=s.step, walltime=s.ts)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE if set; else online with an API key (environment or ~/.netrc), offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbSink:
    """One W&B run; `log` per x-axis step (W&B needs steps that never go back: the mapping's never do)."""

    def __init__(self, *, project: str, directory: Path, name: str | None = None, group: str | None = None,
                 entity: str | None = None, config: dict[str, Any] | None = None) -> None:
        require_wandb()
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        self.run = wandb.init(project=project, group=group, entity=entity, name=name, dir=str(directory),
                              config=config or {}, mode=self.mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.last_step = -1

    def write(self, scalars: Sequence[Scalar]) -> None:
        batch: dict[str, float] = {}
        step = None
        for s in scalars:
            x = max(s.step, self.last_step)
            if step is not None and x != step:
                self.run.log(batch, step=step)
                batch = {}
            step = x
            batch[s.tag] = s.value
        if batch:
            self.run.log(batch, step=step)
            self.last_step = step

    def close(self) -> None:
        """Finish the run and stop W&B's service: `finish` alone returned before the service had
        written every history record of an offline run (6-18 of 40 missing on a loaded machine)."""
        import wandb

        self.run.finish()
        wandb.teardown()

    @property
    def run_dir(self) -> Path:
        """The W&B run's own folder (`<directory>/wandb/offline-run-*` when offline)."""
        return Path(self.run.dir).parent

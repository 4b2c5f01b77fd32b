"""Reference lines of a report: the unigram and bigram validation loss, and the untrained model's.

A validation loss means little alone: 6.95 nats is "learned nothing but token frequencies" on one
corpus and excellent on another. Every report therefore prints, on the same validation tokens its
runs were scored on (the first `validation.num_samples` samples of the validation split, exactly as
`model.train.evaluate` reads them):

- *unigram*: add-k token frequencies of the training split (`data/ngram.py`; k fitted on the training
  split); a model at or above it has learned nothing a frequency table does not know;
- *bigram*: the interpolated bigram of the training split; a model below it uses more than one token
  of context;
- *untrained*: the model of the run config at initialisation (seed: the experiment's first), the
  start of every curve (about ln V).

The config is the experiment's derived config (`experiment-config.yaml`). If its data directory is
gone (a results copy outlives the checkout that ran it), the bundled dataset of the same folder name
(`data/sample`, `data/pd8k`) is used and the report says so. Values are rounded (1e-6; the untrained loss, a
float32 forward pass, to 1e-4) so that a report regenerates byte for byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetero_testnet import data as data_package
from hetero_testnet.config import RunConfig, load_run_config
from hetero_testnet.errors import HeteroTestnetError

BUNDLED_DATA_DIR = Path(data_package.__file__).resolve().parent
DIGITS = 6
UNTRAINED_DIGITS = 4
"""The untrained loss is a float32 forward pass whose last bits may follow the thread count."""
EVAL_BATCH = 8


@dataclass(frozen=True, slots=True)
class References:
    unigram: float | None = None
    bigram: float | None = None
    untrained: float | None = None
    untrained_seed: int | None = None
    unigram_k: float | None = None
    bigram_lambda: float | None = None
    train_tokens: int | None = None
    val_targets: int | None = None
    data_dir: str | None = None
    note: str | None = None
    """How the data was found, when not where the config says."""
    reason: str | None = None
    """Why there are no references (no config, no data), when there are none."""

    @property
    def available(self) -> bool:
        return self.unigram is not None

    def lines(self) -> list[tuple[str, float]]:
        """(label, loss) of every reference there is, for plots and tables."""
        out = [("unigram", self.unigram), ("bigram", self.bigram),
               (f"untrained (seed {self.untrained_seed})", self.untrained)]
        return [(label, v) for label, v in out if v is not None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_data(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """The config, pointed at the bundled dataset of the same name when its own directory is gone."""
    if cfg.data.train_dir.is_dir() and cfg.data.resolved_val_dir.is_dir():
        return cfg, None
    bundled = BUNDLED_DATA_DIR / cfg.data.train_dir.name
    if not bundled.is_dir():
        return cfg, None
    note = (f"the runs' data directory {cfg.data.train_dir} is not on this machine; references use the bundled "
            f"data/{bundled.name} of the same name")
    return cfg.with_data_dir(bundled), note


def compute_references(cfg: RunConfig, seed: int | None, *, untrained: bool = True) -> References:
    """Unigram, bigram and (unless `untrained` is False or seed is None) untrained-model loss."""
    from hetero_testnet.data.ngram import ngram_reference
    from hetero_testnet.data.shards import open_split

    cfg, note = _resolve_data(cfg)
    m = cfg.model
    try:
        train = open_split(cfg.data, "train", m.max_seq_len, m.vocab_size)
        val = open_split(cfg.data, "val", m.max_seq_len, m.vocab_size)
    except HeteroTestnetError as e:
        return References(reason=f"no reference lines: {e}")
    samples = cfg.data.val_samples
    ref = ngram_reference(train.shards.read(0, train.num_tokens), val.batch(0, samples).numpy(), m.vocab_size)
    loss0 = _untrained_loss(cfg, val, seed) if untrained and seed is not None else None
    return References(unigram=round(ref.unigram_loss, DIGITS), bigram=round(ref.bigram_loss, DIGITS),
                      untrained=None if loss0 is None else round(loss0, UNTRAINED_DIGITS),
                      untrained_seed=seed if loss0 is not None else None, unigram_k=round(ref.unigram_k, DIGITS),
                      bigram_lambda=ref.bigram_lambda, train_tokens=ref.train_tokens, val_targets=ref.targets,
                      data_dir=_shown(cfg.data.train_dir), note=note)


def _shown(directory: Path) -> str:
    """A bundled dataset as `data/<name>` (the same in every checkout), any other directory as is."""
    try:
        return f"data/{Path(directory).resolve().relative_to(BUNDLED_DATA_DIR)}"
    except ValueError:
        return str(directory)


def _untrained_loss(cfg: RunConfig, val: Any, seed: int) -> float:
    from hetero_testnet.model.nanogpt import build_model
    from hetero_testnet.model.train import evaluate

    model = build_model(cfg.model, seed)
    return evaluate(model, val, None, cfg.data.val_samples, EVAL_BATCH)


def experiment_references(experiment_dir: Path, manifest: dict[str, Any], *, untrained: bool = True) -> References:
    """References of an experiment directory, from the derived config its manifest names."""
    name = manifest.get("derived_config") or "experiment-config.yaml"
    path = Path(experiment_dir) / name
    if not path.is_file():
        return References(reason=f"no reference lines: {path.name} (the experiment's run config) is missing")
    try:
        cfg = load_run_config(path)
    except HeteroTestnetError as e:
        return References(reason=f"no reference lines: {e}")
    seeds = sorted(s for s in manifest.get("seeds") or [] if isinstance(s, int))
    return compute_references(cfg, seeds[0] if seeds else cfg.seed, untrained=untrained)

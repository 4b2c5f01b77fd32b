"""Token shards on disk and the fixed sample indexing every client agrees on.

A data directory holds `*.bin` shards read in name order. Two formats are accepted, so that the
public fineweb10B GPT-2 shards work unchanged next to ours (`testnet data prepare`):

- modded-nanogpt / llm.c: a header of 256 little-endian int32 (`[0] = 20240520` magic,
  `[1] = 1` version, `[2]` = token count, the rest 0), then uint16 little-endian token ids;
- raw: a file whose first int32 is not the magic is nothing but uint16 little-endian token ids;
- either of them compressed with xz (`*.xz`, what `testnet data prepare --recipe pd8k` writes to keep
  the repository small): read whole into memory once per process and otherwise the same.

Vocabulary used below:
- a *token stream* is the tokens of all shards of a split, concatenated in name order. A sample may
  span a shard boundary; shards are not separate documents here (each document already starts with
  `<|endoftext|>`), and indexing then depends only on the stream, not on how it was cut into files.
- *sample j* at sequence length L is stream tokens `[j*L, j*L + L]`: L + 1 tokens, inputs and the
  targets shifted by one. Consecutive samples share exactly one token; nothing is shuffled, so every
  client computes the same sample from the same j. There are `(num_tokens - 1) // L` samples; the
  tail that does not fill a sample is never read.
- sample ids *wrap*: id j reads sample `j % num_samples`, so a run that consumes more samples than the
  data holds cycles over it again from the start (epochs), instead of failing. With a data seed
  (`data/order.py`, the training split of a run) id j reads the stored sample that the seeded
  permutation of its epoch puts at position `j % num_samples`.

Uncompressed tokens are memory-mapped, never read whole. Each shard is validated once when opened (header, size,
largest id: one pass of numpy over the map), so bad data fails at start-up with a `DataError` naming
the file and the position, never in the middle of a run.
"""

from __future__ import annotations

import functools
import lzma
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hetero_testnet.config import DataConfig
from hetero_testnet.data.order import SampleOrder
from hetero_testnet.errors import DataError

MAGIC = 20240520
"""First int32 of a modded-nanogpt / llm.c shard."""
VERSION = 1
"""Header version for uint16 GPT-2 tokens (llm.c's version 2 holds uint32 LLaMA-3 tokens)."""
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKENS_PER_SHARD = 2**31 - 1
"""The header stores the token count as an int32."""
_CHUNK = 1 << 24
"""Tokens per numpy pass when scanning a shard (bounds temporary memory to tens of MB)."""

# Where each split's settings live in a config file, for messages that say what to change.
_SPLIT_KEYS = {
    "train": ("model.LLM.data_location", "model.LLM.train_pattern"),
    "val": ("validation.data_location", "validation.pattern"),
}


# --------------------------------------------------------------------------- one shard

@dataclass(frozen=True, slots=True)
class ShardInfo:
    """Layout of one shard file, read from its header and size (no tokens read)."""

    path: Path
    format: Literal["header", "raw"]
    num_tokens: int
    offset_bytes: int
    """Where the tokens start: 1024 for a header shard, 0 for a raw one."""
    size_bytes: int
    """Bytes of the shard's contents (after decompression, for a compressed shard)."""
    compression: Literal["xz"] | None = None
    file_bytes: int | None = None
    """Size of the file on disk when compressed."""


COMPRESSED_SUFFIX = ".xz"
XZ_PRESET = 9 | lzma.PRESET_EXTREME


@functools.lru_cache(maxsize=8)
def _decompressed(path: str, mtime_ns: int, size: int) -> bytes:
    """A compressed shard's contents, once per process (keyed by the file's identity on disk)."""
    try:
        with open(path, "rb") as f:
            return lzma.decompress(f.read(), format=lzma.FORMAT_XZ)
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise DataError(f"cannot decompress shard {path}: {e}; the file is damaged or not xz") from e


def _contents(path: Path) -> bytes:
    st = path.stat()
    return _decompressed(str(path), st.st_mtime_ns, st.st_size)


def read_shard_info(path: Path) -> ShardInfo:
    """Check a shard's header against its size; `DataError` says what is wrong with which file."""
    path = Path(path)
    compressed = path.name.endswith(COMPRESSED_SUFFIX)
    try:
        file_bytes = path.stat().st_size
        if compressed:
            body_bytes = _contents(path)
            size, head = len(body_bytes), body_bytes[:HEADER_BYTES]
        else:
            size = file_bytes
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror or e}") from e
    info = _layout(path, size, head)
    if compressed:
        return ShardInfo(info.path, info.format, info.num_tokens, info.offset_bytes, size, "xz", file_bytes)
    return info


def _layout(path: Path, size: int, head: bytes) -> ShardInfo:
    """The format and token count of a shard of `size` bytes starting with `head`."""
    if len(head) >= 4 and int(np.frombuffer(head[:4], "<i4")[0]) == MAGIC:
        if len(head) < HEADER_BYTES:
            raise DataError(f"shard {path} starts with the shard magic {MAGIC} but is only {size} bytes, "
                            f"shorter than the {HEADER_BYTES}-byte header; the file is truncated")
        header = np.frombuffer(head, "<i4")
        version, count = int(header[1]), int(header[2])
        if version != VERSION:
            raise DataError(f"shard {path} has header version {version}, but only version {VERSION} "
                            "(uint16 GPT-2 tokens) is supported; re-tokenize it with `testnet data prepare` "
                            "or convert it to uint16 GPT-2 tokens")
        body = size - HEADER_BYTES
        if count < 0 or body != 2 * count:
            raise DataError(f"shard {path}: header says {count} tokens ({2 * count} bytes) but {body} bytes "
                            f"follow the {HEADER_BYTES}-byte header; the file is truncated or not a shard")
        return ShardInfo(path, "header", count, HEADER_BYTES, size)
    if size % 2:
        raise DataError(f"shard {path} has no shard header and an odd size ({size} bytes), so it is not raw "
                        "uint16 tokens either; remove it or fix the pattern that selects it")
    return ShardInfo(path, "raw", size // 2, 0, size)


def map_tokens(info: ShardInfo) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memory map (an empty array for an empty shard)."""
    if info.num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    if info.compression is not None:
        return np.frombuffer(_contents(info.path), dtype=TOKEN_DTYPE, count=info.num_tokens,
                             offset=info.offset_bytes)
    try:
        return np.memmap(info.path, dtype=TOKEN_DTYPE, mode="r", offset=info.offset_bytes,
                         shape=(info.num_tokens,))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot memory-map shard {info.path}: {e}") from e


def _scan(tokens: np.ndarray) -> tuple[int, int]:
    """(min id, max id) of a non-empty token array, in bounded chunks."""
    lo, hi = 65535, 0
    for start in range(0, len(tokens), _CHUNK):
        chunk = tokens[start:start + _CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


def _first_at_least(tokens: np.ndarray, bound: int) -> int:
    """Index of the first token >= bound (the caller knows there is one)."""
    for start in range(0, len(tokens), _CHUNK):
        hits = np.flatnonzero(tokens[start:start + _CHUNK] >= bound)
        if len(hits):
            return start + int(hits[0])
    raise ValueError("no token >= bound")


def describe_shard(path: Path, document_start: int = 50256) -> dict[str, Any]:
    """Facts about one shard for `testnet data inspect`: format, sizes, id range, and the document
    count (tokens equal to `document_start`: GPT-2's `<|endoftext|>` unless the data's manifest says)."""
    info = read_shard_info(Path(path))
    tokens = map_tokens(info)
    lo, hi = _scan(tokens) if info.num_tokens else (None, None)
    eot = sum(int(np.count_nonzero(tokens[s:s + _CHUNK] == document_start)) for s in range(0, len(tokens), _CHUNK))
    return {
        "path": str(info.path),
        "format": info.format + (f"+{info.compression}" if info.compression else ""),
        "version": VERSION if info.format == "header" else None,
        "num_tokens": info.num_tokens,
        "size_bytes": info.file_bytes if info.compression else info.size_bytes,
        "header_bytes": info.offset_bytes,
        "min_id": lo,
        "max_id": hi,
        "eot_count": eot,
    }


def write_shard(path: Path, tokens: np.ndarray | Sequence[int]) -> Path:
    """Write tokens as a header shard, atomically (a temporary file in the same directory, renamed);
    xz-compressed when the name ends with `.xz` (deterministic: one preset, no timestamps in xz)."""
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be 1-D (got shape {array.shape})")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 65535):
        raise ValueError("tokens must be integers in [0, 65535] to fit uint16")
    if array.size > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"a shard holds at most {MAX_TOKENS_PER_SHARD} tokens (got {array.size})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, array.size
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        contents = header.tobytes() + array.astype(TOKEN_DTYPE, copy=False).tobytes()
        if path.name.endswith(COMPRESSED_SUFFIX):
            contents = lzma.compress(contents, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
        with open(tmp, "wb") as f:
            f.write(contents)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write shard {path}: {e.strerror or e}") from e
    return path


# --------------------------------------------------------------------------- many shards

def list_shards(directory: Path, pattern: str) -> list[Path]:
    """Files in `directory` matching the glob `pattern`, in name order; `DataError` if there are none."""
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"data directory {directory} does not exist; point the config's data_location at "
                        "a directory of shards or create one with `testnet data prepare --out DIR`")
    if not directory.is_dir():
        raise DataError(f"data path {directory} is not a directory; data_location must name the "
                        "directory that holds the shards")
    shards = sorted((p for p in directory.glob(pattern) if p.is_file()), key=lambda p: p.name)
    if not shards:
        others = sum(1 for p in directory.iterdir() if p.is_file())
        raise DataError(f"no shards matching {pattern!r} in {directory} ({others} other files); "
                        "change the pattern or run `testnet data prepare`")
    return shards


class TokenShards:
    """Several shards read as one token stream (name order), each validated when opened.

    `vocab_size`, if given, is checked here: the first id >= vocab_size is reported with its shard
    and position. `max_id` is kept so a later check against another vocabulary costs nothing.
    """

    def __init__(self, paths: Sequence[Path], vocab_size: int | None = None) -> None:
        if not paths:
            raise DataError("no shards given")
        self.infos = [read_shard_info(Path(p)) for p in paths]
        self._maps = [map_tokens(info) for info in self.infos]
        self._max_ids = [(_scan(m)[1] if len(m) else -1) for m in self._maps]
        counts = [info.num_tokens for info in self.infos]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_tokens = int(self._starts[-1])
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    @property
    def paths(self) -> list[Path]:
        return [info.path for info in self.infos]

    @property
    def max_id(self) -> int:
        return max(self._max_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """`DataError` naming the first token id >= vocab_size (shard, position), if any."""
        for info, tokens, hi in zip(self.infos, self._maps, self._max_ids):
            if hi >= vocab_size:
                pos = _first_at_least(tokens, vocab_size)
                raise DataError(f"shard {info.path}: token id {int(tokens[pos])} at position {pos} is >= "
                                f"vocab_size {vocab_size}; the shard was made with a larger vocabulary (GPT-2's is "
                                "50257): use the config that matches the data, or raise "
                                "model.LLM.architecture_config.vocab_size")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop) as a new uint16 array, crossing shard boundaries as needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=TOKEN_DTYPE)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            begin, end = int(self._starts[shard]), int(self._starts[shard + 1])
            take = min(stop, end) - pos
            if take > 0:
                out[pos - start:pos - start + take] = self._maps[shard][pos - begin:pos - begin + take]
                pos += take
            shard += 1
        return out


class SampleDataset:
    """Fixed-length samples of a token stream: sample j is tokens [j*L, j*L + L] (see module doc),
    read in the order of `data_seed` (`data/order.py`; None: stored order)."""

    def __init__(self, shards: TokenShards | Sequence[Path], seq_len: int, vocab_size: int,
                 data_seed: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
        self.shards = shards if isinstance(shards, TokenShards) else TokenShards(shards)
        self.shards.check_vocab(vocab_size)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_tokens = self.shards.num_tokens
        if self.num_tokens < seq_len + 1:
            where = ", ".join(str(p) for p in self.shards.paths[:3]) + (" ..." if len(self.shards.paths) > 3 else "")
            raise DataError(f"{where} hold {self.num_tokens} tokens, fewer than one sample of max_seq_len + 1 = "
                            f"{seq_len + 1}; lower model.LLM.max_seq_len or add data")
        self.num_samples = (self.num_tokens - 1) // seq_len
        self.order = SampleOrder(self.num_samples, data_seed)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, j: int) -> torch.Tensor:
        """The stored sample that id `j` reads (`j % num_samples` without a data seed) as int64 ids,
        shape (seq_len + 1,)."""
        start = self.order.stored(j) * self.seq_len
        return torch.from_numpy(self.shards.read(start, start + self.seq_len + 1).astype(np.int64))

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Samples start, start+1, ..., start+count-1 (each modulo num_samples), shape (count, seq_len + 1)."""
        if start < 0 or count < 0:
            raise IndexError(f"batch start and count must be >= 0 (got {start}, {count})")
        out = torch.empty((count, self.seq_len + 1), dtype=torch.long)  # (B, L+1)
        for row in range(count):
            out[row] = self.sample(start + row)
        return out


def open_split(data: DataConfig, split: Literal["train", "val"], seq_len: int, vocab_size: int,
               data_seed: int | None = None) -> SampleDataset:
    """The training or validation samples a config names, validated (`DataError` on any problem),
    read in the order of `data_seed` (training: the run's `RunConfig.data_order_seed`)."""
    if split == "train":
        directory, pattern = data.train_dir, data.train_pattern
    elif split == "val":
        directory, pattern = data.resolved_val_dir, data.val_pattern
    else:
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    location_key, pattern_key = _SPLIT_KEYS[split]
    try:
        paths = list_shards(directory, pattern)
    except DataError as e:
        raise DataError(f"{split} data: {e} (config: {location_key}, {pattern_key})") from e
    return SampleDataset(TokenShards(paths, vocab_size), seq_len, vocab_size, data_seed)

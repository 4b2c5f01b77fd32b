"""What data a run trains on, as a manifest another machine can check its own copy against.

A client on another machine reads its shards from its own disk (a shared path, `--data-dir`, or
shards the head shipped): nothing in the control plane would notice a different copy, and a
different copy silently trains a different model, so replicas would only diverge much later.
`manifest_for` lists the shards a config names (each split's file names, sizes and SHA-256) on the
head; `verify_copy` recomputes them where the client runs and raises one `DataError` line naming
the first file that differs. Both read every byte once (SHA-256 at disk speed: about 1 s per GB).

The manifest is plain JSON data (`to_dict` / `from_dict`), so it travels to a Ray actor as an
ordinary argument, never as pickled objects of this package.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from hetero_testnet.errors import DataError
from hetero_testnet.rundir import sha256_file

if TYPE_CHECKING:  # not imported at run time: a Ray actor imports this module, and should not load torch
    from hetero_testnet.config import DataConfig

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DataManifest:
    """The shards of both splits as the head sees them: where, which glob, and each file's hash."""

    dirs: dict[str, str]
    """split -> the directory on the head (absolute)."""
    patterns: dict[str, str]
    """split -> the glob selecting its shards."""
    files: dict[str, tuple[ShardEntry, ...]]
    """split -> its shards in name order."""

    @property
    def digest(self) -> str:
        """One SHA-256 over every split's (name, size, sha256): equal digests, equal data."""
        h = hashlib.sha256()
        for split in SPLITS:
            for e in self.files[split]:
                h.update(f"{split}\0{e.name}\0{e.size}\0{e.sha256}\n".encode())
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for split in SPLITS for e in self.files[split])

    def to_dict(self) -> dict[str, Any]:
        return {"dirs": dict(self.dirs), "patterns": dict(self.patterns),
                "files": {s: [[e.name, e.size, e.sha256] for e in self.files[s]] for s in SPLITS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataManifest":
        """The manifest `to_dict` wrote; DataError if it is not one."""
        try:
            return cls(dirs={s: str(d["dirs"][s]) for s in SPLITS}, patterns={s: str(d["patterns"][s]) for s in SPLITS},
                       files={s: tuple(ShardEntry(str(n), int(z), str(h)) for n, z, h in d["files"][s])
                              for s in SPLITS})
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed data manifest ({e})") from None


def _entries(directory: Path, pattern: str) -> tuple[ShardEntry, ...]:
    """The shards `pattern` selects in `directory`, in name order (the order `data/shards.py` reads)."""
    return tuple(ShardEntry(p.name, p.stat().st_size, sha256_file(p))
                 for p in sorted((p for p in directory.glob(pattern) if p.is_file()), key=lambda p: p.name))


def manifest_for(data: DataConfig) -> DataManifest:
    """The manifest of the shards `data` names on this machine; DataError if a split has none (the
    planner has opened both splits already, so this is a safety net)."""
    dirs = {"train": Path(data.train_dir).resolve(), "val": Path(data.resolved_val_dir).resolve()}
    patterns = {"train": data.train_pattern, "val": data.val_pattern}
    files = {s: _entries(dirs[s], patterns[s]) for s in SPLITS}
    for split in SPLITS:
        if not files[split]:
            raise DataError(f"{split} data: no shards matching {patterns[split]!r} in {dirs[split]}")
    return DataManifest(dirs={s: str(dirs[s]) for s in SPLITS}, patterns=patterns, files=files)


def verify_copy(manifest: DataManifest, data_dir: Path | None = None) -> None:
    """Check that this machine holds the manifest's shards: in `data_dir` (both splits, as the client's
    `--data-dir` reads them), else at the head's paths. Raises DataError (one line) naming the
    first missing or different file, with the fix."""
    fix = "copy the head's shards there, pass --data-dir, or --ship-data"
    for split in SPLITS:
        directory = Path(data_dir) if data_dir is not None else Path(manifest.dirs[split])
        if not directory.is_dir():
            raise DataError(f"{split} data: {directory} does not exist on this node; {fix}")
        try:
            local = {e.name: e for e in _entries(directory, manifest.patterns[split])}
        except OSError as e:
            raise DataError(f"{split} data on this node: cannot read {e.filename}: {e.strerror}; {fix}") from None
        want = {e.name: e for e in manifest.files[split]}
        for name in sorted(set(want) | set(local)):
            mine, theirs = local.get(name), want.get(name)
            if mine is None or theirs is None:
                where = "on the head only" if mine is None else "on this node only"
                raise DataError(f"{split} shard {name} is {where} (in {directory}); {fix}")
            if (mine.size, mine.sha256) != (theirs.size, theirs.sha256):
                raise DataError(f"{split} shard {directory / name} differs from the head's (sha256 "
                                f"{mine.sha256[:12]} vs {theirs.sha256[:12]}); {fix}")


def check_shippable(manifest: DataManifest) -> None:
    """`--ship-data` puts both splits into one directory on the client's node (its `--data-dir`):
    DataError when two splits hold files of one name, or one split's glob would pick up the other's."""
    names = [e.name for split in SPLITS for e in manifest.files[split]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--ship-data: the train and val splits both hold a shard named {twice[0]}; "
                        "rename one, or use a shared path or --data-dir instead")
    for split, other in (("train", "val"), ("val", "train")):
        stray = [e.name for e in manifest.files[other] if fnmatch.fnmatchcase(e.name, manifest.patterns[split])]
        if stray:
            raise DataError(f"--ship-data: the {split} pattern {manifest.patterns[split]!r} also matches {other} "
                            f"shard {stray[0]}; use a shared path or --data-dir instead")


def shipped_files(manifest: DataManifest) -> dict[str, bytes]:
    """Every shard's bytes by file name, read on the head for `--ship-data` (`check_shippable` first)."""
    check_shippable(manifest)
    return {e.name: (Path(manifest.dirs[split]) / e.name).read_bytes()
            for split in SPLITS for e in manifest.files[split]}


def write_shipped(manifest: DataManifest, files: dict[str, bytes], cache: Path) -> Path:
    """Put shipped shards into `cache/<digest>/` on this node (kept: a restarted client reuses them) and
    check them; returns the directory. DataError if what arrived differs from the manifest."""
    target = cache / manifest.digest[:32]
    if not target.is_dir():
        staging = cache / f".{target.name}.{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            if Path(name).name != name:
                raise DataError(f"shipped shard name {name!r} is not a plain file name")
            (staging / name).write_bytes(blob)
        try:
            staging.rename(target)
        except OSError:  # another client on this node was first: use its copy (checked below)
            shutil.rmtree(staging, ignore_errors=True)
    verify_copy(manifest, target)
    return target

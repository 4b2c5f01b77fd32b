"""`testnet data prepare` / `inspect` through Typer's CliRunner, and data_prepare's pure helpers.

Network-free: prepare runs with `--sources pydoc` (Python's own pydoc_data.topics).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hetero_testnet.data import shards as data
from hetero_testnet.data import prepare as data_prepare
from hetero_testnet.data import sources as data_sources
from hetero_testnet.cli.data import data_app
from hetero_testnet.errors import DataError

runner = CliRunner(env={"COLUMNS": "200"})  # Rich reads the width from COLUMNS


def run_prepare(out: Path, *extra: str):
    result = runner.invoke(data_app, ["prepare", "--out", str(out), "--sources", "pydoc",
                                      "--train-tokens", "20000", "--val-tokens", "3000", "--val-fraction", "0.2", *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_prepare_pydoc_is_deterministic_and_holds_out_validation(tmp_path: Path) -> None:
    first = run_prepare(tmp_path / "a")
    run_prepare(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "sample_train_000000.bin", "sample_val_000000.bin"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "sample_train_000000.bin" in first.output

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["train_tokens"], manifest["val_tokens"]) == (20000, 3000)
    (source,) = manifest["sources"]
    assert source["name"] == "pydoc" and source["val_documents"] >= 1
    assert source["train_documents"] + source["val_documents"] == source["documents"]

    # the default config patterns find them, and validation text never appears in training
    train = data.TokenShards(data.list_shards(tmp_path / "a", "*_train_*.bin"), vocab_size=50257)
    val = data.TokenShards(data.list_shards(tmp_path / "a", "*_val_*.bin"), vocab_size=50257)
    assert (train.num_tokens, val.num_tokens) == (20000, 3000)
    train_ids, val_ids = train.read(0, train.num_tokens), val.read(0, val.num_tokens)
    assert train_ids[0] == val_ids[0] == 50256
    train_text = "," + ",".join(map(str, train_ids.tolist())) + ","
    val_docs = np.split(val_ids, np.flatnonzero(val_ids == 50256)[1:])
    for doc in val_docs:
        for start in range(0, len(doc) - 16, 250):
            assert "," + ",".join(map(str, doc[start:start + 16].tolist())) + "," not in train_text


def test_prepare_splits_shards_and_removes_stale_ones(tmp_path: Path) -> None:
    run_prepare(tmp_path, "--shard-tokens", "6000", "--prefix", "tiny")
    shards = sorted(p.name for p in tmp_path.glob("tiny_train_*.bin"))
    assert shards == [f"tiny_train_{k:06d}.bin" for k in range(4)]
    split = data.TokenShards([tmp_path / s for s in shards]).read(0, 20000)
    run_prepare(tmp_path, "--prefix", "tiny")
    assert sorted(p.name for p in tmp_path.glob("tiny_train_*.bin")) == ["tiny_train_000000.bin"]
    whole = data.TokenShards([tmp_path / "tiny_train_000000.bin"]).read(0, 20000)
    assert np.array_equal(split, whole)


def test_prepare_rejects_unknown_sources_and_bad_numbers(tmp_path: Path) -> None:
    result = runner.invoke(data_app, ["prepare", "--out", str(tmp_path), "--sources", "pydoc,nope"])
    assert isinstance(result.exception, DataError) and "unknown source nope" in str(result.exception)
    result = runner.invoke(data_app, ["prepare", "--out", str(tmp_path), "--sources", "pydoc",
                                      "--val-fraction", "1.5"])
    assert isinstance(result.exception, DataError) and "--val-fraction" in str(result.exception)


def test_inspect_file_and_directory(tmp_path: Path) -> None:
    run_prepare(tmp_path)
    result = runner.invoke(data_app, ["inspect", str(tmp_path / "sample_train_000000.bin"), "--tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "header" in result.output and "20,000" in result.output and "first 16 tokens" in result.output
    result = runner.invoke(data_app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "sample_val_000000.bin" in result.output and "23,000" in result.output


def test_inspect_raw_file_and_errors(tmp_path: Path) -> None:
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.array([50256, 15496, 995], dtype="<u2").tobytes())
    result = runner.invoke(data_app, ["inspect", str(raw)])
    assert result.exit_code == 0 and "raw" in result.output and "Hello world" in result.output

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\1\2\3")
    result = runner.invoke(data_app, ["inspect", str(odd)])
    assert isinstance(result.exception, DataError) and "odd size" in str(result.exception)
    result = runner.invoke(data_app, ["inspect", str(tmp_path / "missing")])
    assert isinstance(result.exception, DataError) and "does not exist" in str(result.exception)


# --------------------------------------------------------------------------- data_prepare helpers


def test_allocate_shares_evenly_and_redistributes() -> None:
    assert data_prepare.allocate([100, 100, 100], 30) == [10, 10, 10]
    assert data_prepare.allocate([100, 100, 100], 31) == [11, 10, 10]
    assert data_prepare.allocate([5, 100, 100], 31) == [5, 13, 13]
    assert data_prepare.allocate([5, 10, 0], 100) == [5, 10, 0]


def test_split_documents_holds_out_the_tail() -> None:
    assert data_prepare.split_documents(list(range(40)), 0.05) == (list(range(38)), [38, 39])
    assert data_prepare.split_documents(list(range(3)), 0.05) == ([0, 1], [2])
    assert data_prepare.split_documents([0], 0.05) == ([0], [])
    assert data_prepare.split_documents([0, 1], 0.0) == ([0, 1], [])


def test_interleave_spreads_sources_evenly() -> None:
    a = [[1] * 10, [2] * 10]
    b = [[3] * 2, [4] * 2, [5] * 2, [6] * 2]
    stream = data_prepare._interleave([a, b])
    firsts = [int(v) for k, v in enumerate(stream) if k == 0 or stream[k - 1] != v]
    assert firsts == [1, 3, 4, 2, 5, 6]


def test_read_r_strings() -> None:
    def charsxp(s: bytes | None) -> bytes:
        return struct.pack(">ii", 0x40009, -1 if s is None else len(s)) + (s or b"")

    blob = (b"X\n" + struct.pack(">iii", 3, 0x40201, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
            + struct.pack(">ii", 16, 3) + charsxp(b"EMMA") + charsxp(None) + charsxp("café".encode()))
    assert data_sources._read_r_strings(blob) == ["EMMA", "", "café"]
    with pytest.raises(DataError):
        data_sources._read_r_strings(b"A\n" + blob[2:])


def test_dictd_numbers() -> None:
    assert data_sources._dictd_number("A") == 0
    assert data_sources._dictd_number("b") == 27
    assert data_sources._dictd_number("BA") == 64


def test_failed_fetch_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not installed") as info:
        data_sources._run_client(["no-such-registry-client-xyz", "pack"], tmp_path, "demo")
    assert "--sources" in str(info.value)
    failing = [sys.executable, "-c",
               "import sys; print('Reading package lists...'); "
               "print('E: Unable to locate package nope', file=sys.stderr); sys.exit(100)"]
    with pytest.raises(DataError) as info:
        data_sources._run_client(failing, tmp_path, "demo")
    message = str(info.value)
    assert "'demo'" in message and "E: Unable to locate package nope" in message and "\n" not in message

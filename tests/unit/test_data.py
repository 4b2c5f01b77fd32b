"""Shard formats, sample indexing and every bad-data message of `hetero_testnet.data.shards`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero_testnet.data import shards as data
from hetero_testnet.config import DataConfig
from hetero_testnet.errors import ConfigError, DataError

VOCAB = 50257


def header_shard(path: Path, tokens: np.ndarray) -> Path:
    """A fineweb/modded-nanogpt shard written by hand (not by write_shard), to test the reader alone."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def raw_shard(path: Path, tokens: np.ndarray) -> Path:
    path.write_bytes(np.asarray(tokens, dtype="<u2").tobytes())
    return path


def stream(n: int, offset: int = 0) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7 + 11 + offset) % VOCAB


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("make", [header_shard, raw_shard], ids=["header", "raw"])
def test_sample_j_is_tokens_jL_to_jL_plus_L(tmp_path: Path, make) -> None:
    tokens = stream(100)
    ds = data.SampleDataset([make(tmp_path / "a.bin", tokens)], seq_len=8, vocab_size=VOCAB)
    assert ds.num_tokens == 100
    assert ds.num_samples == (100 - 1) // 8 == len(ds)
    for j in range(ds.num_samples):
        sample = ds.sample(j)
        assert sample.dtype == torch.long and sample.shape == (9,)
        assert torch.equal(sample, torch.from_numpy(tokens[j * 8:j * 8 + 9]))
    # consecutive samples share exactly one token
    assert ds.sample(0)[-1] == ds.sample(1)[0]


def test_exact_fit_has_one_sample(tmp_path: Path) -> None:
    ds = data.SampleDataset([raw_shard(tmp_path / "a.bin", stream(9))], seq_len=8, vocab_size=VOCAB)
    assert ds.num_samples == 1
    assert torch.equal(ds.sample(0), torch.from_numpy(stream(9)))


def test_samples_span_shard_boundaries_in_name_order(tmp_path: Path) -> None:
    tokens = stream(60)
    # written out of name order on purpose; mixed formats are one stream
    raw_shard(tmp_path / "x_train_000001.bin", tokens[25:])
    header_shard(tmp_path / "x_train_000000.bin", tokens[:25])
    paths = data.list_shards(tmp_path, "*_train_*.bin")
    assert [p.name for p in paths] == ["x_train_000000.bin", "x_train_000001.bin"]
    ds = data.SampleDataset(paths, seq_len=10, vocab_size=VOCAB)
    assert ds.num_tokens == 60
    assert torch.equal(ds.sample(2), torch.from_numpy(tokens[20:31]))  # crosses token 25


def test_batch_wraps_around(tmp_path: Path) -> None:
    tokens = stream(41)
    ds = data.SampleDataset([header_shard(tmp_path / "a.bin", tokens)], seq_len=10, vocab_size=VOCAB)
    assert ds.num_samples == 4
    batch = ds.batch(3, 3)
    assert batch.shape == (3, 11) and batch.dtype == torch.long
    assert torch.equal(batch[0], ds.sample(3))
    assert torch.equal(batch[1], ds.sample(0))
    assert torch.equal(batch[2], ds.sample(1))
    assert torch.equal(ds.sample(4 * 1000 + 2), ds.sample(2))
    assert ds.batch(0, 0).shape == (0, 11)


def test_write_shard_round_trip_is_atomic(tmp_path: Path) -> None:
    tokens = stream(123)
    path = data.write_shard(tmp_path / "s_val_000000.bin", tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_val_000000.bin"]  # no temporary left
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 123
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, 123]
    assert not np.frombuffer(raw[12:1024], "<i4").any()
    assert np.array_equal(data.TokenShards([path]).read(0, 123), tokens)
    with pytest.raises(ValueError):
        data.write_shard(tmp_path / "bad.bin", np.array([70000]))


def test_describe_shard(tmp_path: Path) -> None:
    tokens = np.array([50256, 5, 9, 50256, 7], dtype=np.int64)
    facts = data.describe_shard(header_shard(tmp_path / "a.bin", tokens))
    assert facts["format"] == "header" and facts["version"] == 1
    assert facts["num_tokens"] == 5 and facts["size_bytes"] == 1024 + 10 and facts["header_bytes"] == 1024
    assert (facts["min_id"], facts["max_id"], facts["eot_count"]) == (5, 50256, 2)
    raw = data.describe_shard(raw_shard(tmp_path / "b.bin", tokens))
    assert raw["format"] == "raw" and raw["num_tokens"] == 5 and raw["header_bytes"] == 0
    empty = data.describe_shard(raw_shard(tmp_path / "c.bin", np.zeros(0)))
    assert empty["num_tokens"] == 0 and empty["min_id"] is None


def test_open_split_uses_config_dirs_and_patterns(tmp_path: Path) -> None:
    header_shard(tmp_path / "d_train_000000.bin", stream(50))
    header_shard(tmp_path / "d_val_000000.bin", stream(20, offset=3))
    cfg = DataConfig(train_dir=tmp_path)
    train = data.open_split(cfg, "train", seq_len=4, vocab_size=VOCAB)
    val = data.open_split(cfg, "val", seq_len=4, vocab_size=VOCAB)
    assert (train.num_tokens, val.num_tokens) == (50, 20)
    assert torch.equal(val.sample(0), torch.from_numpy(stream(5, offset=3)))


def test_committed_sample_opens_with_the_shipped_configs() -> None:
    sample = Path(__file__).resolve().parents[2] / "data" / "sample"
    cfg = DataConfig(train_dir=sample)
    train = data.open_split(cfg, "train", seq_len=512, vocab_size=VOCAB)
    val = data.open_split(cfg, "val", seq_len=512, vocab_size=VOCAB)
    assert train.num_tokens >= 1_000_000 and val.num_tokens >= 100_000
    assert train.sample(0)[0] == 50256  # the stream starts with a document


# --------------------------------------------------------------------------- bad data


def expect_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2
    return message


def test_missing_directory(tmp_path: Path) -> None:
    msg = expect_error("does not exist", data.list_shards, tmp_path / "nope", "*.bin")
    assert str(tmp_path / "nope") in msg and "testnet data prepare" in msg


def test_directory_is_a_file(tmp_path: Path) -> None:
    expect_error("not a directory", data.list_shards, raw_shard(tmp_path / "a.bin", stream(4)), "*.bin")


def test_no_matching_shards_names_the_pattern(tmp_path: Path) -> None:
    raw_shard(tmp_path / "x_val_000000.bin", stream(10))
    msg = expect_error("no shards matching", data.list_shards, tmp_path, "*_train_*.bin")
    assert "'*_train_*.bin'" in msg and str(tmp_path) in msg and "1 other files" in msg


def test_open_split_names_the_config_keys(tmp_path: Path) -> None:
    cfg = DataConfig(train_dir=tmp_path, val_dir=tmp_path / "missing")
    msg = expect_error("val data", data.open_split, cfg, "val", 4, VOCAB)
    assert "validation.data_location" in msg
    msg = expect_error("train data", data.open_split, cfg, "train", 4, VOCAB)
    assert "model.LLM.train_pattern" in msg


def test_wrong_header_version(tmp_path: Path) -> None:
    path = header_shard(tmp_path / "a.bin", stream(10))
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.array([2], "<i4").tobytes()
    path.write_bytes(bytes(raw))
    msg = expect_error("header version 2", data.TokenShards, [path])
    assert str(path) in msg


def test_header_count_disagrees_with_size(tmp_path: Path) -> None:
    path = header_shard(tmp_path / "a.bin", stream(10))
    path.write_bytes(path.read_bytes()[:-4])  # truncated by two tokens
    msg = expect_error("header says 10 tokens", data.TokenShards, [path])
    assert "16 bytes follow" in msg


def test_odd_bytes_after_header(tmp_path: Path) -> None:
    path = header_shard(tmp_path / "a.bin", stream(10))
    path.write_bytes(path.read_bytes() + b"\0")
    expect_error("21 bytes follow", data.TokenShards, [path])


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(np.array([20240520, 1, 0], "<i4").tobytes())
    expect_error("shorter than the 1024-byte header", data.TokenShards, [path])


def test_odd_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"\1\2\3")
    msg = expect_error("odd size", data.TokenShards, [path])
    assert "3 bytes" in msg


def test_token_beyond_vocab_reports_first_position(tmp_path: Path) -> None:
    tokens = stream(200)
    tokens[150], tokens[170] = 60000, 65535
    good = header_shard(tmp_path / "a_train_0.bin", stream(10))
    bad = header_shard(tmp_path / "a_train_1.bin", tokens)
    msg = expect_error("token id 60000 at position 150", data.SampleDataset, [good, bad], 4, VOCAB)
    assert str(bad) in msg and "vocab_size 50257" in msg
    # the same shards are fine for a larger vocabulary
    assert data.SampleDataset([good, bad], 4, 65536).num_tokens == 210


def test_fewer_tokens_than_one_sample(tmp_path: Path) -> None:
    path = raw_shard(tmp_path / "a.bin", stream(8))
    msg = expect_error("fewer than one sample", data.SampleDataset, [path], 8, VOCAB)
    assert "8 tokens" in msg and "max_seq_len + 1 = 9" in msg


# --------------------------------------------------------------------------- through the CLI


def _cli_available() -> bool:
    try:
        return importlib.util.find_spec("hetero_testnet.cli.single") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not _cli_available(), reason="hetero_testnet.cli.single (imported by cli.py) does not exist yet")
def test_cli_inspect_bad_shard_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\1\2\3")
    proc = subprocess.run([sys.executable, "-m", "hetero_testnet", "data", "inspect", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "odd size" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

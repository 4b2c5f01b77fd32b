"""The larger corpus (data/pd8k) and what it needs: xz shards, the trained BPE, proportional validation,
`--recipe`, the n-gram references, configs/small's size. Network-free: builds use `--sources pydoc`;
the committed data/pd8k is read as shipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hetero_testnet.cli.data import data_app
from hetero_testnet.config import load_run_config
from hetero_testnet.data import bpe
from hetero_testnet.data import shards as data
from hetero_testnet.data.ngram import ngram_reference
from hetero_testnet.data.prepare import RECIPES, allocate_proportional
from hetero_testnet.data.sources import _KJV_VERSE, CORPUS_SOURCES
from hetero_testnet.errors import DataError
from hetero_testnet.model.flops import tier_cost

ROOT = Path(__file__).resolve().parents[2]
PD8K = ROOT / "src" / "hetero_testnet" / "data" / "pd8k"
runner = CliRunner(env={"COLUMNS": "200"})


# --------------------------------------------------------------------------- compressed shards

def test_xz_shard_round_trip_and_describe(tmp_path: Path) -> None:
    tokens = np.arange(5000, dtype=np.uint16) % 700
    path = data.write_shard(tmp_path / "x_train_000000.bin.xz", tokens)
    info = data.read_shard_info(path)
    assert (info.format, info.compression, info.num_tokens) == ("header", "xz", 5000)
    assert info.file_bytes == path.stat().st_size < info.size_bytes == 1024 + 2 * 5000
    shards = data.TokenShards([path], vocab_size=700)
    assert np.array_equal(shards.read(0, 5000), tokens)
    facts = data.describe_shard(path, document_start=0)
    assert facts["format"] == "header+xz" and facts["eot_count"] == 8 and facts["max_id"] == 699
    with pytest.raises(DataError, match="token id 699 at position 699"):
        data.TokenShards([path], vocab_size=699)
    plain = data.write_shard(tmp_path / "x_train_000000.bin", tokens)
    assert np.array_equal(data.TokenShards([plain]).read(0, 5000), tokens)


def test_damaged_xz_shard_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad_train_000000.bin.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 not really")
    with pytest.raises(DataError, match="cannot decompress shard"):
        data.read_shard_info(bad)


# --------------------------------------------------------------------------- BPE and prepare

def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)][:60]


def test_bpe_training_is_deterministic_and_lossless() -> None:
    texts = _pydoc_texts()
    first, second = bpe.train_bpe(texts, 400), bpe.train_bpe(texts, 400)
    assert bpe.to_json(first) == bpe.to_json(second)
    assert first.get_vocab_size() == 400 and first.token_to_id(bpe.EOT_TEXT) == bpe.EOT_ID
    (ids,) = bpe.encode_documents(first, ["naïve café — déjà vu\n\tx"])
    assert ids[0] == bpe.EOT_ID and bpe.decode(first, ids[1:]) == "naïve café — déjà vu\n\tx"
    with pytest.raises(DataError, match="literal <|endoftext|>"):
        bpe.encode_documents(first, ["a <|endoftext|> b"])


def test_prepare_bpe_compressed_pydoc(tmp_path: Path) -> None:
    args = ["prepare", "--recipe", "pd8k", "--sources", "pydoc", "--train-tokens", "20000", "--val-tokens", "3000",
            "--val-fraction", "0.2", "--vocab-size", "512"]
    for out in ("a", "b"):
        result = runner.invoke(data_app, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "pd8k_train_000000.bin.xz", "pd8k_val_000000.bin.xz", "tokenizer.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    assert tok["vocab_size"] == manifest["vocab_size"] == 512 and manifest["document_start"] == 0
    assert tok["sha256"] == hashlib.sha256((tmp_path / "a" / "tokenizer.json").read_bytes()).hexdigest()
    train = data.TokenShards(data.list_shards(tmp_path / "a", "*_train_*.bin.xz"), vocab_size=512)
    assert train.num_tokens == 20000 and train.read(0, 1)[0] == 0
    entry = next(s for s in manifest["shards"] if s["split"] == "train")
    assert entry["tokens_sha256"] == hashlib.sha256(train.read(0, 20000).astype("<u2").tobytes()).hexdigest()
    shown = runner.invoke(data_app, ["inspect", str(tmp_path / "a"), "--tokens", "12"])
    assert shown.exit_code == 0 and "header+xz" in shown.output and "beyond" not in shown.output


def test_allocate_proportional() -> None:
    assert allocate_proportional([100, 100, 100], [1, 1, 2], 40) == [10, 10, 20]
    assert allocate_proportional([5, 100, 100], [1, 1, 2], 40) == [5, 12, 23]   # short source, rest re-shared
    assert sum(allocate_proportional([50, 50, 50], [3, 3, 1], 100)) == 100
    assert allocate_proportional([10, 0], [1, 1], 100) == [10, 0]


def test_prepare_rejects_bad_tokenizer_options(tmp_path: Path) -> None:
    for extra, message in ((["--tokenizer", "wordpiece"], "--tokenizer"), (["--vocab-size", "100"], "--vocab-size"),
                           (["--val-allocation", "random"], "--val-allocation"), (["--recipe", "nope"], "recipe")):
        result = runner.invoke(data_app, ["prepare", "--recipe", "pd8k", "--sources", "pydoc", "--out",
                                          str(tmp_path), *extra])
        assert isinstance(result.exception, DataError) and message in str(result.exception), extra


def test_kjv_verse_lines_parse() -> None:
    m = _KJV_VERSE.fullmatch("1Co13:4 Charity suffereth long, and is kind;")
    assert (m["book"], m["chapter"], m["verse"], m["text"]) == ("1Co", "13", "4", "Charity suffereth long, and is kind;")
    assert _KJV_VERSE.fullmatch("Ge1:1 In the beginning God created the heaven and the earth.")["book"] == "Ge"


# --------------------------------------------------------------------------- the committed corpus

def test_committed_pd8k_matches_its_manifest_and_configs_small() -> None:
    manifest = json.loads((PD8K / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == sorted(CORPUS_SOURCES) == sorted(RECIPES["pd8k"].sources)
    assert manifest["train_tokens"] >= 5_000_000 and manifest["val_tokens"] >= 200_000
    for s in manifest["sources"]:                              # validation from every source, in proportion
        share = s["train_tokens"] / manifest["train_tokens"]
        assert s["val_tokens"] > 0 and abs(s["val_tokens"] / manifest["val_tokens"] - share) < 0.002, s["name"]
        assert re.fullmatch(r"[0-9a-f]{64}", s["archive_sha256"])
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((PD8K / "tokenizer.json").read_bytes()).hexdigest()
    for entry in manifest["shards"]:
        assert hashlib.sha256((PD8K / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    cfg = load_run_config(ROOT / "configs" / "small")
    assert cfg.model.vocab_size == manifest["vocab_size"] == 8192
    val = data.open_split(cfg.data, "val", cfg.model.max_seq_len, cfg.model.vocab_size)
    assert val.num_tokens == manifest["val_tokens"] and cfg.data.val_samples <= val.num_samples
    assert hashlib.sha256(val.shards.read(0, val.num_tokens).astype("<u2").tobytes()).hexdigest() == \
        manifest["shards"][1]["tokens_sha256"]


def test_configs_small_size_and_flops_as_its_comments_say() -> None:
    cfg = load_run_config(ROOT / "configs" / "small").model
    text = (ROOT / "configs" / "small" / "config.yaml").read_text()
    costs = [tier_cost(cfg, t) for t in (0, 1, 2)]
    assert costs[0].parameters == 3_933_312 and "= 3,933,312" in text
    for c in costs:
        assert f"{c.matmul_params:,}" in text and f"{c.train_flops_per_token / 1e6:.2f} M" in text
    assert [round(c.relative_to(costs[0]), 3) for c in costs] == [1.0, 0.75, 0.625]
    from hetero_testnet.model.nanogpt import build_model, count_parameters
    assert count_parameters(build_model(cfg, 1)) == costs[0].parameters


# --------------------------------------------------------------------------- n-gram references

def test_ngram_reference_on_a_known_stream() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 10, size=20000)                     # i.i.d. uniform: unigram ~ ln 10, bigram no better
    val = rng.integers(0, 10, size=(8, 33))
    ref = ngram_reference(train, val, vocab_size=10)
    assert ref.targets == 8 * 32 and abs(ref.unigram_loss - math.log(10)) < 0.05
    assert ref.bigram_loss >= ref.unigram_loss - 0.02
    cycle = np.tile(np.arange(10), 2000)                        # deterministic successor: bigram ~ 0
    ref = ngram_reference(cycle, np.tile(np.arange(10), 4)[:33].reshape(1, 33), vocab_size=10)
    assert ref.bigram_loss < 0.05 < ref.unigram_loss

"""The vendored GPT-2 tokenizer: known ids, round trips, and no network."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pytest
import tiktoken

from hetero_testnet.data import tokenizer
from hetero_testnet.errors import DataError

TEXTS = [
    "Hello world",
    "Call me Ishmael. Some years ago—never mind how long precisely—having little money...",
    "  leading spaces, trailing spaces   \n\n\ttabs\r\n and CRLF   ",
    "numbers 1234567 3.14159, contractions: don't we'll they're I'd",
    "unicode: café naïve 東京 🙂 ∑x²",
    "code: def f(x):\n    return x ** 2  # comment\n",
]


def test_known_ids() -> None:
    enc = tokenizer.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT] == [50256]
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.eot_token == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(text: str) -> None:
    ids = tokenizer.encode_document(text)
    assert ids[0] == tokenizer.EOT
    assert all(0 <= i < tokenizer.VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids[1:]) == text


def test_literal_endoftext_in_text_is_plain_text() -> None:
    ids = tokenizer.encode_document("a <|endoftext|> b")
    assert ids.count(tokenizer.EOT) == 1 and ids[0] == tokenizer.EOT
    assert tokenizer.encode_documents(["a <|endoftext|> b", "Hello world"]) == [ids, [50256, 15496, 995]]


def test_decode_of_a_cut_character_does_not_raise() -> None:
    ids = tokenizer.gpt2_encoding().encode_ordinary("🙂")
    assert len(ids) > 1
    assert "\ufffd" in tokenizer.decode(ids[:1])


def test_pattern_matches_installed_tiktoken_r50k() -> None:
    public = pytest.importorskip("tiktoken_ext.openai_public")
    ranks = tokenizer.gpt2_encoding()._mergeable_ranks
    theirs = tiktoken.Encoding(name="r50k-installed", pat_str=public.r50k_pat_str, mergeable_ranks=ranks,
                               special_tokens={"<|endoftext|>": 50256})
    for text in TEXTS:
        assert tokenizer.gpt2_encoding().encode_ordinary(text) == theirs.encode_ordinary(text)


def test_rank_file_is_the_pinned_one() -> None:
    raw = tokenizer.GPT2_RANKS_PATH.read_bytes()
    assert len(raw) == 835_554
    assert hashlib.sha256(raw).hexdigest() == tokenizer.GPT2_RANKS_SHA256
    assert tokenizer.GPT2_RANKS_PATH.with_name("gpt2.tiktoken.LICENSE").is_file()


def test_building_the_encoding_never_opens_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokenizer.gpt2_encoding.cache_clear()
    try:
        assert tokenizer.gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
    finally:
        tokenizer.gpt2_encoding.cache_clear()


def test_damaged_rank_file_is_a_data_error(tmp_path: Path) -> None:
    copy = tmp_path / "gpt2.tiktoken"
    shutil.copy(tokenizer.GPT2_RANKS_PATH, copy)
    copy.write_bytes(copy.read_bytes()[:-10])
    with pytest.raises(DataError, match="reinstall hetero-testnet"):
        tokenizer.load_ranks(copy)
    with pytest.raises(DataError, match="cannot read"):
        tokenizer.load_ranks(tmp_path / "missing.tiktoken")

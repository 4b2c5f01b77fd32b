"""The exact GPT-2 tokenizer, built offline from a vendored rank file.

`tiktoken.get_encoding("gpt2")` downloads its ranks at run time, which fails on machines without
internet. The same ranks (tiktoken's `r50k_base`, equal to GPT-2's `encoder.json` + `vocab.bpe`) ship
in `assets/gpt2.tiktoken`, copied from the PyPI sdist `openai-whisper==20250625` (MIT, see
`assets/gpt2.tiktoken.LICENSE`). `gpt2_encoding()` checks the file's sha256 (the hash tiktoken itself
pins for `r50k_base`) and builds a `tiktoken.Encoding` from it; nothing here touches the network.

Documents are encoded as `[EOT] + tokens`: every document starts with `<|endoftext|>` (50256), as in
the fineweb10B shards the reference trained on.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from hetero_testnet.errors import DataError

GPT2_RANKS_PATH = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""sha256 of `gpt2.tiktoken`; the same value tiktoken pins for `r50k_base`."""

EOT = 50256
"""`<|endoftext|>`: starts every document."""
VOCAB_SIZE = 50257
"""Token ids are in [0, VOCAB_SIZE)."""

# GPT-2's pre-tokenizer regex, as in OpenAI's gpt-2 `encoder.py` and tiktoken's `gpt2`/`r50k_base`
# encodings. Recent tiktoken releases spell it with possessive quantifiers and an extra `\s++$`
# branch (a speed-up that splits text identically); this classic spelling also compiles on the
# older tiktoken releases that pyproject.toml allows. tests/unit/test_tokenizer.py checks that both
# spellings give the same ids when the installed tiktoken has the new one.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path: Path = GPT2_RANKS_PATH, expected_sha256: str = GPT2_RANKS_SHA256) -> dict[bytes, int]:
    """Parse a `.tiktoken` rank file (one `<base64 token> <rank>` per line) after checking its hash.

    This is what `tiktoken.load.load_tiktoken_bpe` does for a local path, minus its side effect of
    copying the file into a cache directory under $TMPDIR, and with a `DataError` on a bad file.
    """
    try:
        contents = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the GPT-2 rank file {path}: {e.strerror or e}; "
                        "reinstall hetero-testnet") from e
    digest = hashlib.sha256(contents).hexdigest()
    if digest != expected_sha256:
        raise DataError(f"GPT-2 rank file {path} has sha256 {digest}, expected {expected_sha256}; "
                        "the file is damaged, reinstall hetero-testnet")
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding (50257 ids, `<|endoftext|>` = 50256), built once per process."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_document(text: str) -> list[int]:
    """`[EOT] + GPT-2 ids of text`; a literal "<|endoftext|>" inside text is encoded as plain text."""
    return [EOT, *gpt2_encoding().encode_ordinary(text)]


def encode_documents(texts: list[str], num_threads: int = 2) -> list[list[int]]:
    """`encode_document` for many texts (tiktoken spreads the batch over `num_threads` threads)."""
    return [[EOT, *ids] for ids in gpt2_encoding().encode_ordinary_batch(texts, num_threads=num_threads)]


def decode(ids: Iterable[int]) -> str:
    """Text of token ids; bytes that are not valid UTF-8 (a token cut mid-character) become U+FFFD."""
    return gpt2_encoding().decode([int(i) for i in ids], errors="replace")

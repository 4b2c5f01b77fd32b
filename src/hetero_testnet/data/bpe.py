"""A small byte-level BPE tokenizer, trained on the corpus itself with Hugging Face `tokenizers`.

GPT-2's 50,257 ids make the embedding and the head dominate a model of a few million parameters
(`configs/small`: 2 x 50257 x 128 = 12.9 M of them against 1.8 M in the blocks). `testnet data
prepare --recipe pd8k` therefore trains its own tokenizer, the same kind as GPT-2's (byte-level BPE
with GPT-2's pre-tokenizer regex, so every byte sequence encodes and decodes losslessly), with
`vocab_size` ids: id 0 is `<|endoftext|>` (it starts every document, as in the GPT-2 shards), then
the 256 byte tokens, then the merges.

Training is deterministic: the trainer counts words, then merges the most frequent pair, ties broken
by the pair's ids (which follow the alphabet's sorted order and the merge order), so the same texts
in the same order give the same `tokenizer.json` byte for byte, whatever the thread count
(tests/unit/test_bpe.py trains twice). The file is shipped beside the shards and its sha256 is in
the manifest; `load_tokenizer` checks it. `tokenizer.json` is the format `transformers` loads
(`PreTrainedTokenizerFast(tokenizer_file=...)`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hetero_testnet.errors import DataError

EOT_TEXT = "<|endoftext|>"
EOT_ID = 0
"""`<|endoftext|>` is the first special token, so id 0."""
TOKENIZER_FILE = "tokenizer.json"


def _library() -> Any:
    try:
        import tokenizers
    except ImportError as e:  # a dependency of the package; missing only in a broken environment
        raise DataError("the Hugging Face `tokenizers` library is not installed; reinstall hetero-testnet "
                        "(pip install -e .)") from e
    return tokenizers


def library_version() -> str:
    return str(_library().__version__)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` ids, trained on `texts` in order."""
    if not 257 < vocab_size <= 65536:
        raise DataError(f"--vocab-size must be in (257, 65536] to fit uint16 shards (got {vocab_size})")
    tk = _library()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                     special_tokens=[EOT_TEXT],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.token_to_id(EOT_TEXT) != EOT_ID:
        raise DataError(f"the trained tokenizer put {EOT_TEXT} at id {tok.token_to_id(EOT_TEXT)}, not {EOT_ID}")
    return tok


def to_json(tok: Any) -> str:
    """The tokenizer's `tokenizer.json` text (what is written, hashed and shipped)."""
    return tok.to_str(pretty=False) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def _load(path: str, expected_sha256: str | None) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read tokenizer {path}: {e.strerror or e}") from e
    digest = sha256_text(text)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DataError(f"tokenizer {path} has sha256 {digest}, but its manifest says {expected_sha256}; "
                        "rebuild the data with `testnet data prepare` or restore the file")
    try:
        return _library().Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception on a malformed file
        raise DataError(f"tokenizer {path} is not a Hugging Face tokenizer.json: {e}") from e


def load_tokenizer(path: Path, expected_sha256: str | None = None) -> Any:
    """The tokenizer in `path` (a tokenizer.json), its sha256 checked when given; cached per process."""
    return _load(str(Path(path).resolve()), expected_sha256)


def encode_documents(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """`[EOT] + ids` per text. Text must not contain the literal `<|endoftext|>` (it would become the
    special token); `DataError` names the first document that does."""
    for i, text in enumerate(texts):
        if EOT_TEXT in text:
            raise DataError(f"document {i} contains the literal {EOT_TEXT}, which would encode as a document start")
    return [[EOT_ID, *enc.ids] for enc in tok.encode_batch(list(texts), add_special_tokens=False)]


def decode(tok: Any, ids: Iterable[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)

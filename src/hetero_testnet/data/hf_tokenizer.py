"""The shipped GPT-2 tokenizer as Hugging Face tokenizer files, written without the `tokenizers` library.

`testnet export` puts a tokenizer beside the weights so that `transformers.AutoTokenizer` loads the
exported model offline. The files are derived from the same rank file `tokenizer.py` uses
(`assets/gpt2.tiktoken`), so both tokenizers encode alike (tests/unit/test_export.py compares them):

- `tokenizer.json`: a byte-level BPE (the `tokenizers` format GPT-2's own `tokenizer.json` uses):
  GPT-2's pre-tokenizer regex, the vocabulary as byte-level unicode strings, and the merges;
- `vocab.json` + `merges.txt`: the same vocabulary and merges for the slow `GPT2Tokenizer`;
- `tokenizer_config.json`, `special_tokens_map.json`: `<|endoftext|>` as bos/eos/unk.

A rank file holds no merge list, only token ranks. The merges are recovered as transformers'
tiktoken converter does: a token of rank r is what byte-pair encoding its bytes with only the ranks
below r leaves as exactly two parts, and those two parts are its merge (BPE merges in rank order).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from hetero_testnet.data.tokenizer import EOT, load_ranks

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values onto printable unicode characters
    (OpenAI's gpt-2 `encoder.py`): printable latin-1 bytes map to themselves, the rest to 256 + n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, codes)))


def _unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split_in_two(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """BPE on `token` with only ranks below `max_rank`, stopped at two parts (the token's merge)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) is not one merge of lower-ranked tokens")
    return parts[0], parts[1]


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every merge in rank order, as pairs of byte-level unicode strings."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _split_in_two(token, ranks, rank)
            merges.append((_unicode(left), _unicode(right)))
    return merges


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": EOT, "content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary (with `<|endoftext|>`) and merges of the shipped ranks, once per process."""
    ranks = load_ranks()
    vocab = {_unicode(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT_TEXT] = EOT
    return vocab, bpe_merges(ranks)


def write_hf_tokenizer(directory: Path, *, model_max_length: int) -> list[Path]:
    """Write the Hugging Face tokenizer files of the shipped GPT-2 tokenizer into `directory`."""
    vocab, merges = _vocab_and_merges()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, **special,
              "added_tokens_decoder": {str(EOT): {"content": EOT_TEXT, "lstrip": False, "normalized": True,
                                                  "rstrip": False, "single_word": False, "special": True}}}
    contents = {
        "tokenizer.json": json.dumps(_tokenizer_json(vocab, merges), ensure_ascii=False),
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TOKENIZER_FILES:
        (directory / name).write_text(contents[name] + ("" if contents[name].endswith("\n") else "\n"),
                                      encoding="utf-8")
        written.append(directory / name)
    return written

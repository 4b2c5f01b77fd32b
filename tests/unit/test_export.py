"""`testnet export`: tier submodels that load in Hugging Face transformers, offline, with the same loss.

transformers is a test dependency only (the `dev` extra); the export itself needs neither it nor
`tokenizers`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _testnet(*args: str) -> Result:
    """`testnet ARGS` run in this process through `cli.main` (one-line errors, exit codes), output captured."""
    from hetero_testnet.cli import main

    out, err, saved, threads = io.StringIO(), io.StringIO(), sys.argv, torch.get_num_threads()
    sys.argv = ["testnet", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
        torch.set_num_threads(threads)  # --threads sets this process's torch threads
    return Result(code, out.getvalue(), err.getvalue())


def _testnet_process(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("HETERO_TESTNET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hetero_testnet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def _value(output: str, key: str) -> str:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", output)
    assert m, f"{key}= not in output:\n{output}"
    return m.group(1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """A tiny checkpoint trained 2 steps (`testnet train`, as a user makes one) and its tier 0, 1, 2 exports
    (`testnet export`, run in this process to save interpreter start-ups)."""
    base = tmp_path_factory.mktemp("export")
    r = _testnet_process("train", "--config", str(TINY), "--steps", "2", "--out", str(base / "train"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    checkpoint = base / "train" / "checkpoint"
    outs = {}
    for tier in (0, 1, 2):
        outs[tier] = base / f"tier{tier}"
        r = _testnet("export", "--checkpoint", str(checkpoint), "--tier", str(tier), "--out", str(outs[tier]),
                     "--config", str(TINY), "--threads", "1")
        assert r.returncode == 0, r.stderr
        assert int(_value(r.stdout, "ffn_width")) == 64 >> tier
    return checkpoint, outs


def _hf_val_loss(model, num_samples: int, batch_size: int = 8) -> float:
    """The validation loss as `model.train.evaluate` defines it, computed with the HF model's logits."""
    from hetero_testnet.config import load_run_config
    from hetero_testnet.data.shards import open_split

    cfg = load_run_config(TINY)
    data = open_split(cfg.data, "val", cfg.model.max_seq_len, cfg.model.vocab_size)
    total = 0.0
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            tokens = data.batch(start, n)  # (n, T+1)
            logits = model(input_ids=tokens[:, :-1]).logits.float()  # (n, T, V)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))) * n
    return total / num_samples


@pytest.mark.parametrize("tier", [0, 1, 2])
def test_export_loads_in_transformers_with_the_eval_loss(exports, tier):
    from transformers import AutoModelForCausalLM

    checkpoint, outs = exports
    model, info = AutoModelForCausalLM.from_pretrained(outs[tier], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.intermediate_size == 64 >> tier
    manifest = json.loads((outs[tier] / "export.json").read_text())
    assert manifest["tier"] == tier and manifest["ffn_width"] == 64 >> tier and manifest["source_step"] == 2
    assert len(manifest["source_model_sha256"]) == 64
    hf_loss = _hf_val_loss(model.eval(), manifest["validation"]["num_samples"])
    e = _testnet("eval", "--checkpoint", str(checkpoint), "--tier", str(tier), "--config", str(TINY),
                 "--threads", "1")
    assert e.returncode == 0, e.stderr
    eval_loss = float(_value(e.stdout, "val_loss"))  # printed with 4 decimals: 5e-5 abs, < 1e-5 rel at ~10
    assert hf_loss == pytest.approx(eval_loss, rel=1e-5)
    assert hf_loss == pytest.approx(manifest["val_loss"], rel=1e-5)


def test_tier1_has_half_the_ffn_parameters(exports):
    _, outs = exports
    m = {t: json.loads((outs[t] / "export.json").read_text()) for t in outs}
    assert m[1]["ffn_parameters"] * 2 == m[0]["ffn_parameters"]
    assert m[2]["ffn_parameters"] * 4 == m[0]["ffn_parameters"]
    assert m[0]["num_parameters"] - m[1]["num_parameters"] == m[1]["ffn_parameters"]


def test_exported_tokenizer_encodes_like_the_shipped_one(exports):
    from transformers import AutoTokenizer

    from hetero_testnet.config import load_run_config
    from hetero_testnet.data.shards import open_split
    from hetero_testnet.data.tokenizer import decode, gpt2_encoding

    _, outs = exports
    tok = AutoTokenizer.from_pretrained(outs[1])
    enc = gpt2_encoding()
    cfg = load_run_config(TINY)
    val = open_split(cfg.data, "val", 512, 50257)
    sample = decode(val.batch(0, 8).reshape(-1).tolist())  # ~4k tokens of real text
    documents = [d for d in sample.split("<|endoftext|>") if d]  # the shards start each one with EOT
    texts = [*documents, "Hello world!  It's 2024... naïve café 日本語 😀\n\n\tTabs   and  spaces ",
             "I'll've they're we'd 12345 6.02e23 $$$ ---", " \n \n  ", ""]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text)
    ids = enc.encode_ordinary(texts[1])
    assert tok.decode(ids) == texts[1]
    assert tok.eos_token_id == 50256 and tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert tok.encode("<|endoftext|>a", add_special_tokens=False) == [50256, 64]  # special, as in HF's GPT-2


def test_bad_export_input_is_one_line_and_exit_2(exports, tmp_path):
    checkpoint, _ = exports
    for args in (["--tier", "9"], ["--tier", "1", "--helpers", "all"]):
        r = _testnet("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _testnet("export", "--checkpoint", str(tmp_path / "missing"), "--tier", "0", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_a_run_directory_exports_its_latest_checkpoint(exports, tmp_path):
    import shutil

    checkpoint, outs = exports
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoint")
    (run / "events.jsonl").write_text("")
    r = _testnet("export", "--checkpoint", str(run), "--tier", "1", "--out", str(tmp_path / "t1"),
                 "--config", str(TINY), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t1" / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()

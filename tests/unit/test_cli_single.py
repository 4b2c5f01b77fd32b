"""`testnet init / train / eval` end to end, as a user runs them (subprocesses on configs/tiny)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetero_testnet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG_DIR = ROOT / "configs" / "tiny"
SAMPLE_DATA_DIR = ROOT / "data" / "sample"
needs_sample_data = pytest.mark.skipif(not any(SAMPLE_DATA_DIR.glob("*_val_*.bin")),
                                       reason=f"no bundled data in {SAMPLE_DATA_DIR} (testnet data prepare)")


def run_testnet(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("HETERO_TESTNET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hetero_testnet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _value(output: str, key: str) -> str:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", output)
    assert m, f"{key}= not in output:\n{output}"
    return m.group(1)


def test_init_writes_the_seeded_model(tiny_config, tmp_path):
    from hetero_testnet.model.checkpoint import load_checkpoint
    from hetero_testnet.model.nanogpt import build_model, count_parameters

    r = run_testnet("init", "--config", str(TINY_CONFIG_DIR), "--seed", "5", "--out", str(tmp_path / "init"))
    assert r.returncode == 0, r.stderr
    ref = build_model(tiny_config.model, 5)
    assert int(_value(r.stdout, "parameters")) == count_parameters(ref)
    state = load_checkpoint(tmp_path / "init").model_state
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


@needs_sample_data
def test_train_then_eval(tmp_path):
    out = tmp_path / "run"
    r = run_testnet("train", "--config", str(TINY_CONFIG_DIR), "--tier", "1", "--helper-fraction", "0.5",
                "--steps", "2", "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"^step=(\d+) loss=\S+ lr=\S+ .*tok/s=\d+", r.stdout, re.M)
    assert steps == ["0", "1"], r.stdout
    final = float(_value(r.stdout, "final_val_loss"))
    assert float(_value(r.stdout, "initial_val_loss")) > 0 and int(_value(r.stdout, "parameters")) > 0
    assert "wall_time_s=" in r.stdout and (out / "checkpoint" / "model.safetensors").is_file()

    e = run_testnet("eval", "--checkpoint", str(out / "checkpoint"), "--tier", "1", "--config", str(TINY_CONFIG_DIR))
    assert e.returncode == 0, e.stderr
    assert abs(float(_value(e.stdout, "val_loss")) - final) < 1e-3  # same samples, same tier
    assert _value(e.stdout, "tier") == "1" and _value(e.stdout, "ffn_width") == "32"


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = run_testnet("train", "--config", str(TINY_CONFIG_DIR), "--tier", "9", "--steps", "1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: tier 9") and len(r.stderr.strip().splitlines()) == 1


def test_eval_of_a_missing_checkpoint_is_a_config_error(tmp_path):
    from hetero_testnet.cli.single import eval_

    with pytest.raises(ConfigError, match="does not exist"):
        eval_(checkpoint=tmp_path / "missing", tier=0, config=TINY_CONFIG_DIR, num_samples=None, batch_size=8,
              threads=1)

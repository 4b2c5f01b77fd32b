"""configs/nanogpt-100m: its shape as configured, and a slice of it trained end to end on CPU.

The slice keeps every width of the config (hidden 768, 12 heads, FFN 3072, GPT-2 vocabulary: the
embedding and head are the full 77 M parameters) and cuts what only costs CPU time: 2 of the 12
layers, 32-token sequences, 2 per step, 1 step, 2 validation samples. Two clients at tiers 0 and 1.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from testnet_helpers import ROOT, cli_cmd

CONFIG = ROOT / "configs" / "nanogpt-100m"


def test_the_100m_config_is_gpt2_small_sized_with_four_useful_tiers():
    from hetero_testnet.config import load_run_config
    from hetero_testnet.model.matformer import ffn_width, is_ffn_param
    from hetero_testnet.model.nanogpt import NanoGPT

    cfg = load_run_config(CONFIG)
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (768, 12, 12, 3072)
    assert cfg.notes == () and cfg.timing.min_clients == 2
    with torch.device("meta"):
        model = NanoGPT(m)
    total = sum(p.numel() for p in model.parameters())
    ffn = sum(p.numel() for n, p in model.named_parameters() if is_ffn_param(n))
    assert round(total / 1e6, 1) == 190.5 and round(ffn / 1e6, 1) == 84.9  # as its header says
    assert [ffn_width(m.intermediate_size, t) for t in range(4)] == [3072, 1536, 768, 384]


@pytest.mark.slow
def test_a_slice_of_the_100m_config_trains_one_step_with_two_tiers(tmp_path):
    raw = yaml.safe_load((CONFIG / "config.yaml").read_text())
    llm = raw["model"]["LLM"]
    llm["architecture_config"]["num_hidden_layers"] = 2
    llm["max_seq_len"], llm["micro_batch_size"] = 32, 0
    llm["data_location"] = raw["validation"]["data_location"] = {"Local": str(ROOT / "data" / "sample")}
    raw["config"].update(global_batch_size_start=2, global_batch_size_end=2, total_steps=1)
    raw["validation"].update(num_samples=2, eval_every=0)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run(cli_cmd("start", "--config-path", str(tmp_path / "cfg"), "--num-clients", "2", "--tiers", "0,1",
                               "--headless", "--server-port", "0", "--logs-dir", str(tmp_path / "logs"), "--name",
                               "m100", "--threads", "1"), capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "logs" / "m100" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_completed"] == 1 and summary["replicas_identical"]
    assert {c["ffn_width"] for c in summary["clients"].values()} == {3072, 1536}

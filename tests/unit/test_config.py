from pathlib import Path

import pytest

from hetero_testnet.config import load_run_config, parse_run_config
from hetero_testnet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

PSYCHE_STATE_TOML = """
run_id = "nanogpt-20m-fineweb"
[config]
warmup_time = 5
cooldown_time = 5
max_round_train_time = 30
round_witness_time = 3
epoch_time = 60
total_steps = 100
min_clients = 3
init_min_clients = 3
global_batch_size_start = 12
global_batch_size_end = 12
global_batch_size_warmup_tokens = 0
verification_percent = 0
witness_nodes = 1
waiting_for_members_extra_time = 3
[model.LLM]
architecture = "HfNanoGPT"
data_type = "Pretraining"
max_seq_len = 512
data_location = { Local = "./data/fineweb10B" }
[model.LLM.checkpoint.Hub]
repo_id = "./checkpoints/nanogpt-20m-init"
[model.LLM.lr_schedule.Cosine]
base_lr = 6.0e-4
warmup_steps = 50
warmup_init_lr = 0.0
total_steps = 100
final_lr = 6.0e-5
[model.LLM.optimizer.AdamW]
betas = [0.9, 0.95]
weight_decay = 0.1
eps = 1.0e-8
clip_grad_norm = 1.0
"""


def test_shipped_configs_load():
    big = load_run_config(ROOT / "configs/nanogpt-20m-run")
    assert big.model.hidden_size == 256 and big.model.intermediate_size == 1024
    assert big.timing.global_batch_size(0) == 12 and big.lr_schedule.warmup_steps == 50
    assert big.data.train_dir == (ROOT / "data/sample").resolve()
    tiny = load_run_config(ROOT / "configs/tiny")
    assert tiny.timing.min_clients == tiny.timing.init_min_clients == 1


def test_psyche_state_toml_loads_unchanged(tmp_path):
    (tmp_path / "state.toml").write_text(PSYCHE_STATE_TOML)
    cfg = load_run_config(tmp_path)
    assert cfg.run_id == "nanogpt-20m-fineweb"
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.clip_grad_norm == 1.0
    assert cfg.model.max_seq_len == 512 and cfg.model.vocab_size == 50257
    assert cfg.data.train_dir == (tmp_path / "data/fineweb10B").resolve()


def test_round_trip_through_to_dict():
    cfg = load_run_config(ROOT / "configs/tiny")
    again = parse_run_config(cfg.to_dict(), base_dir=Path("/"))
    assert again.replace(source=None) == cfg.replace(source=None)


@pytest.mark.parametrize("text, needle", [
    ("run_id: x\nbogus: 1\n", "bogus"),
    ("run_id: x\nconfig: {total_stepz: 3}\n", "config.total_stepz"),
    ("run_id: x\nconfig: {total_steps: -1}\n", "total_steps"),
    ("run_id: x\nmodel: {LLM: {optimizer: {Lion: {}}}}\n", "optimizer"),
    ("run_id: x\nconfig: {min_clients: 'three'}\n", "config.min_clients"),
    ("run_id: [unclosed\n", "malformed"),
    ("- just a list\n", "mapping"),
])
def test_invalid_configs_name_the_field(tmp_path, text, needle):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run_config(tmp_path)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_run_config(tmp_path / "nope")

"""Psyche's own `state.toml` files, as published (tests/assets/psyche/SOURCE.md), load here.

Fields we implement take effect; Psyche fields we do not are accepted and named once in a warning;
a field neither tool knows is a warning in a `.toml` (Psyche mode) and an error in our own YAML.
"""

from __future__ import annotations

import math
import shutil
import tomllib
from pathlib import Path

import pytest

from hetero_testnet.config import LRScheduleConfig, load_run_config, parse_run_config
from hetero_testnet.config.psyche import config_warning
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.optim import lr_at

ROOT = Path(__file__).resolve().parents[2]
PSYCHE = ROOT / "tests" / "assets" / "psyche"
import hetero_testnet.config as _config

HAS_DISTRO = hasattr(_config, "SyncConfig")
"""Psyche's `optimizer.Distro` maps to `--sync demo` (issue 13); the Distro configs need that mapping."""
needs_distro = pytest.mark.skipif(not HAS_DISTRO, reason="optimizer.Distro is not mapped in this version")
LOADABLE = ["elastic-nanogpt-20m-run", "elastic-matformer-test", "elastic-nanogpt-124m", "psyche-test",
            pytest.param("psyche-llama2-20m-dolma-noverify-first-checkpointer", marks=needs_distro),
            pytest.param("psyche-consilience-match-llama2-20m-fineweb-pretrain-dev", marks=needs_distro)]


def _psyche_raw(name: str) -> dict:
    return tomllib.loads((PSYCHE / name / "state.toml").read_text())


@pytest.mark.parametrize("name", LOADABLE)
def test_published_state_toml_loads_unchanged(name):
    raw = _psyche_raw(name)
    cfg = load_run_config(PSYCHE / name)
    c, llm = raw["config"], raw["model"]["LLM"]
    assert cfg.run_id == raw["run_id"] and cfg.model.max_seq_len == llm["max_seq_len"]
    assert (cfg.timing.total_steps, cfg.timing.min_clients, cfg.timing.global_batch_size(0)) == (
        c["total_steps"], c["min_clients"], c["global_batch_size_end"])
    assert cfg.timing.epoch_time == c["epoch_time"] and cfg.timing.warmup_time == c["warmup_time"]
    assert cfg.lr_schedule.base_lr == llm["lr_schedule"]["Cosine"]["base_lr"]
    warning = config_warning(cfg.notes, cfg.source)
    assert warning is not None and "run_state" in warning and "cold_start_warmup_steps" in warning
    assert len(cfg.notes) <= 2  # one entry for "no effect", one for "unknown": named once each


def test_the_20m_run_takes_effect_as_psyche_reads_it():
    cfg = load_run_config(PSYCHE / "elastic-nanogpt-20m-run")
    assert cfg.data.train_dir == (PSYCHE / "elastic-nanogpt-20m-run" / "data" / "fineweb10B").resolve()
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.clip_grad_norm == 1.0
    assert (cfg.lr_schedule.kind, cfg.lr_schedule.warmup_steps, cfg.lr_schedule.final_lr) == ("Cosine", 50, 6e-5)
    assert (cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_hidden_layers) == (256, 1024, 8)
    assert len(cfg.notes) == 1 and "checkpoint Hub" in cfg.notes[0] and "unknown" not in cfg.notes[0]


def test_unknown_field_is_a_warning_in_psyche_mode_and_an_error_in_yaml(tmp_path):
    cfg = load_run_config(PSYCHE / "elastic-matformer-test")  # `rounds_per_epoch`: in neither schema
    assert "fields neither Psyche nor this tool knows (ignored): config.rounds_per_epoch" in cfg.notes
    assert "data_location Dummy" in cfg.notes[0]
    (tmp_path / "config.yaml").write_text("run_id: x\nconfig: {rounds_per_epoch: 10}\n")
    with pytest.raises(ConfigError, match="unknown config field config.rounds_per_epoch"):
        load_run_config(tmp_path)


def test_psyche_fields_without_effect_are_accepted_in_yaml_too(tmp_path):
    (tmp_path / "config.yaml").write_text("run_id: x\nrun_state: WaitingForMembers\n"
                                          "model: {LLM: {cold_start_warmup_steps: 10}}\n")
    cfg = load_run_config(tmp_path)
    assert "model.LLM.cold_start_warmup_steps" in cfg.notes[0] and "run_state" in cfg.notes[0]


@needs_distro
def test_remote_and_dummy_data_train_on_the_bundled_sample():
    cfg = load_run_config(PSYCHE / "psyche-llama2-20m-dolma-noverify-first-checkpointer")  # Server = "host:port"
    assert cfg.data.train_dir.name == "sample" and "data_location Server" in cfg.notes[0]
    assert cfg.optimizer.clip_grad_norm == 0.0  # Distro's clip_grad_norm is an Option: absent = no clipping
    assert cfg.sync.mode == "demo" and cfg.sync.demo.topk == 8 and cfg.sync.demo.chunk == 64
    dummy = load_run_config(PSYCHE / "psyche-test")  # data_location = "Dummy", optimizer = "Dummy"
    assert dummy.data.train_dir.name == "sample" and "optimizer Dummy" in dummy.notes[0]


def test_adamw_without_clip_does_not_clip_in_psyche_mode_only():
    raw = _psyche_raw("elastic-nanogpt-20m-run")
    del raw["model"]["LLM"]["optimizer"]["AdamW"]["clip_grad_norm"]
    assert parse_run_config(raw, base_dir=Path("/"), psyche=True).optimizer.clip_grad_norm == 0.0
    assert parse_run_config(raw, base_dir=Path("/")).optimizer.clip_grad_norm == 1.0  # our YAML default


def test_other_architectures_and_bad_variants_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="architecture HfDeepseek is not supported"):
        load_run_config(PSYCHE / "psyche-consilience")
    raw = _psyche_raw("elastic-nanogpt-20m-run")
    raw["model"]["LLM"]["lr_schedule"] = {"Exponential": {"base_lr": 1.0}}
    with pytest.raises(ConfigError, match="lr_schedule must be one of"):
        parse_run_config(raw, base_dir=Path("/"), psyche=True)
    raw = _psyche_raw("elastic-nanogpt-20m-run")
    raw["model"]["LLM"]["checkpoint"] = {"Cloud": {}}
    with pytest.raises(ConfigError, match="checkpoint must be one of"):
        parse_run_config(raw, base_dir=Path("/"), psyche=True)


@needs_distro
def test_consilience_wsd_schedule_takes_effect():
    """Psyche's 40B run's WarmupStableDecay schedule, on our model (architecture swapped, data local)."""
    raw = _psyche_raw("psyche-consilience")
    raw["model"]["LLM"]["architecture"] = "HfLlama"
    raw["model"]["LLM"]["data_location"] = {"Local": str(ROOT / "data" / "sample")}
    cfg = parse_run_config(raw, base_dir=Path("/"), psyche=True)
    s = cfg.lr_schedule
    assert (s.kind, s.stable_steps, s.cosine_decay_steps, s.linear_decay_steps) == ("WarmupStableDecay", 161000,
                                                                                   150000, 12000)
    assert lr_at(1000, s) == pytest.approx(1e-4)
    assert lr_at(2000 + 161000 - 1, s) == 2e-4
    assert lr_at(2000 + 161000 + 75000, s) == pytest.approx(2e-5 + (2e-4 - 2e-5) * 0.5)
    assert lr_at(10**6, s) == 2e-5
    again = parse_run_config(cfg.to_dict(), base_dir=Path("/"))
    assert again.lr_schedule == s


def test_lr_schedules_match_psyche_definitions():
    """The values psyche_core's own tests (`definitions.rs`) assert."""
    const = LRScheduleConfig(kind="Constant", base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001)
    assert lr_at(5, const) == pytest.approx(0.001 + (0.01 - 0.001) * 0.5) and lr_at(1000, const) == 0.01
    linear = LRScheduleConfig(kind="Linear", base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001, total_steps=100,
                              final_lr=0.0001)
    assert lr_at(10, linear) == 0.01 and lr_at(55, linear) == pytest.approx(0.01 + (0.0001 - 0.01) * 0.5)
    assert lr_at(100, linear) == pytest.approx(0.0001) and lr_at(200, linear) == pytest.approx(0.0001)
    cosine = LRScheduleConfig(kind="Cosine", base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001, total_steps=110,
                              final_lr=0.0)
    assert lr_at(10, cosine) == 0.01 and lr_at(60, cosine) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_the_cli_names_the_fields_once(tmp_path, capsys):
    from hetero_testnet.cli.options import warn_config

    shutil.copytree(PSYCHE / "elastic-matformer-test", tmp_path / "c")
    warn_config(load_run_config(tmp_path / "c"))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and err.count("rounds_per_epoch") == 1 and err.count("run_state") == 1


def test_a_local_checkpoint_repo_takes_effect(tmp_path, tiny_config):
    """The 20M file's `checkpoint.Hub.repo_id = "./checkpoints/nanogpt-20m-init"`, made by `testnet init`:
    the run starts from it and, as in Psyche, takes the model's shape from it."""
    from hetero_testnet.model.checkpoint import write_initial_checkpoint
    from hetero_testnet.run.plan import plan_launch

    (tmp_path / "cfg").mkdir()
    text = (PSYCHE / "elastic-nanogpt-20m-run" / "state.toml").read_text()
    (tmp_path / "cfg" / "state.toml").write_text(text.replace('"./data/fineweb10B"', f'"{ROOT / "data" / "sample"}"'))
    assert "checkpoint Hub" in load_run_config(tmp_path / "cfg").notes[0]  # not there yet: from the seed
    init, _ = write_initial_checkpoint(tiny_config, 7, tmp_path / "cfg" / "checkpoints" / "nanogpt-20m-init")
    cfg = load_run_config(tmp_path / "cfg")
    assert cfg.init_checkpoint == init.resolve() and "checkpoint" not in cfg.notes[0]
    plan = plan_launch(num_clients=3, config_path=tmp_path / "cfg", logs_dir=tmp_path / "logs", name="p",
                       device="cpu", cores=3)
    assert plan.resume_checkpoint == init.resolve()
    assert plan.config.model == tiny_config.model.__class__(**{**_fields(tiny_config.model), "max_seq_len": 512})
    again = parse_run_config(plan.config.to_dict(), base_dir=Path("/"))
    assert again.init_checkpoint == init.resolve() and again.model == plan.config.model


def _fields(dc) -> dict:
    import dataclasses

    return {f.name: getattr(dc, f.name) for f in dataclasses.fields(dc)}

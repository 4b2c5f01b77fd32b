"""Checkpoints: bit-exact round trips, HF-style config, atomic replacement, one-line errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hetero_testnet.model.checkpoint as ckpt_mod
from hetero_testnet.model.checkpoint import (latest_checkpoint, load_checkpoint, load_checkpoint_meta,
                                             parameter_checksum, save_checkpoint, write_initial_checkpoint)
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.optim import MaskedAdamW


def _trained(tiny_config):
    model = build_model(tiny_config.model, seed=0)
    opt = MaskedAdamW(list(model.named_parameters()), tiny_config.optimizer)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step(1e-3, {})
    return model, opt


META = {"step": 7, "data_index": 42, "epoch": 1, "seed": 0, "rng": [1, 2, 3]}


def test_round_trip_is_bit_exact(tiny_config, logs_dir):
    model, opt = _trained(tiny_config)
    path = save_checkpoint(logs_dir / "ck", model, opt, META)
    ck = load_checkpoint(path)
    assert ck.model_config == tiny_config.model
    assert ck.meta == META
    for name, t in model.state_dict().items():
        assert ck.model_state[name].dtype == torch.float32 and torch.equal(ck.model_state[name], t), name
    for key, t in opt.state_dict().items():
        assert torch.equal(ck.optimizer_state[key], t), key
    rebuilt = ck.build_model()
    tokens = torch.randint(0, tiny_config.model.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))
    opt2 = MaskedAdamW(list(rebuilt.named_parameters()), tiny_config.optimizer)
    opt2.load_state_dict(ck.optimizer_state)


def test_layout_is_hugging_face_style(tiny_config, logs_dir):
    model, _ = _trained(tiny_config)
    path = save_checkpoint(logs_dir / "ck", model, None, {"step": 0})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "state.json"]
    cfg = json.loads((path / "config.json").read_text())
    m = tiny_config.model
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"]) == \
        (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads, m.num_attention_heads,
         m.vocab_size, m.max_seq_len)
    assert cfg["rms_norm_eps"] == m.rms_norm_eps and cfg["rope_theta"] == m.rope_theta
    assert "hetero_testnet" in cfg
    tensors = load_file(str(path / "model.safetensors"))
    assert set(tensors) == set(model.state_dict()) and "lm_head.weight" in tensors
    assert load_checkpoint(path).optimizer_state is None


def test_never_unpickles():
    source = inspect.getsource(ckpt_mod)
    assert "torch.load(" not in source and "pickle" not in source.replace("never pickled", "")


def test_resave_replaces_atomically_and_leaves_no_temporaries(tiny_config, logs_dir, monkeypatch):
    model, opt = _trained(tiny_config)
    target = logs_dir / "ck"
    save_checkpoint(target, model, opt, {"step": 1})
    save_checkpoint(target, model, None, {"step": 2})  # atomic exchange path
    assert load_checkpoint(target).meta == {"step": 2} and load_checkpoint(target).optimizer_state is None
    monkeypatch.setattr(ckpt_mod, "_renameat2_exchange", lambda a, b: False)  # two-rename fallback
    save_checkpoint(target, model, opt, {"step": 3})
    assert load_checkpoint(target).meta == {"step": 3}
    assert [p.name for p in logs_dir.iterdir()] == ["ck"]


def test_interrupted_save_keeps_previous_checkpoint(tiny_config, logs_dir, monkeypatch):
    model, opt = _trained(tiny_config)
    target = logs_dir / "ck"
    save_checkpoint(target, model, opt, {"step": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_save = ckpt_mod.save_file

    def save_then_interrupt(tensors, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt  # e.g. Ctrl-C while the optimizer state is being written
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model, opt, {"step": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in logs_dir.iterdir()] == ["ck"]


def test_load_errors_are_one_line_config_errors(tiny_config, logs_dir):
    model, _ = _trained(tiny_config)
    path = save_checkpoint(logs_dir / "ck", model, None, {"step": 0})

    def expect(match: str) -> None:
        with pytest.raises(ConfigError, match=match) as e:
            load_checkpoint(path)
        assert "\n" not in str(e.value)

    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(logs_dir / "missing")
    good_cfg = (path / "config.json").read_text()
    (path / "config.json").write_text("{not json")
    expect("not valid JSON")
    cfg = json.loads(good_cfg)
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    expect("shape")
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    expect("hidden_size")
    (path / "config.json").write_text(good_cfg)
    state = load_file(str(path / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(state, str(path / "model.safetensors"))
    expect("unexpected")
    (path / "model.safetensors").write_bytes(b"garbage")
    expect("safetensors")
    (path / "model.safetensors").unlink()
    expect("missing")


def test_initial_checkpoint_is_the_seeded_model(tiny_config, logs_dir):
    path, params = write_initial_checkpoint(tiny_config, 11, logs_dir / "init")
    ck = load_checkpoint(path)
    ref = build_model(tiny_config.model, 11)
    assert params == sum(p.numel() for p in ref.parameters())
    assert ck.meta["step"] == 0 and ck.meta["seed"] == 11 and ck.optimizer_state is None
    for name, t in ref.state_dict().items():
        assert torch.equal(ck.model_state[name], t), name


def test_latest_checkpoint_and_meta(tiny_config, logs_dir):
    model, _ = _trained(tiny_config)
    with pytest.raises(ConfigError, match="no checkpoint"):
        latest_checkpoint(logs_dir)
    save_checkpoint(logs_dir / "checkpoints" / "step-000004", model, None, {"step": 4})
    save_checkpoint(logs_dir / "checkpoints" / "step-000008", model, None, {"step": 8})
    (logs_dir / "checkpoints" / ".step-000012.tmp-1").mkdir()  # an interrupted save is ignored
    assert latest_checkpoint(logs_dir) == logs_dir / "checkpoints" / "step-000008"
    save_checkpoint(logs_dir / "checkpoint", model, None, {"step": 10})
    assert latest_checkpoint(logs_dir) == logs_dir / "checkpoint"
    assert load_checkpoint_meta(logs_dir / "checkpoint") == {"step": 10}
    assert isinstance(latest_checkpoint(str(logs_dir)), Path)


def test_parameter_checksum_sees_every_bit(tiny_config, logs_dir):
    model, opt = _trained(tiny_config)
    before = parameter_checksum(model)
    assert before == parameter_checksum(load_checkpoint(save_checkpoint(logs_dir / "ck", model, opt, META)).build_model())
    with torch.no_grad():
        w = dict(model.named_parameters())["model.norm.weight"]
        w.view(-1).view(torch.int32)[3] ^= 1  # flip the lowest mantissa bit of one element
    assert parameter_checksum(model) != before

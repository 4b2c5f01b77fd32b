"""Metrics export: events.jsonl -> TensorBoard and W&B (offline), read back by their own readers."""

from __future__ import annotations

import glob
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from hetero_testnet.errors import ConfigError
from hetero_testnet.events import read_events
from hetero_testnet.metrics.mapping import all_scalars

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "assets" / "events-sample.jsonl"  # tiny, tiers 0,1, 40 steps, kills and restarts


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "rec1"
    d.mkdir()
    shutil.copy(SAMPLE, d / "events.jsonl")
    return d


def test_the_mapping_covers_losses_throughput_time_and_faults():
    values, state = all_scalars(read_events(SAMPLE))
    by_tag: dict[str, list] = {}
    for s in values:
        by_tag.setdefault(s.tag, []).append(s)
    committed = [e for e in read_events(SAMPLE) if e["event"] == "step_committed"]
    assert len(by_tag["loss/train_tier0"]) == 40  # tier 1's client was killed: only the steps it trained
    assert len(by_tag["loss/train_tier1"]) == sum("1" in e["loss_by_tier"] for e in committed) > 0
    assert [s.step for s in by_tag["loss/train_tier0"]] == list(range(1, 41))
    assert {"loss/val_tier0", "loss/val_tier1", "throughput/tokens_per_sec", "time/step_wall(s)", "train/lr",
            "client1/loss", "client2/exchange_time(s)", "train/grad_norm"} <= set(by_tag)
    assert by_tag["faults/kills"][-1].value == 4 and by_tag["faults/restarts"][-1].value == 4
    assert by_tag["faults/discarded_steps"][-1].value == 2
    steps = [s.step for s in values]
    assert steps == sorted(steps)  # the x axis never goes back (W&B requires it)
    assert state.config["name"] == "rec1" and state.config["tiers"] == [0, 1]


def test_export_to_tensorboard_is_read_back_by_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hetero_testnet.cli.metrics import export_metrics

    export_metrics(run_dir, to="tensorboard", out=None)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train_tier0", "loss/train_tier1", "loss/val_tier0", "throughput/tokens_per_sec",
            "faults/kills"} <= tags
    train = acc.Scalars("loss/train_tier0")
    first = next(e for e in read_events(SAMPLE) if e["event"] == "step_committed")
    assert len(train) == 40 and train[0].step == 1
    assert train[0].value == pytest.approx(first["loss_by_tier"]["0"], rel=1e-6)
    assert train[0].wall_time == pytest.approx(first["ts"])


def wandb_history(run_root: Path) -> list[dict]:
    """The history rows of the offline W&B run under `run_root` (its `.wandb` file: a LevelDB-style log
    of protobuf `Record`s, 32 KiB blocks, 7-byte chunk headers; wandb >= 0.20 has no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_root / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, chunks, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_export_to_wandb_offline_holds_the_metrics(run_dir, monkeypatch, capsys):
    from hetero_testnet.cli.metrics import export_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    export_metrics(run_dir, to="wandb", out=None, wandb_project="p", wandb_group="g", wandb_entity=None)
    assert "mode=offline" in capsys.readouterr().out
    rows = wandb_history(run_dir)
    assert [r["_step"] for r in rows] == list(range(1, 41))
    last = next(e for e in reversed(read_events(SAMPLE)) if e["event"] == "step_committed")
    assert rows[-1]["loss/train_tier0"] == pytest.approx(last["loss_by_tier"]["0"])
    assert any("loss/val_tier1" in r for r in rows) and max(r.get("faults/kills", 0) for r in rows) == 4


def test_missing_packages_name_the_install_command(monkeypatch, run_dir):
    from hetero_testnet.metrics.sinks import require_tensorboard, require_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'hetero-testnet\[wandb\]'"):
        require_wandb()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'hetero-testnet\[tensorboard\]'"):
        require_tensorboard()


def test_wandb_runs_offline_without_an_api_key(monkeypatch, tmp_path):
    from hetero_testnet.metrics.sinks import wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_bad_export_input_is_a_config_error(tmp_path):
    from hetero_testnet.cli.metrics import export_metrics

    with pytest.raises(ConfigError, match="no events.jsonl"):
        export_metrics(tmp_path, to="tensorboard", out=None)
    with pytest.raises(ConfigError, match="--to must be one of"):
        export_metrics(tmp_path, to="csv", out=None)

"""Issue 15's acceptance run: Psyche's own `state.toml` for its 20M run (as published; only
`data_location` pointed at local shards) trains with `testnet start --num-clients 3 --tiers 0,1,1`,
streams its metrics to an offline W&B run, and `testnet export-metrics --to tensorboard` reads back.

One run serves all three checks: the 20M model on 3 clients is the slowest thing this suite starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testnet_helpers import ROOT, cli_cmd

pytestmark = pytest.mark.slow
PUBLISHED = ROOT / "tests" / "assets" / "psyche" / "elastic-nanogpt-20m-run" / "state.toml"
ORIGINAL_LOCATION = 'data_location = { Local = "./data/fineweb10B" }'


def test_psyche_20m_state_toml_trains_and_streams_metrics(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_metrics import wandb_history

    text = PUBLISHED.read_text()
    assert text.count(ORIGINAL_LOCATION) == 1
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "state.toml").write_text(
        text.replace(ORIGINAL_LOCATION, f'data_location = {{ Local = "{ROOT / "data" / "sample"}" }}'))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run(cli_cmd("start", "--config-path", str(tmp_path / "cfg"), "--num-clients", "3", "--tiers",
                               "0,1,1", "--total-steps", "2", "--headless", "--server-port", "0", "--logs-dir",
                               str(tmp_path / "logs"), "--name", "psyche20m", "--wandb-project", "p",
                               "--wandb-group", "g"),
                       capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("warning:") == 1 and "model.LLM.cold_start_warmup_steps" in r.stderr
    run_dir = tmp_path / "logs" / "psyche20m"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_completed"] == 2 and summary["replicas_identical"]
    assert set(summary["final_val_loss"]) == {"tier0", "tier1"}

    rows = wandb_history(run_dir)  # the live stream, from the launcher's follower
    logged = {k for row in rows for k in row}
    assert {"loss/train_tier0", "loss/train_tier1", "loss/val_tier0", "loss/val_tier1",
            "throughput/tokens_per_sec", "time/step_wall(s)"} <= logged
    assert sorted({row["_step"] for row in rows}) == [1, 2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    e = subprocess.run(cli_cmd("export-metrics", str(run_dir), "--to", "tensorboard"), capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert e.returncode == 0, e.stderr
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss/train_tier1")] == [1, 2]
    assert acc.Scalars("loss/val_tier0")[-1].value == pytest.approx(summary["final_val_loss"]["tier0"], rel=1e-6)

"""Shared fixtures: the tiny config (our `llama3_debugmodel`), its model, and a per-test logs dir."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG_DIR = ROOT / "configs" / "tiny"
SAMPLE_DATA_DIR = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def tiny_config():
    """`configs/tiny` loaded and validated (RunConfig); frozen, so sharing it is safe."""
    from hetero_testnet.config import load_run_config

    return load_run_config(TINY_CONFIG_DIR)


@pytest.fixture
def tiny_model(tiny_config):
    """A freshly initialised tiny NanoGPT (seed 0); a new one per test, so tests may mutate it."""
    from hetero_testnet.model.nanogpt import build_model

    return build_model(tiny_config.model, seed=0)


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    """An empty directory for a test's logs, checkpoints and run outputs."""
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test, whatever the handler was: a
    background job, `nohup` or a CI runner may start pytest with SIGINT ignored (SIG_IGN), and then
    a test that sends itself SIGINT would wait forever. The handler from before is put back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

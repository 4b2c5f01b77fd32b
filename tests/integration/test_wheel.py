"""The package installs: a wheel built from the checkout carries the configs and the sample data, and,
installed into a fresh virtual environment, runs `testnet start` from a directory outside the checkout.

The fresh environment gets the already-installed dependencies (torch, ...) through a `.pth` line pointing
at this interpreter's site-packages, so the test downloads nothing; the package itself comes only from
the wheel (the checkout's editable finder is not loaded there: `.pth` files of an added path are not run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BUNDLED = [
    "hetero_testnet/configs/nanogpt-20m-run/config.yaml",
    "hetero_testnet/configs/tiny/config.yaml",
    "hetero_testnet/configs/experiments/smoke.yaml",
    "hetero_testnet/configs/experiments/tier-mix.yaml",
    "hetero_testnet/data/NOTICE",
    "hetero_testnet/data/assets/gpt2.tiktoken",
    "hetero_testnet/data/sample/manifest.json",
    "hetero_testnet/data/sample/sample_train_000000.bin",
    "hetero_testnet/data/sample/sample_val_000000.bin",
    "hetero_testnet/configs/small/config.yaml",
    "hetero_testnet/configs/experiments/weak-clients.yaml",
    "hetero_testnet/data/pd8k/manifest.json",
    "hetero_testnet/data/pd8k/tokenizer.json",
    "hetero_testnet/data/pd8k/pd8k_train_000000.bin.xz",
    "hetero_testnet/data/pd8k/pd8k_val_000000.bin.xz",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, timeout=300, cwd=out)
    (found,) = out.glob("hetero_testnet-*.whl")
    return found


def test_the_wheel_carries_configs_data_and_tokenizer(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in BUNDLED if n not in names]
    assert not missing, f"missing from {wheel.name}: {missing}"


def test_an_installed_wheel_runs_from_any_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    where = subprocess.run([str(py), "-c", "import hetero_testnet, sys; print(hetero_testnet.__file__)"],
                           check=True, capture_output=True, text=True, cwd=work, env=env).stdout
    assert where.startswith(str(site)), f"imported from {where}, not from the installed wheel"

    script = [str(py), "-m", "hetero_testnet"]
    helptext = subprocess.run(script + ["start", "--help"], capture_output=True, text=True, cwd=work,
                              env={**env, "COLUMNS": "300"}, timeout=120)
    assert helptext.returncode == 0
    assert str(site / "hetero_testnet" / "configs" / "nanogpt-20m-run") in helptext.stdout

    run = subprocess.run(script + ["start", "--num-clients", "2", "--tiers", "0,1", "--config-path", "configs/tiny",
                                   "--headless", "--total-steps", "3", "--name", "w", "--server-port", "0"],
                         capture_output=True, text=True, cwd=work, env=env, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((work / "logs" / "w" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_completed"] == 3
    assert summary["replicas_identical"] is True

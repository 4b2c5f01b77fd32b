"""Behaviour fingerprint of the training path, for refactors that must change nothing.

Runs `testnet start --config-path configs/tiny --num-clients 3 --tiers 0,1,1 --helper-fractions 0,0.5,0
--headless --seed 5` and `testnet train --config configs/tiny --tier 1 --steps 6`, and prints the
per-step parameter checksums of the testnet run and a sha256 of both runs' final weights. Run it on
two commits of the same machine and `diff` the outputs: identical output means bit-identical training.
(Checksums depend on the CPU and BLAS build, so compare on one machine, never against stored values.)

    python benchmarks/fingerprint.py > before.txt; git checkout X; python benchmarks/fingerprint.py > after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

TESTNET = [sys.executable, "-m", "hetero_testnet"]


def weights_sha256(checkpoint: Path) -> str:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()[:16]


def step_checksums(run_dir: Path) -> dict[int, list[str]]:
    steps: dict[int, set[str]] = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "client_step":
            steps.setdefault(event["step"], set()).add(event["checksum"])
    return {step: sorted(sums) for step, sums in sorted(steps.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fingerprint-"))
    subprocess.run(TESTNET + ["start", "--config-path", "configs/tiny", "--num-clients", "3", "--tiers", "0,1,1",
                              "--helper-fractions", "0,0.5,0", "--headless", "--seed", "5", "--name", "fp",
                              "--server-port", "0", "--logs-dir", str(out / "logs")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(TESTNET + ["train", "--config", "configs/tiny", "--tier", "1", "--steps", "6", "--out",
                              str(out / "train")], check=True, stdout=subprocess.DEVNULL)
    run = out / "logs" / "fp"
    print("testnet steps:", step_checksums(run))
    print("testnet final:", weights_sha256(run / "checkpoint"))
    print("train final:", weights_sha256(out / "train" / "checkpoint"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# GPU check (issue 15): on a machine with a CUDA GPU, train the tiny and the 20M config with 3 clients
# on ONE GPU (tiers 0,1,1: gloo, since NCCL refuses two ranks on one device) and print tokens/s and
# whether the replicas stayed bit-identical, for both ways of feeding gloo CUDA tensors (staged through
# host memory here, or handed to gloo as device tensors). With 3+ GPUs it also runs one client per GPU
# (NCCL). Runs unchanged from a checkout with torch (CUDA build) and this package installed:
#   bash benchmarks/gpu_check.sh            # STEPS_TINY=8 STEPS_20M=20 OUT=/tmp/gpu-check to change
# GPU_CHECK_DEVICE=cpu CONFIGS=tiny runs the same matrix on CPU (a dry run of this script's plumbing).
# Exit code 0 only if every run finished with identical replicas.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
STEPS_TINY=${STEPS_TINY:-8}
STEPS_20M=${STEPS_20M:-20}
DEV=${GPU_CHECK_DEVICE:-cuda:0}
CONFIGS=${CONFIGS:-tiny nanogpt-20m-run}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - "$DEV" <<'PY' || exit 2
import sys, torch
if sys.argv[1] == "cpu":
    print(f"gpu_check: dry run on CPU (torch {torch.__version__})")
elif not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device (torch %s, cuda %s)" % (torch.__version__, torch.version.cuda))
else:
    print(f"gpu_check: torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PY
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: each run's line says whether its replicas stayed bit-identical (checksums compared every step)"

status=0
run() {  # run NAME CONFIG STEPS DEVICE STAGING
  local name=$1 config=$2 steps=$3 device=$4 staging=$5
  local t0=$SECONDS
  HETERO_TESTNET_GLOO_STAGING=$staging timeout 900 "$PY" -m hetero_testnet start --config-path "configs/$config" \
      --num-clients 3 --tiers 0,1,1 --device "$device" --total-steps "$steps" --headless --server-port 0 \
      --logs-dir "$OUT" --name "$name" > "$OUT/$name.out" 2>&1
  local rc=$?
  "$PY" - "$OUT/$name" "$rc" "$staging" "$((SECONDS - t0))" <<'PY' || status=1
import json, sys
from pathlib import Path
run, rc, staging, wall = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    s = json.loads((run / "summary.json").read_text())
except OSError:
    print(f"{run.name:28s} rc={rc} no summary (see {run}.out)")
    raise SystemExit(1)
print(f"{run.name:28s} rc={rc} status={s.get('status')} steps={s.get('steps_completed')}/{s.get('total_steps')} "
      f"tokens_per_sec={s.get('tokens_per_sec')} replicas_identical={s.get('replicas_identical')} "
      f"final_val_loss={s.get('final_val_loss')} staging={staging} wall_s={wall}")
raise SystemExit(0 if rc == 0 and s.get("status") == "finished" and s.get("replicas_identical") else 1)
PY
}

for config in $CONFIGS; do
  steps=$STEPS_20M; [[ $config == tiny ]] && steps=$STEPS_TINY
  for staging in host device; do  # 3 clients on one GPU: gloo, CUDA tensors staged here or handed to gloo
    run "$config-1gpu-$staging" "$config" "$steps" "$DEV" "$staging"
  done
  if [[ $DEV != cpu ]] && (( GPUS >= 3 )); then  # one client per GPU: NCCL
    run "$config-3gpu-nccl" "$config" "$steps" cuda host
  fi
done
echo "gpu_check: logs in $OUT; $( ((status == 0)) && echo ALL-IDENTICAL || echo SOME-RUN-FAILED )"
exit $status

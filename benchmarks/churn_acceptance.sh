#!/usr/bin/env bash
# Issue 11's acceptance: both churn commands (tiny, 3 clients at 0,1,1, 150 steps, one kill every 8 s
# among clients 2,3 / every 5 s among 1,2,3), 3 times each; per run one line: exit code, wall time,
# status, steps, identical replicas, kills, rejoins, rewinds (restores) and replayed steps, the
# lineage audit (run/audit.py: every step once, identical checksums, samples tiled), processes left.
#   benchmarks/churn_acceptance.sh [CHECKOUT]     # default: this checkout (run it from a frozen copy
#   VARIANTS="1,2,3:5" LOGS=/tmp/x benchmarks/churn_acceptance.sh   # if you edit code meanwhile)
cd "${1:-$(dirname "$0")/..}" || exit 2
logs=${LOGS:-/tmp/churn-accept}; rm -rf "$logs"; mkdir -p "$logs"
for variant in ${VARIANTS:-2,3:8 1,2,3:5}; do
  allowed=${variant%%:*}; interval=${variant##*:}
  for i in 1 2 3; do
    name="kill-${allowed//,/}-i${interval}-$i"; t0=$(date +%s)
    .venv/bin/testnet start --config-path configs/tiny --num-clients 3 --tiers 0,1,1 --headless --total-steps 150 \
      --random-kill-num 1 --random-kill-interval "$interval" --allowed-to-kill "$allowed" --logs-dir "$logs" \
      --name "$name" --server-port 0 > "$logs/$name.out" 2>&1 < /dev/null
    rc=$?; t1=$(date +%s)
    left=$(pgrep -f "$logs/$name" | wc -l)
    .venv/bin/python - "$logs/$name" "$rc" "$((t1-t0))" "$left" <<'PY'
import json, sys
from pathlib import Path
run, rc, secs, left = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = json.loads((run / "summary.json").read_text())
from hetero_testnet.events import read_events
from hetero_testnet.run.audit import audit
problems = audit(read_events(run / "events.jsonl"), 150)
print(f"{run.name}: rc={rc} {secs}s status={s['status']} steps={s['steps_completed']} identical={s['replicas_identical']} "
      f"kills={s['faults']['kills']} rejoins={s['rejoins']} restores={s['restores']} replayed={s['replayed_steps']} "
      f"audit={'ok' if not problems else problems[:3]} leftover_processes={left} val={s['final_val_loss']}")
PY
  done
done

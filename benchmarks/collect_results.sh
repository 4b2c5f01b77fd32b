#!/usr/bin/env bash
# Copy the small result files of an experiment's finished runs into docs/results/<name>/runs/
# (summary, events, resolved config, logs; never checkpoints), so that runs made in separate
# sittings add up, then regenerate the report from that copy.
#   benchmarks/collect_results.sh logs/tier-mix docs/results/tier-mix
set -euo pipefail
src=${1:?experiment logs dir}
dst=${2:?results dir}
mkdir -p "$dst/runs"
cp "$src"/experiment.json "$src"/experiment-config*.yaml "$src"/runs.jsonl "$dst/runs/"  # derived per-label configs too
for run in "$src"/*/; do
  name=$(basename "$run")
  [[ -f "$run/summary.json" ]] || continue
  grep -q '"status": "finished"' "$run/summary.json" || continue
  mkdir -p "$dst/runs/$name"
  cp "$run"/{summary.json,events.jsonl,config.yaml,coordinator.log,experiment-run.json} "$dst/runs/$name/"
  cp "$run"/client-*.log "$dst/runs/$name/"
  if [[ -f "$run/reused-from.txt" ]]; then cp "$run/reused-from.txt" "$dst/runs/$name/"; fi  # a run of another experiment
done
"$(dirname "$0")/../.venv/bin/testnet" experiment report "$dst/runs" --out "$dst"

#!/usr/bin/env bash
# The main job end to end on the embedded default model: set up, start the local cluster
# (coordinator + 2 workers, each pinned to its own core), send one request through gRPC with
# the hybrid schedule, write the PNG and the stats, and stop every process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
log=out/local-cluster.log
.venv/bin/hybridiff local --port 0 --metrics-port 0 > "$log" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "ready at" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "the local cluster failed to start" >&2; exit 1; }
  sleep 0.5
done
addr=$(grep -o "ready at [0-9.:]*" "$log" | awk '{print $3}')
echo "local cluster at $addr"
.venv/bin/hybridiff generate --target "$addr" --prompt "a red circle on the left" --mode hybrid --steps 30 \
  --out out/demo.png --stats-json out/demo-stats.json
.venv/bin/python - <<'PY'
import json
s = json.load(open("out/demo-stats.json"))
print(f"mode {s['mode_used']} on {', '.join(s['workers'])}: tau1={s['tau1']} ({s['tau1_source']}), tau2={s['tau2']}, "
      f"{s['data_plane_bytes']} bytes on the data plane, denoising {s['denoising_seconds']:.2f}s")
PY

#!/usr/bin/env bash
# The main job end to end on the embedded default model: set up, start the local cluster
# (coordinator + 2 workers, each pinned to its own core, the HTTP API and playground beside
# gRPC), send one prompt in HYBRID and the same request on one worker alone, print a short
# summary (hybridiff_launch/demo.py), and stop every process.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
echo "setting up .venv (log: out/setup.log) ..."
bash scripts/setup.sh > out/setup.log 2>&1 || { tail -n 40 out/setup.log; echo "setup failed: out/setup.log" >&2; exit 1; }
log=out/local-cluster.log
http_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "starting the local cluster (log: $log) ..."
.venv/bin/hybridiff local --port 0 --metrics-port 0 --http-port "$http_port" > "$log" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "ready at" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "the local cluster failed to start" >&2; exit 1; }
  sleep 0.5
done
addr=$(grep -o "ready at [0-9.:]*" "$log" | awk '{print $3}')
.venv/bin/python -m hybridiff_launch.demo --target "$addr"

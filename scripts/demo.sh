#!/usr/bin/env bash
# The main job end to end on the embedded default model: set up, generate one image with the
# hybrid schedule, print where it went and the schedule it used.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/hybridiff run --prompt "a red circle on the left" --mode hybrid --steps 30 \
  --out out/demo.png --stats-json out/demo-stats.json
.venv/bin/python - <<'PY'
import json
s = json.load(open("out/demo-stats.json"))
print(f"mode {s['mode_used']}: tau1={s['tau1']} ({s['tau1_source']}), tau2={s['tau2']}, "
      f"{s['data_plane_bytes']} bytes on the data plane, denoising {s['denoising_seconds']:.2f}s")
PY

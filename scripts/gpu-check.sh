#!/usr/bin/env bash
# The GPU end-to-end check: SDXL-base and SD3-medium shaped models (random fp16 weights,
# built once into ~/.cache/hybridiff/gpu-check) at 1024x1024 through a local cluster on the GPU(s),
# every mode eager and compiled, PSNR of each against SINGLE; one JSON (out/gpu-check/gpu_check.json)
# and a summary table. Needs a CUDA build of torch in the environment (scripts/setup.sh installs the
# CPU build: on a GPU host install torch for its CUDA first, or set PYTHON to such an interpreter).
#
#   scripts/gpu-check.sh                                 # GPU host: both models, eager + reduce-overhead
#   scripts/gpu-check.sh --archs sdxl --compile max-autotune
#   scripts/gpu-check.sh --device cpu                    # the dry run: tiny models, their small size, eager
#
# Extra arguments go to the check (`--help` lists them). Exit status: 0 every check passed; 1 a check
# failed (a request, a mode not run as asked, a constant image, a PSNR below its bound); 2 bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
exec "$py" -m hybridiff_tools.gpucheck.check "$@"

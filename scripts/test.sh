#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest -q "$@"

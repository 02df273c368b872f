#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the CPU build of
# torch (pinned first, so no CUDA build is pulled in), then this package with its test extras.
# The build step generates the gRPC/protobuf code from proto/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# promtool (Prometheus' own rule checker and rule unit tests) for the alert-rule tests: taken out of
# Debian's prometheus package into .venv/bin, without installing or starting the server. Best
# effort: without it those tests skip and say so.
if [ ! -x .venv/bin/promtool ] && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"; then
    cp "$tmp/x/usr/bin/promtool" .venv/bin/promtool
  else
    echo "setup: promtool not available (apt-get download prometheus failed); its tests will skip" >&2
  fi
  rm -rf "$tmp"
fi
# Debian's chromium and its driver for the playground test (tests/e2e/test_playground.py, selenium):
# best effort, as root only; without them that test skips and says so.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -qq chromium chromium-driver || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }; } >/dev/null 2>&1 \
    || echo "setup: chromium not installed (apt-get install chromium chromium-driver failed); the playground test will skip" >&2
fi

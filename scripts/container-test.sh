#!/usr/bin/env bash
# The container, proven: build the image on a local base and run the container tests
# (tests/k8s/test_image.py, tests/e2e/test_container.py). CI calls this after the test suite.
#
# Where Docker cannot run here (no engine and no way to install or start one, no root, an
# engine that cannot start a container), it prints "container tests skipped: <reason>" and
# exits 0. A failed build of the project's image, or a failed test, exits non-zero.
# A Docker engine this script starts is left running (its log: /var/log/hybridiff-dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
skip() {
  echo "container tests skipped: $*"
  exit 0
}
say() { echo "container-test: $*" >&2; }
as_root() { [ "$(id -u)" = 0 ]; }

engine_answers() { docker info >/dev/null 2>&1; }

install_missing() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  as_root || skip "${missing[*]} missing, and not root to install them"
  command -v apt-get >/dev/null || skip "${missing[*]} missing, and no apt-get to install them"
  say "installing ${missing[*]}"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
    >/var/tmp/hybridiff-apt.log 2>&1 \
    || skip "apt-get install ${missing[*]} failed: $(tail -1 /var/tmp/hybridiff-apt.log)"
}

start_engine() {
  as_root || skip "no Docker engine answers, and not root to start one"
  command -v dockerd >/dev/null || skip "no dockerd to start"
  say "starting dockerd"
  local log=/var/log/hybridiff-dockerd.log
  # setsid: the engine outlives this script, in a session of its own.
  setsid dockerd >"$log" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 1 120); do
    engine_answers && return 0
    kill -0 "$pid" 2>/dev/null || skip "dockerd exited at start: $(grep -m1 -iE 'level=(fatal|error)' "$log" || tail -1 "$log")"
    sleep 0.5
  done
  skip "dockerd did not answer within 60 s: $(tail -1 "$log")"
}

install_missing
engine_answers || start_engine
say "Docker engine $(docker info --format '{{.ServerVersion}}') answers"

rc=0
reason=$(mktemp)
CONTAINER_SKIP_FILE=$reason bash scripts/container-base.sh || rc=$?
[ "$rc" = 3 ] && skip "$(cat "$reason")"
rm -f "$reason"
[ "$rc" = 0 ] || { say "building the image failed"; exit "$rc"; }
say "images built at $((SECONDS - start)) s"

[ -x .venv/bin/python ] || bash scripts/setup.sh
export TRANSFORMERS_VERBOSITY=error HYBRIDIFF_CONTAINER_TEST=1 HYBRIDIFF_CONTAINER_IMAGE=hybridiff:test
export HYBRIDIFF_TEST_BASE_IMAGE=hybridiff-base:bookworm HYBRIDIFF_TEST_TORCH_SPEC=
rc=0
.venv/bin/python -m pytest -q -m slow -rs tests/k8s/test_image.py tests/e2e/test_container.py || rc=$?
say "done in $((SECONDS - start)) s"
exit "$rc"

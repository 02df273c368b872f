#!/usr/bin/env bash
# Build the project's image on a base built here, for a machine whose Docker engine can reach no
# image registry (idempotent: an image that exists is kept).
#
#   bash scripts/container-base.sh          # hybridiff-base:bookworm, then hybridiff:test
#
# 1. hybridiff-base:bookworm: Debian bookworm (debootstrap, minbase) with python3.11 in a venv
#    on PATH and the CPU build of torch. The torch wheel is what `pip download torch==VERSION`
#    finds with this machine's pip configuration (a local CPU wheel where one lies on disk); a
#    wheel that is not a CPU build is not used, and torch comes from TORCH_INDEX_URL instead.
#    The machine's CA bundle is the base's, and pip is told to use it, so that pip in a build
#    reaches the package index through whatever this machine reaches it through.
# 2. hybridiff:test: the project's Dockerfile on that base (BASE_IMAGE, torch kept), built with
#    the host's network.
#
# Environment: BASE_TAG, IMAGE_TAG, TORCH_VERSION, DEBIAN_MIRROR, TORCH_INDEX_URL,
# CA_BUNDLE, REBUILD=1 (build both images again). Exit status 3: the engine cannot start a
# container on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_TAG=${BASE_TAG:-hybridiff-base:bookworm}
IMAGE_TAG=${IMAGE_TAG:-hybridiff:test}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
HOST_PY=${PYTHON:-.venv/bin/python}
[ -x "$HOST_PY" ] || HOST_PY=python3
# The legacy builder: no buildx plugin is needed, and --network host applies to every RUN.
export DOCKER_BUILDKIT=0

say() { echo "container-base: $*" >&2; }

# Exit 3 where this machine cannot do it (the engine cannot start a container: no cgroups, no
# namespaces...; no root for debootstrap), which is not a fault of the image. The reason also
# goes to $CONTAINER_SKIP_FILE when that is set.
cannot() {
  say "$*"
  [ -z "${CONTAINER_SKIP_FILE:-}" ] || echo "$*" >"$CONTAINER_SKIP_FILE"
  exit 3
}

can_run_containers() {
  local out
  if ! out=$(docker run --rm --network none --entrypoint /bin/true "$1" 2>&1); then
    cannot "the Docker engine cannot start a container here: $(echo "$out" | tail -1)"
  fi
}

work=""
cleanup() {
  [ -z "$work" ] || rm -rf "$work"
  docker image rm -f hybridiff-base:rootfs >/dev/null 2>&1 || true
}
trap cleanup EXIT

build_base() {
  local rootfs ctx wheel
  [ "$(id -u)" = 0 ] || cannot "building $BASE_TAG needs root (debootstrap)"
  work=$(mktemp -d /var/tmp/hybridiff-base.XXXXXX)
  rootfs=$work/rootfs
  ctx=$work/ctx
  mkdir -p "$ctx"
  command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; return 1; }
  say "debootstrap bookworm (minbase) from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; return 1; }
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | docker import - hybridiff-base:rootfs >/dev/null
  can_run_containers hybridiff-base:rootfs

  say "torch==$TORCH_VERSION: looking for a CPU wheel (pip download)"
  if "$HOST_PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --dest "$ctx" "torch==$TORCH_VERSION" >"$work/pip.log" 2>&1; then
    wheel=$(cd "$ctx" && ls torch-*.whl 2>/dev/null | head -1)
    case "$wheel" in
      *+cpu-*) say "using $wheel" ;;
      *) say "not a CPU build (${wheel:-none}); torch comes from $TORCH_INDEX_URL"; rm -f "$ctx"/torch-*.whl ;;
    esac
  else
    say "pip download found no wheel; torch comes from $TORCH_INDEX_URL"
  fi
  cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
  cat >"$ctx/Dockerfile" <<EOF
FROM hybridiff-base:rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    VIRTUAL_ENV=/opt/venv \\
    LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY . /tmp/ctx
RUN python3 -m venv /opt/venv \\
 && if ls /tmp/ctx/torch-*.whl >/dev/null 2>&1; then pip install /tmp/ctx/torch-*.whl; \\
    else pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; fi \\
 && rm -rf /tmp/ctx \\
 && python -c "import torch; print('torch', torch.__version__)"
CMD ["python3"]
EOF
  say "building $BASE_TAG"
  docker build --network host -t "$BASE_TAG" "$ctx" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; return 1; }
}

if [ "${REBUILD:-0}" = 1 ]; then
  docker image rm -f "$IMAGE_TAG" "$BASE_TAG" >/dev/null 2>&1 || true
fi
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  say "$BASE_TAG is there"
  can_run_containers "$BASE_TAG"
else
  start=$SECONDS
  build_base
  say "$BASE_TAG built in $((SECONDS - start)) s"
fi

# Always built: the layer cache makes an unchanged tree quick, and a changed one is what is tested.
start=$SECONDS
previous=$(docker image inspect --format '{{.Id}}' "$IMAGE_TAG" 2>/dev/null || true)
say "building $IMAGE_TAG from the Dockerfile on $BASE_TAG"
log=$(mktemp /var/tmp/hybridiff-image-build.XXXXXX.log)
# The same build arguments as tests/k8s/test_image.py's build, so that its build is all cache.
if ! docker build --network host -t "$IMAGE_TAG" --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg TORCH_SPEC= \
    . >"$log" 2>&1; then
  tail -40 "$log" >&2
  say "docker build failed (the whole log: $log)"
  exit 1
fi
rm -f "$log"
say "$IMAGE_TAG built in $((SECONDS - start)) s"
# The image it replaces (its ~0.5 GB of dependencies) would otherwise pile up, one per change.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$IMAGE_TAG")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi

#!/usr/bin/env bash
# Build the release artefacts of the version in pyproject.toml; push nothing, print what would be.
#
#   bash scripts/release.sh            # into out/release/
#   REGISTRY=ghcr.io/me OUT=dist bash scripts/release.sh
#
# 1. checks: the chart's version and appVersion and hybridiff.__version__ equal the package
#    version, and CHANGELOG.md has an entry for it;
# 2. the wheel (pip wheel, no dependencies);
# 3. the image, where a Docker engine answers (OCI labels: version, revision, source); else the
#    command it would run;
# 4. the chart archive (helm package through helm-python-sdk; else the command it would run);
# 5. the push commands, printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-out/release}
REGISTRY=${REGISTRY:-REGISTRY}
SOURCE=${SOURCE:-https://github.com/kaist-dmlab/Hybridiff}

VERSION=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "note: the work tree has uncommitted changes; the image's revision label says ${REVISION}" >&2
fi
echo "hybridiff ${VERSION} (revision ${REVISION})"

# 1. versions agree, and the changelog names this one.
"$PY" - "$VERSION" <<'PY'
import re
import sys

version = sys.argv[1]
chart = open("k8s/helm/hybridiff/Chart.yaml").read()
found = {
    "Chart.yaml version": re.search(r"^version:\s*\"?([^\"\s]+)", chart, re.M).group(1),
    "Chart.yaml appVersion": re.search(r"^appVersion:\s*\"?([^\"\s]+)", chart, re.M).group(1),
    "hybridiff.__version__": re.search(
        r"^__version__ = \"([^\"]+)\"", open("hybridiff/__init__.py").read(), re.M
    ).group(1),
}
wrong = [f"{k} is {v}" for k, v in found.items() if v != version]
if not re.search(rf"^## \[{re.escape(version)}\]", open("CHANGELOG.md").read(), re.M):
    wrong.append(f"CHANGELOG.md has no '## [{version}]' entry")
if wrong:
    sys.exit(f"error: the package is {version}, but " + "; ".join(wrong))
PY
mkdir -p "$OUT"

# 2. the wheel.
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT" .
WHEEL=$(ls "$OUT"/hybridiff-"$VERSION"-*.whl)
echo "wheel: $WHEEL"

# 3. the image.
IMAGE="${REGISTRY}/hybridiff:${VERSION}"
BUILD=(docker build -t "$IMAGE" --build-arg "VERSION=${VERSION}" --build-arg "REVISION=${REVISION}"
       --build-arg "SOURCE=${SOURCE}" .)
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  "${BUILD[@]}"
  echo "image: $IMAGE"
else
  echo "image: no Docker engine here; would run: ${BUILD[*]}"
fi

# 4. the chart.
if CHART=$("$PY" -c "import helm_python, sys; print(helm_python.package('k8s/helm/hybridiff', destination=sys.argv[1]))" "$OUT" 2>/dev/null); then
  echo "chart: $CHART"
else
  CHART="$OUT/hybridiff-${VERSION}.tgz"
  echo "chart: no helm-python-sdk here; would run: helm package k8s/helm/hybridiff --destination $OUT"
fi

# 5. what a release would push (nothing is pushed).
echo "would push:"
echo "  python -m twine upload $WHEEL"
echo "  docker push $IMAGE"
echo "  helm push $CHART oci://${REGISTRY}/charts"

# One image for both roles (`hybridiff coordinator ...`, `hybridiff worker ...`); the only weights
# are the trained default model's (models/shapes-sdxl, ~19 MB), served when no --model is named.
#
# CPU (default):
#   docker build -t hybridiff:0.1.0 .
# GPU, on a CUDA PyTorch base (an official pytorch/pytorch:<version>-cuda<X.Y>-cudnn9-runtime
# tag, or your own) whose torch is kept (TORCH_SPEC empty):
#   docker build -t hybridiff:0.1.0-cuda \
#     --build-arg BASE_IMAGE=pytorch/pytorch:<tag> --build-arg TORCH_SPEC= .
# or on any base with Python, torch from a CUDA wheel index:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu<XY>
# Any base with Python >= 3.10, pip and useradd (or adduser) works. With no registry at all,
# `bash scripts/container-base.sh` builds a base here (debootstrap bookworm, a venv, CPU torch)
# and this image on it (hybridiff:test; scripts/container-test.sh then runs it hardened).
# Behind a mirror:
#   --build-arg PIP_INDEX_URL=https://mirror/simple --build-arg TORCH_INDEX_URL=
# OCI labels (scripts/release.sh sets them): --build-arg VERSION=0.1.0 --build-arg
#   REVISION=$(git rev-parse HEAD) [--build-arg SOURCE=https://github.com/OWNER/REPO]
ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- build: a wheel of this package, with the gRPC code generated from proto/ ---------------
FROM ${BASE_IMAGE} AS build
# A build argument is in the environment of RUN steps only: pip reads it there when it is set.
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto ./proto
COPY hybridiff ./hybridiff
COPY coordinator ./coordinator
COPY gpu_worker ./gpu_worker
COPY hybridiff_launch ./hybridiff_launch
COPY hybridiff_tools ./hybridiff_tools
# the trained default model: setup.py puts it into the package (hybridiff/models/shapes-sdxl)
COPY models/shapes-sdxl ./models/shapes-sdxl
# The [build-system] requirements from pyproject.toml (setuptools, grpcio-tools), then the
# gRPC code generated into the tree first, so that package discovery sees hybridiff.v1 and
# hybridiff.internal.v1, then the wheel.
RUN (python -c "import tomllib" 2>/dev/null || python -m pip install tomli) \
 && python -c "import sys; t = __import__('tomllib' if sys.version_info >= (3, 11) else 'tomli'); \
print('\n'.join(t.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" \
    > /tmp/build-requirements.txt
RUN python -m pip install -r /tmp/build-requirements.txt \
 && python -m hybridiff.codegen \
 && python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# -- runtime ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/kaist-dmlab/Hybridiff
LABEL org.opencontainers.image.title="hybridiff" \
      org.opencontainers.image.description="Hybrid data-pipeline parallel diffusion serving (coordinator and worker)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# torch first, so the CPU (or the chosen CUDA) build is what the package's torch>=2.4 finds.
# Empty TORCH_SPEC: keep the torch the base image already has.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN if [ -n "${TORCH_SPEC}" ]; then \
      python -m pip install ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "${TORCH_SPEC}"; \
    fi
COPY --from=build /wheels /wheels
RUN python -m pip install "$(ls /wheels/hybridiff-*.whl)[server]" && rm -rf /wheels

# Non-root, numeric (so Kubernetes' runAsNonRoot can verify it). The root filesystem is
# read-only in the manifests: caches go to /tmp, an emptyDir there.
RUN (groupadd --gid 10001 hybridiff || addgroup --gid 10001 hybridiff) \
 && (useradd --uid 10001 --gid 10001 --home-dir /home/hybridiff --create-home \
       --shell /usr/sbin/nologin hybridiff \
     || adduser --uid 10001 --ingroup hybridiff --home /home/hybridiff --disabled-password \
       --shell /usr/sbin/nologin hybridiff)
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/hybridiff \
    XDG_CACHE_HOME=/tmp/hybridiff-cache \
    HF_HOME=/tmp/hybridiff-cache/huggingface \
    TRANSFORMERS_VERBOSITY=error
USER 10001:10001
WORKDIR /home/hybridiff
# coordinator gRPC, coordinator metrics, worker control gRPC, worker data plane, worker metrics
EXPOSE 50051 9090 50061 50062 9091
ENTRYPOINT ["hybridiff"]
CMD ["--help"]

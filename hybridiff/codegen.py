"""Generate the gRPC/protobuf Python modules from proto/ with grpcio-tools (run by setup.py).

The .proto files under proto/hybridiff/ map onto Python packages of the same path: the public
API ``hybridiff.v1`` and the internal protocols ``hybridiff.internal.v1``. The generated code is
never committed or edited; each generated package records a digest of the sources it came from,
and ``assert_fresh()`` fails when they differ (a checkout whose generated code drifted).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PACKAGE_ROOT = PROTO_ROOT.parent
GENERATED_PACKAGES = ("hybridiff/v1", "hybridiff/internal/v1")


class StaleGeneratedCode(RuntimeError):
    """The generated modules do not match the .proto sources; rebuild (pip install -e .)."""


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.glob("hybridiff/**/*.proto"))


def proto_digest(root: Path = PROTO_ROOT) -> str:
    h = hashlib.sha256()
    for path in proto_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = PACKAGE_ROOT) -> None:
    # deferred: grpcio-tools is a build-time dependency only, not the installed package's.
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise SystemExit(f"no .proto files under {proto_root}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(f) for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    digest = proto_digest(proto_root)
    for package in GENERATED_PACKAGES:
        (out_root / package / "__init__.py").write_text(
            f'"""Generated from proto/{package} by hybridiff.codegen; do not edit."""\n'
            f'PROTO_DIGEST = "{digest}"\n'
        )
    (out_root / "hybridiff" / "internal" / "__init__.py").write_text(
        '"""Internal protocols (generated from proto/hybridiff/internal); not the public API."""\n'
    )


def assert_fresh() -> None:
    """Raise ``StaleGeneratedCode`` when the generated modules came from other .proto files."""
    from hybridiff import v1  # deferred: the generated package, absent until the build ran

    if proto_files() and v1.PROTO_DIGEST != proto_digest():
        raise StaleGeneratedCode(
            "the generated protobuf modules came from different .proto files; run "
            "`pip install -e .` or `python -m hybridiff.codegen`"
        )


if __name__ == "__main__":
    generate()
    sys.exit(0)

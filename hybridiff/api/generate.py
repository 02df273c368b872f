"""Generate hybridiff/api/v1/*_pb2*.py from proto/ with grpcio-tools (run by setup.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from hybridiff.api import PROTO_ROOT, proto_digest, proto_files

PACKAGE_ROOT = PROTO_ROOT.parent


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = PACKAGE_ROOT) -> None:
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise SystemExit(f"no .proto files under {proto_root}")
    out_dir = out_root / "hybridiff" / "api" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
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
    (out_dir / "__init__.py").write_text(
        '"""Generated from proto/ by hybridiff.api.generate; do not edit."""\n'
        f'PROTO_DIGEST = "{proto_digest(proto_root)}"\n'
    )


if __name__ == "__main__":
    generate()
    sys.exit(0)

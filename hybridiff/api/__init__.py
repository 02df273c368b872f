"""Generated gRPC/protobuf code (subpackage ``v1``, produced from proto/ by the build).

``proto_digest()`` hashes the .proto sources; the generated package records the digest it was
built from, and ``assert_fresh()`` fails when they differ (a checkout whose generated code
drifted from its .proto files).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.glob("hybridiff/api/v1/*.proto"))


def proto_digest(root: Path = PROTO_ROOT) -> str:
    h = hashlib.sha256()
    for path in proto_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class StaleGeneratedCode(RuntimeError):
    """The generated modules do not match the .proto sources; rebuild (pip install -e .)."""


def assert_fresh() -> None:
    from hybridiff.api import v1

    if not proto_files():
        return  # installed without sources: nothing to compare against
    if v1.PROTO_DIGEST != proto_digest():
        raise StaleGeneratedCode(
            "hybridiff/api/v1 was generated from different .proto files; run `pip install -e .` "
            "or `python -m hybridiff.api.generate`"
        )

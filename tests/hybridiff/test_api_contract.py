"""The public API's contract: buf lint, no breaking change since the last release's image
(api/hybridiff-v1.binpb), no internal names in it, and server reflection v1 (and v1alpha) for
outside clients such as grpcurl and buf curl."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2

from hybridiff import serving
from hybridiff.v1 import diffusion_pb2

ROOT = Path(__file__).resolve().parents[2]
RELEASE_IMAGE = ROOT / "api" / "hybridiff-v1.binpb"
BUF = Path(sys.executable).parent / "buf"
PUBLIC_SERVICE = "hybridiff.v1.DiffusionService"
INTERNAL_NAMES = ("hybridiff.internal", "WorkerControl", "TensorFrameHeader", "SessionRequest")
T = FieldDescriptor
# grpc/reflection/v1/reflection.proto as published in github.com/grpc/grpc-proto: message ->
# (field, number, type). grpcio-reflection ships only v1alpha; serving answers v1 with it.
REFLECTION_V1 = {
    "ServerReflectionRequest": [
        ("host", 1, T.TYPE_STRING),
        ("file_by_filename", 3, T.TYPE_STRING),
        ("file_containing_symbol", 4, T.TYPE_STRING),
        ("file_containing_extension", 5, T.TYPE_MESSAGE),
        ("all_extension_numbers_of_type", 6, T.TYPE_STRING),
        ("list_services", 7, T.TYPE_STRING),
    ],
    "ExtensionRequest": [("containing_type", 1, T.TYPE_STRING), ("extension_number", 2, T.TYPE_INT32)],
    "ServerReflectionResponse": [
        ("valid_host", 1, T.TYPE_STRING),
        ("original_request", 2, T.TYPE_MESSAGE),
        ("file_descriptor_response", 4, T.TYPE_MESSAGE),
        ("all_extension_numbers_response", 5, T.TYPE_MESSAGE),
        ("list_services_response", 6, T.TYPE_MESSAGE),
        ("error_response", 7, T.TYPE_MESSAGE),
    ],
    "FileDescriptorResponse": [("file_descriptor_proto", 1, T.TYPE_BYTES)],
    "ExtensionNumberResponse": [("base_type_name", 1, T.TYPE_STRING), ("extension_number", 2, T.TYPE_INT32)],
    "ListServiceResponse": [("service", 1, T.TYPE_MESSAGE)],
    "ServiceResponse": [("name", 1, T.TYPE_STRING)],
    "ErrorResponse": [("error_code", 1, T.TYPE_INT32), ("error_message", 2, T.TYPE_STRING)],
}


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- buf: lint and breaking changes -------------------------------------------------------------
def test_buf_lint_is_clean():
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_has_no_breaking_change_since_the_last_release():
    result = buf("breaking", "proto", "--against", str(RELEASE_IMAGE))
    assert result.returncode == 0, result.stdout + result.stderr


def _copy_of_protos(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def _delete_line(path: Path, line: str) -> None:
    text = path.read_text()
    assert f"\n  {line}\n" in text
    path.write_text(text.replace(f"\n  {line}\n", "\n"))


def test_buf_breaking_catches_a_deleted_public_field(tmp_path):
    tree = _copy_of_protos(tmp_path)
    _delete_line(tree / "proto/hybridiff/v1/diffusion.proto", "optional uint64 seed = 8;")
    result = buf("breaking", "proto", "--against", str(RELEASE_IMAGE), cwd=tree)
    assert result.returncode != 0
    assert '"seed"' in result.stdout and '"GenerateRequest"' in result.stdout, result.stdout


def test_internal_protocols_may_change(tmp_path):
    tree = _copy_of_protos(tmp_path)
    current = tmp_path / "current.binpb"  # every package, internal included
    assert buf("build", "proto", "-o", str(current), cwd=tree).returncode == 0
    internal = tree / "proto/hybridiff/internal/v1/dataplane.proto"
    field = re.search(r"^  ((optional |repeated )?[\w.]+ \w+ = \d+;)$", internal.read_text(), re.M)
    _delete_line(internal, field.group(1))  # its first field: breaking, were it public
    result = buf("breaking", "proto", "--against", str(current), cwd=tree)
    assert result.returncode == 0, result.stdout + result.stderr


def _public_files() -> Iterator[descriptor_pb2.FileDescriptorProto]:
    yield from descriptor_pb2.FileDescriptorSet.FromString(RELEASE_IMAGE.read_bytes()).file
    runtime = descriptor_pb2.FileDescriptorProto()
    diffusion_pb2.DESCRIPTOR.CopyToProto(runtime)  # what the generated code (and reflection) serves
    yield runtime


def test_public_descriptors_hold_no_internal_names():
    files = list(_public_files())
    assert [f.package for f in files] == ["hybridiff.v1", "hybridiff.v1"]
    for file in files:
        assert not [d for d in file.dependency if "internal" in d]
        data = file.SerializeToString()
        for name in INTERNAL_NAMES:
            assert name.encode() not in data, name
        assert [s.name for s in file.service] == ["DiffusionService"]


# --- reflection v1 ------------------------------------------------------------------------------
def _fields(message) -> list[tuple[str, int, int]]:
    return [(f.name, f.number, f.type) for f in message.fields]


def test_reflection_v1_is_v1alpha_on_the_wire():
    """Every v1 message has v1alpha's fields (names, numbers, types): v1 bytes parse as v1alpha."""
    v1alpha = reflection_pb2.DESCRIPTOR.message_types_by_name
    assert sorted(v1alpha) == sorted(REFLECTION_V1)
    for name, fields in REFLECTION_V1.items():
        assert _fields(v1alpha[name]) == fields, name
    derived = serving.reflection_v1_file()  # the file reflection serves for the v1 service itself
    assert (derived.name, derived.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    for message in derived.message_type:
        assert [(f.name, f.number, f.type) for f in message.field] == REFLECTION_V1[message.name]
        assert all(".v1alpha." not in f.type_name for f in message.field)


@pytest.fixture
def reflection_server() -> Iterator[int]:
    server = serving.new_server(4, [])
    serving.add_health_and_reflection(server, [PUBLIC_SERVICE])
    port = serving.bind(server, "127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def _ask(port: int, version: str, **request: str) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request through ``grpc.reflection.<version>``, as bytes of the v1alpha messages."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(answers) == 1
    return answers[0]


def _files(answer: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in answer.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services_and_resolves_symbols(reflection_server, version):
    answer = _ask(reflection_server, version, list_services="")
    assert {s.name for s in answer.list_services_response.service} == {
        PUBLIC_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    answer = _ask(reflection_server, version, file_containing_symbol=PUBLIC_SERVICE)
    files = _files(answer)
    assert [f.name for f in files] == ["hybridiff/v1/diffusion.proto"]
    assert [m.name for m in files[0].service[0].method] == [
        "Generate",
        "GenerateStream",
        "ListModels",
        "ClusterStatus",
    ]
    answer = _ask(reflection_server, version, file_containing_symbol="grpc.reflection.v1.ServerReflection")
    assert [f.package for f in _files(answer)] == ["grpc.reflection.v1"]


def test_reflection_describes_only_the_listed_services_files(reflection_server):
    """The internal protocols are imported here (as in the coordinator) yet not described."""
    from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc  # noqa: F401

    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    for request in (
        dict(file_containing_symbol="hybridiff.internal.v1.TensorFrameHeader"),
        dict(file_containing_symbol="hybridiff.internal.v1.WorkerControlService"),
        dict(file_by_filename="hybridiff/internal/v1/worker.proto"),
    ):
        assert _ask(reflection_server, "v1", **request).error_response.error_code == not_found
    server = serving.new_server(2, [])  # a worker lists its control service: then it is described
    serving.add_health_and_reflection(server, ["hybridiff.internal.v1.WorkerControlService"])
    port = serving.bind(server, "127.0.0.1:0")
    server.start()
    try:
        answer = _ask(port, "v1", file_containing_symbol="hybridiff.internal.v1.TensorFrameHeader")
    finally:
        server.stop(0)
    assert "hybridiff/internal/v1/dataplane.proto" in {f.name for f in _files(answer)}


def _buf_curl_or_skip() -> None:
    try:
        ok = buf("--version").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip(f"buf cannot run from {BUF} (install the [test] extra: buf-bin)")


def test_buf_curl_speaks_reflection_v1(reflection_server):
    """An outside client (buf curl, Go) that speaks only reflection v1 lists and describes the API."""
    _buf_curl_or_skip()
    base = ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"]
    url = f"http://127.0.0.1:{reflection_server}"
    services = buf(*base, "--list-services", url)
    assert services.returncode == 0, services.stderr
    assert PUBLIC_SERVICE in services.stdout.split()
    methods = buf(*base, "--list-methods", url)  # resolves every listed service's file
    assert methods.returncode == 0, methods.stderr
    assert f"{PUBLIC_SERVICE}/GenerateStream" in methods.stdout.split()
    check = buf(*base, "-d", '{"service": ""}', f"{url}/grpc.health.v1.Health/Check")
    assert check.returncode == 0, check.stderr
    assert "NOT_SERVING" in check.stdout

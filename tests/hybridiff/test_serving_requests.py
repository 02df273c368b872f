"""Requests the servers read themselves (``serving.ReadRequests``): bytes that do not parse are
INVALID_ARGUMENT, not grpcio's INTERNAL "Exception deserializing request!"; a
well-formed request is served as before. A real server on a loopback port; the client sends raw
bytes."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from hybridiff import serving

CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def address():
    server = serving.new_server(4, [])
    health = serving.add_health_and_reflection(server, ["x.Y"])
    health.set("", serving.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _raw_check(address: str, payload: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(CHECK)(payload, timeout=5)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x02\xff\xfe",  # field 1 (service, a string): two bytes of invalid UTF-8
        b"\x10\xff",  # field 2, a varint cut short
        b"\x0a\x09abc",  # field 1 announces 9 bytes, 3 follow
    ],
    ids=["invalid-utf8", "truncated-varint", "truncated-string"],
)
def test_malformed_requests_are_invalid_argument(address, payload):
    with pytest.raises(grpc.RpcError) as err:
        _raw_check(address, payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in err.value.details()


def test_a_well_formed_request_is_served(address):
    answer = health_pb2.HealthCheckResponse.FromString(
        _raw_check(address, health_pb2.HealthCheckRequest(service="").SerializeToString())
    )
    assert answer.status == serving.SERVING

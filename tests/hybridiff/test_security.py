"""The bearer-token interceptor (hybridiff/security.py) on a real gRPC server: a refused call is
answered before its request is read, and the admin methods take only the admin token."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hybridiff import serving
from hybridiff.security import BearerTokenInterceptor

SERVICE = "test.Echo"
ADMIN = f"/{SERVICE}/Admin"


class Reads:
    """Counts the requests the server deserialised (read)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> bytes:
        with self._lock:
            self.count += 1
        return data


def _server(interceptor: BearerTokenInterceptor, reads: Reads):
    def unary(request, context):
        return b"ok:" + request

    def server_stream(request, context):
        yield b"ok:" + request

    def bidi(requests, context):
        for request in requests:
            yield b"ok:" + request

    kw = dict(request_deserializer=reads, response_serializer=bytes)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "Admin": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    serving.add_reflection(server, [health.SERVICE_NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def serve():
    servers = []

    def start(token, admin_token=None):
        reads = Reads()
        server, port = _server(BearerTokenInterceptor(token, admin_token, [ADMIN]), reads)
        servers.append(server)
        return grpc.insecure_channel(f"127.0.0.1:{port}"), reads

    yield start
    for server in servers:
        server.stop(None)


def _call(channel: grpc.Channel, method: str, token: str | None):
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    kind = {"Unary": "unary_unary", "Admin": "unary_unary", "ServerStream": "unary_stream"}.get(method)
    path = f"/{SERVICE}/{method}"
    if kind == "unary_unary":
        return channel.unary_unary(path)(b"x", timeout=10, metadata=metadata)
    if kind == "unary_stream":
        return b"".join(channel.unary_stream(path)(b"x", timeout=10, metadata=metadata))
    return b"".join(channel.stream_stream(path)(iter([b"x"]), timeout=10, metadata=metadata))


def _code(channel, method, token) -> grpc.StatusCode:
    try:
        _call(channel, method, token)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Unary", "ServerStream", "Bidi"])
def test_a_refused_call_is_answered_before_its_request_is_read(serve, method):
    """Without this, a unary request (up to the message limit) is received and parsed first."""
    channel, reads = serve("s3cret")
    for token in (None, "wrong"):
        assert _code(channel, method, token) == grpc.StatusCode.UNAUTHENTICATED
    assert reads.count == 0, "the server read the request of a call it refused"
    assert _call(channel, method, "s3cret") == b"ok:x"
    assert reads.count == 1


def test_health_check_stays_open(serve):
    channel, _ = serve("s3cret", "adm1n")
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_watch_and_reflection_take_the_token(serve):
    """Streams a caller may hold open (each holds a server thread): before, open to every caller."""
    channel, _ = serve("s3cret")
    token = (("authorization", "Bearer s3cret"),)
    watch = health_pb2_grpc.HealthStub(channel).Watch
    with pytest.raises(grpc.RpcError) as err:
        next(watch(health_pb2.HealthCheckRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = watch(health_pb2.HealthCheckRequest(), timeout=10, metadata=token)
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    call.cancel()
    reflect = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as err:
        list(reflect(iter([b""]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(reflect(iter([b"\x3a\x00"]), timeout=10, metadata=token))  # list_services="": answered


# (token configured, admin token configured, token presented) -> (ordinary method, admin method)
OK, UNAUTH, DENIED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
ADMIN_CASES = [
    ("user", "adm1n", None, UNAUTH, UNAUTH),
    ("user", "adm1n", "user", OK, DENIED),
    ("user", "adm1n", "adm1n", OK, OK),
    ("user", "adm1n", "wrong", UNAUTH, UNAUTH),
    # The safe default: a token but no admin token configured: nobody reads the admin methods.
    ("user", None, "user", OK, DENIED),
    ("user", None, None, UNAUTH, UNAUTH),
    # Only an admin token: the ordinary methods are open, the admin methods are not.
    (None, "adm1n", None, OK, UNAUTH),
    (None, "adm1n", "adm1n", OK, OK),
]


@pytest.mark.parametrize("token,admin_token,presented,ordinary,admin", ADMIN_CASES)
def test_admin_methods_take_only_the_admin_token(serve, token, admin_token, presented, ordinary, admin):
    channel, reads = serve(token, admin_token)
    assert _code(channel, "Unary", presented) == ordinary
    assert _code(channel, "Admin", presented) == admin
    assert reads.count == [ordinary, admin].count(OK)

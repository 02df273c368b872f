"""What both server processes share: message limits, health and reflection, the TLS or plaintext
port, the ready file, signal handling and the one way an error leaves an RPC.

Reflection is served as ``grpc.reflection.v1`` (what current clients ask first: grpcurl, buf curl,
Postman) and as ``grpc.reflection.v1alpha`` (older clients). grpcio-reflection ships only v1alpha;
the v1 protocol is the same proto under another package (every message, field number and type is
equal, see tests/hybridiff/test_api_contract.py), so a v1 call's bytes parse as the v1alpha
messages and the one v1alpha servicer answers both method paths. Clients that describe the v1
service itself find its file, ``grpc/reflection/v1/reflection.proto``, derived from v1alpha's
descriptor by renaming the package, in a pool of its own (the default pool stays untouched).
Reflection describes the listed services' files and their imports, nothing else the process
happens to have imported (the coordinator's public port never shows the internal protocols).
"""

from __future__ import annotations

import heapq
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hybridiff import security
from hybridiff.errors import HybridiffError, InvalidArgument, PermissionDenied, TooManyCalls, to_status

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The control API (coordinator <-> worker) carries checkpoints: the latents, the scheduler's
# history and the last difference. For the largest SD3 request (2048 px, 4 images: 16 MiB of
# float32 latents) that is about 100 MiB, over MAX_MESSAGE_BYTES; this bound leaves room. It
# bounds what a worker sends (a step's checkpoint, the final latents and images) and what the
# coordinator receives from it.
CONTROL_MESSAGE_BYTES = 256 * 1024 * 1024
# What a worker's control port receives, from anyone: the coordinator's commands are a few KiB
# (a Begin with two prompts of MAX_PROMPT_CHARS), a checkpoint comes in parts of 1 MiB
# (hybridiff.checkpoint_parts). So no caller, authenticated or not, makes the worker buffer a
# large message (docs/design.md section 5).
CONTROL_RECEIVE_BYTES = 4 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TlsFiles = tuple[str | None, str | None, str | None]  # (cert, key, client CA)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
HEALTH_CHECK = security.HEALTH_CHECK_METHOD
# Streams that hold a server thread, doing no work, for as long as their caller keeps them open
# (grpcio's health Watch blocks its thread; reflection is a bidi stream). At most
# LINGERING_STREAMS of them run at once, so that they can never take the threads health Check
# and the API need; the next one gets RESOURCE_EXHAUSTED (TOO_MANY_CALLS) at once.
LINGERING_METHODS = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")
LINGERING_STREAMS = 4
HEALTH_THREADS = 4  # a probe port's: kubelet probes one at a time, a Check takes microseconds
HEALTH_MESSAGE_BYTES = 4096  # a HealthCheckRequest is a service name
# Streams one connection may hold open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): gRPC core
# refuses the next one (REFUSED_STREAM; ENHANCE_YOUR_CALM before the client acknowledged the
# setting; measured: 268 of 300 bodiless calls on one connection); a gRPC client queues its calls
# beyond it instead of failing them.
STREAMS_PER_CONNECTION = 32
# Calls made without credentials (health Check: the one method open without a token, or without
# the control plane's client certificate) run in OPEN_CALL_SLOTS slots of their own, on top of
# the server's: however many such calls a caller opens, the authenticated ones keep theirs.
OPEN_CALL_SLOTS = 4
# A unary call's request message must arrive within BODY_SECONDS of its headers (a client sends
# both at once); a call that sends headers only is cancelled then, and its thread freed. gRPC
# offers no such deadline of its own: a bodiless call would hold its thread for ever.
BODY_SECONDS = 5.0


# gRPC keepalive on both sides: a peer that stops answering (SIGSTOP, a partition, a dead node)
# is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, not after the kernel's TCP timeout
# (about 2 hours), and a silent stream does not hold a worker for that long.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000


def message_options(
    max_bytes: int = MAX_MESSAGE_BYTES, max_receive: int | None = None
) -> list[tuple[str, int]]:
    """Send up to ``max_bytes``; receive up to ``max_receive`` (default: the same); a longer
    message is refused with RESOURCE_EXHAUSTED."""
    receive = max_bytes if max_receive is None else max_receive
    return [("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", max_bytes)]


def keepalive_channel_options(
    time_ms: int = KEEPALIVE_TIME_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS
) -> list[tuple[str, int]]:
    """A client channel pings every ``time_ms`` (calls or not) and drops the connection, failing
    its calls with UNAVAILABLE, when a ping is not answered within ``timeout_ms``."""
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # gRPC core waits for a ping's ack for ping_timeout_ms (default 1 min): keepalive_timeout_ms
        # alone left a SIGSTOPped peer connected for over a minute.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def keepalive_server_options(
    time_ms: int = KEEPALIVE_TIME_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS
) -> list[tuple[str, int]]:
    """The server pings its clients likewise, and accepts their pings at the rate above (by
    default a gRPC server answers pings more often than every 5 minutes with GOAWAY)."""
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # see keepalive_channel_options
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min(time_ms, 1_000)),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        # Count open HTTP/2 streams, not stream objects the server has yet to free (the default
        # "overload protection" refused a fresh call on a busy but legitimate connection).
        ("grpc.http.overload_protection", 0),
    ]


def new_server(
    max_workers: int,
    interceptors: list,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_receive_bytes: int | None = None,
    lingering_streams: int = LINGERING_STREAMS,
    authenticated: Callable[[grpc.ServicerContext], bool] | None = None,
    open_slots: int = OPEN_CALL_SLOTS,
) -> grpc.Server:
    """A server that runs at most ``max_workers`` calls at once, each on a thread of its own: the
    next call is refused with RESOURCE_EXHAUSTED at once instead of waiting, unseen, for a thread
    (grpcio hands an admitted call to its thread pool, where it queues when every thread is held).
    Of those, at most ``lingering_streams`` (and at most half) are health Watch or reflection
    streams. Health Check calls that ``authenticated(context)`` does not vouch for (None: any)
    run in ``open_slots`` more, of their own. A unary request must arrive within BODY_SECONDS,
    and a malformed one is INVALID_ARGUMENT (``ReadRequests``).
    ``max_receive_bytes``: a smaller bound on received messages (the public API's requests, a
    worker's control commands)."""
    options = message_options(max_message_bytes, max_receive_bytes) + keepalive_server_options()
    if max_receive_bytes is not None:
        # gRPC checks a message's size only once it has arrived whole. With BDP probing the
        # HTTP/2 window grows to megabytes and an oversized request streams in regardless of the
        # limit (measured: 8 x 60 MiB requests, +250 MiB RSS); without it the window stays at
        # 64 KiB per stream, and the refused message is never read past it.
        options.append(("grpc.http2.bdp_probe", 0))

    def is_open(context: grpc.ServicerContext) -> bool:
        return authenticated is None or not authenticated(context)

    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers + open_slots, thread_name_prefix="grpc-server"),
        # Innermost: a call the other interceptors refuse (no token, wrong peer) takes no slot;
        # the request is read (ReadRequests) only once the call holds its slot.
        interceptors=[
            *interceptors,
            ConcurrencyLimit(LINGERING_METHODS, min(lingering_streams, max_workers // 2)),
            ConcurrencyLimit((HEALTH_CHECK,), open_slots, applies=is_open),
            ReadRequests(),
        ],
        options=options,
        maximum_concurrent_rpcs=max_workers + open_slots,
    )


class ConcurrencyLimit(grpc.ServerInterceptor):
    """At most ``limit`` calls at once of the methods whose names start with ``prefixes`` (and,
    with ``applies``, for which ``applies(context)`` holds); another is ended with TOO_MANY_CALLS
    (RESOURCE_EXHAUSTED) before its request is read. A slot is held from the moment the call's
    handler starts until the call ends, however it ends."""

    def __init__(
        self,
        prefixes: tuple[str, ...],
        limit: int,
        applies: Callable[[grpc.ServicerContext], bool] | None = None,
    ) -> None:
        self._prefixes = prefixes
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None
        self._limit = limit
        self._applies = applies

    def _take(self, context: grpc.ServicerContext) -> None:
        if self._applies is not None and not self._applies(context):
            return
        if self._slots is None or not self._slots.acquire(blocking=False):
            abort(context, TooManyCalls(f"at most {self._limit} such streams at once; retry later"))
        if not context.add_callback(self._slots.release):  # already over: nothing else will free it
            self._slots.release()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        return security.checked_handler(handler, self._take)


class _BodyWatch:
    """One thread for every server of the process: cancels each call whose request message has not
    arrived by its deadline (the call's thread, waiting for it, is then freed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, grpc.ServicerContext, list[bool]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, context: grpc.ServicerContext, seconds: float) -> list[bool]:
        """Cancel ``context`` in ``seconds`` unless the returned flag's [0] is set by then."""
        arrived = [False]
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._order), context, arrived))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grpc-body-watch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return arrived

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, context, arrived = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            if not arrived[0]:
                context.cancel()


_BODY_WATCH = _BodyWatch()


class ReadRequests(grpc.ServerInterceptor):
    """Unary requests read by the handler itself, as bytes: the message must arrive within
    ``seconds`` of the call (else the call is cancelled), and bytes that do not parse (invalid
    UTF-8 in a string, a truncated varint) end it with INVALID_ARGUMENT instead of grpcio's
    INTERNAL "Exception deserializing request!". Streamed requests are left as they are."""

    def __init__(self, seconds: float = BODY_SECONDS) -> None:
        self._seconds = seconds

    def _read(self, parse, requests, context: grpc.ServicerContext):
        arrived = _BODY_WATCH.watch(context, self._seconds)
        try:
            raw = next(requests, None)
        except grpc.RpcError:  # cancelled: by the watch, or by the client
            raw = None
        finally:
            arrived[0] = True
        if raw is None:
            if context.is_active():
                abort(context, InvalidArgument("request", "no request message"))
            return None
        if parse is None:
            return raw
        try:
            return parse(raw)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            abort(context, InvalidArgument("request", f"malformed message: {exc}"))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_unary or handler.unary_stream

        def run(requests, context):
            request = self._read(parse, requests, context)
            return None if request is None else behavior(request, context)

        def run_stream(requests, context):
            request = self._read(parse, requests, context)
            if request is not None:
                yield from behavior(request, context)

        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.stream_unary_rpc_method_handler(run, response_serializer=serialize)
        return grpc.stream_stream_rpc_method_handler(run_stream, response_serializer=serialize)


class HealthCheckOnly(grpc.ServerInterceptor):
    """Every method but health Check is refused with PERMISSION_DENIED before its request is read
    (a probe port: Watch would hold one of its few threads; nothing else belongs there)."""

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == HEALTH_CHECK:
            return continuation(handler_call_details)
        return security.denying_handler(None, PermissionDenied("this port answers health Check only"))


def health_server(
    address: str, health_servicer: health.HealthServicer, threads: int = HEALTH_THREADS
) -> tuple[grpc.Server, int]:
    """A plaintext server of its own for probes (kubelet's gRPC probes cannot speak TLS): health
    Check of ``health_servicer``'s statuses and nothing else, on threads no other call can take
    (a Check takes microseconds; a call beyond ``threads`` at once is refused, never queued).
    Not started; (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-health"),
        interceptors=[HealthCheckOnly(), ReadRequests()],
        options=message_options(HEALTH_MESSAGE_BYTES) + keepalive_server_options(),
        maximum_concurrent_rpcs=threads,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, server.add_insecure_port(address)


def add_health_and_reflection(server: grpc.Server, services: Iterable[str]) -> health.HealthServicer:
    """``grpc.health.v1`` (every service NOT_SERVING until the caller says otherwise) and reflection
    (v1 and v1alpha), which lists ``services``, health and both reflection services."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(services)
    for name in ["", *names]:
        servicer.set(name, NOT_SERVING)
    add_reflection(server, (*names, health.SERVICE_NAME))
    return servicer


def reflection_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: v1alpha's descriptor under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, REFLECTION_V1.rsplit(".", 1)[0]
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", new
    proto.options.java_package = f"io.{new}"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.ClearField("deprecated")  # v1alpha is deprecated, v1 is not
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{old}.", f".{new}.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
        method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    return proto


class _ServedDescriptors:
    """The descriptor pool reflection answers from: only the files of the listed services and
    their imports (a public port shows no internal schema merely because its process imported
    it), found in the default pool, else in the v1 reflection file's own pool."""

    def __init__(self, services: Iterable[str], *pools: descriptor_pool.DescriptorPool) -> None:
        self._services, self._pools = tuple(services), pools

    def _lookup(self, method: str, name: str):
        for pool in self._pools:
            try:
                return getattr(pool, method)(name)
            except KeyError:
                continue
        raise KeyError(name)

    def _files(self) -> set[str]:
        todo = []
        for service in self._services:
            try:
                todo.append(self._lookup("FindFileContainingSymbol", service))
            except KeyError:
                continue  # its module is not imported (yet)
        files: set[str] = set()
        while todo:
            file = todo.pop()
            if file.name not in files:
                files.add(file.name)
                todo.extend(file.dependencies)
        return files

    def _served(self, file: FileDescriptor) -> FileDescriptor:
        if file.name not in self._files():
            raise KeyError(file.name)
        return file

    def FindFileByName(self, name: str) -> FileDescriptor:  # noqa: N802 (the pool's API)
        return self._served(self._lookup("FindFileByName", name))

    def FindFileContainingSymbol(self, name: str) -> FileDescriptor:  # noqa: N802
        return self._served(self._lookup("FindFileContainingSymbol", name))

    def FindMessageTypeByName(self, name: str) -> Descriptor:  # noqa: N802
        message = self._lookup("FindMessageTypeByName", name)
        self._served(message.file)
        return message

    def FindExtensionByNumber(self, message: Descriptor, number: int) -> FieldDescriptor:  # noqa: N802
        extension = message.file.pool.FindExtensionByNumber(message, number)
        self._served(extension.file)
        return extension

    def FindAllExtensions(self, message: Descriptor) -> list[FieldDescriptor]:  # noqa: N802
        files = self._files()
        return [e for e in message.file.pool.FindAllExtensions(message) if e.file.name in files]


def add_reflection(server: grpc.Server, services: Iterable[str]) -> None:
    """Server reflection of ``services`` (and of itself) as ``grpc.reflection.v1`` and ``v1alpha``."""
    listed = (*services, REFLECTION_V1, REFLECTION_V1ALPHA)
    v1_pool = descriptor_pool.DescriptorPool()
    v1_pool.Add(reflection_v1_file())
    pool = _ServedDescriptors(listed, descriptor_pool.Default(), v1_pool)
    servicer = reflection.ReflectionServicer(listed, pool=pool)
    for service in (REFLECTION_V1ALPHA, REFLECTION_V1):
        # v1 requests are read as, and v1 responses written from, the v1alpha messages (same wire form).
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def bind(server: grpc.Server, address: str, tls: TlsFiles = (None, None, None)) -> int:
    """Listen on ``address`` with TLS when a certificate is given (mutual with a client CA); the port."""
    credentials = security.server_credentials(*tls)
    return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)


def write_ready_file(path: str | Path | None, data: dict) -> None:
    """Publish ``data`` (bound ports and addresses) atomically, for launchers and tests."""
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def on_termination(callback: Callable[[], None]) -> None:
    """Run ``callback`` on SIGTERM or SIGINT (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def abort(context: grpc.ServicerContext, exc: HybridiffError) -> None:
    """End the RPC with the error's status code, message and ``google.rpc`` details."""
    context.abort_with_status(to_status(exc))

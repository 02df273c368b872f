"""The Python clients of the public API (``hybridiff.v1``), light: grpcio, protobuf, Pillow and
the OpenTelemetry API only.

``DiffusionClient(target).generate(prompt=..., num_images=2, seed=7)`` returns a ``Generation``:
the images (PIL), the seed used and the run's statistics; ``AsyncDiffusionClient`` (``grpc.aio``)
is the same API awaited; both build requests and call metadata in one place (``_Client``). Every
call has a deadline (``timeout``, 300 s unless given); a refused connection or an unknown host
fails at once, each with its own message, and a target that does not answer fails within
``connect_timeout`` seconds; a coordinator that stops answering mid-call (stopped, partitioned, a
dead node) fails the call within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS (keepalive pings), not
at its deadline, and a lost connection says so. Failures raise the typed errors of ``hybridiff.errors``
(``InvalidArgument`` names its field, read from the status details, never from text). Tracing
goes through the OpenTelemetry API: the host application configures (or not) the SDK; the client
installs nothing.

Several coordinators: ``target`` may name several (``"host1:50051,host2:50051"`` or a list). A
request fixes its request id and seed on this side when they are unset, so any attempt makes
the same image, and one that fails with UNAVAILABLE (a coordinator killed, stopped past the
keepalive, draining, unreachable) before its result is sent again, on the next target, within the
call's one deadline (``attempts`` in all, default one more than the targets; with a single target,
such as a Kubernetes Service, the next attempt opens a new connection, which may reach another
replica). Only the final result counts as one: progress events do not, so a request whose
coordinator died after some steps is retried from the start (``on_progress`` then sees the steps
again) and gives the same image. Every attempt lost ends in one ``Unavailable`` naming each target.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import ipaddress
import os
import re
import secrets
import socket
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from PIL import Image

from hybridiff import security
from hybridiff.errors import HybridiffError, Unavailable, WorkerFailed, from_rpc_error, status_details
from hybridiff.protocol import Mode, OutputFormat, Phase, WindowGuidance, label
from hybridiff.request import request_from_names
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc

TARGET_ENV = "HYBRIDIFF_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Keepalive: the channel pings the coordinator every KEEPALIVE_TIME_MS, calls or not, and drops the
# connection (failing its calls with UNAVAILABLE) when a ping is unanswered for KEEPALIVE_TIMEOUT_MS.
# The coordinator accepts pings this often (hybridiff.serving.keepalive_server_options).
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC core waits for a ping's ack for ping_timeout_ms (default 1 min) as well.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_tracer = trace.get_tracer("hybridiff.client")


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def parse_targets(target: str | Sequence[str] | None) -> list[str]:
    """The coordinators of ``target``: a list, or one string of comma-separated HOST:PORT
    (default ``$HYBRIDIFF_TARGET``, else 127.0.0.1:50051)."""
    if target is None or (isinstance(target, str) and not target.strip()):
        target = default_target()
    parts = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in parts if t and t.strip()]
    if not targets:
        raise ValueError(f"no coordinator address in {target!r}")
    return targets


def pinned(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """``request`` with its request id and seed fixed (a copy, when either was unset): every
    attempt of it, on any coordinator, makes the same image."""
    if request.request_id and request.HasField("seed"):
        return request
    fixed = pb.GenerateRequest()
    fixed.CopyFrom(request)
    if not fixed.request_id:
        fixed.request_id = uuid.uuid4().hex
    if not fixed.HasField("seed"):
        fixed.seed = secrets.randbits(63)
    return fixed


class PlaintextTokenWarning(UserWarning):
    """A bearer token is about to travel unencrypted to a host other than this one."""


def _host_and_port(target: str) -> tuple[str, str]:
    """The host and port (empty when none) of a gRPC target such as ``127.0.0.1:50051``,
    ``[::1]:50051``, ``dns:///localhost:50051`` or ``ipv4:127.0.0.1:50051``."""
    rest = re.sub(r"^(dns:(//[^/]*)?/|ipv4:|ipv6:)", "", target)
    if rest.startswith("["):
        end = rest.find("]")
        return rest[1:end], rest[end + 2 :] if rest[end + 1 : end + 2] == ":" else ""
    if rest.count(":") == 1:
        host, port = rest.split(":")
        return host, port
    return rest, ""


def is_loopback(target: str) -> bool:
    """Whether a gRPC target stays on this host: a Unix socket, ``localhost`` or a loopback IP
    (``127.0.0.1:50051``, ``[::1]:50051``, ``dns:///localhost:50051``, ``ipv4:127.0.0.1:50051``)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host, _ = _host_and_port(target)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def why_unreachable(target: str, timeout: float = 1.0) -> str:
    """Why a channel to ``target`` failed, in words: an unknown host, a refused connection, or a
    server that accepts connections yet not this channel (checked by a DNS lookup and one TCP
    connect of at most ``timeout`` seconds)."""
    host, port = _host_and_port(target)
    if target.startswith(("unix:", "unix-abstract:")) or not port.isdigit():
        return f"cannot connect to {target}"
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"unknown host {host!r}: the name does not resolve ({getattr(exc, 'strerror', exc)})"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ConnectionRefusedError:
        return f"connection refused by {target}: nothing listens there (is the service running?)"
    except OSError as exc:
        return f"cannot connect to {target}: {exc.strerror or exc}"
    return (
        f"{target} accepts TCP connections but the gRPC channel failed "
        "(TLS on one side only, or not a gRPC server?)"
    )


def _name(enum: type[Mode | Phase | WindowGuidance], value: int) -> str:
    """The CLI name of a proto enum value ("hybrid", "data-parallel"); "" when unset or unknown."""
    try:
        return label(enum(value))
    except ValueError:
        return ""


@dataclass
class Generation:
    """A finished request: its id and seed, the encoded images, and the run's statistics.

    ``stats`` is the protobuf message (``stats.mode_used`` is the enum's number); ``mode``,
    ``window_guidance``, ``phases``, ``tau1`` and ``tau2`` give the same facts by name:
    ``"hybrid"``, ``"conditional"``, ``["data-parallel", ..., "pipeline", ...]``, or None for a
    window that never opened."""

    response: pb.GenerateResponse

    @property
    def request_id(self) -> str:
        return self.response.request_id

    @property
    def seed(self) -> int:
        return self.response.seed

    @property
    def stats(self) -> pb.GenerateStats:
        return self.response.stats

    @property
    def mode(self) -> str:
        """The mode the request ran in: "single", "cfg-parallel", "pipeline" or "hybrid"."""
        return _name(Mode, self.stats.mode_used)

    @property
    def window_guidance(self) -> str:
        """The pipeline window's prediction ("conditional", ...); "" when the mode has no window."""
        return _name(WindowGuidance, self.stats.window_guidance)

    @property
    def phases(self) -> list[str]:
        """Each step's phase by name, in order."""
        return [_name(Phase, step.phase) for step in self.stats.steps]

    @property
    def tau1(self) -> int | None:
        """The pipeline window's first step; None when no window was opened."""
        return self.stats.tau1 if self.stats.HasField("tau1") else None

    @property
    def tau2(self) -> int | None:
        """The pipeline window's last step; None when no window was opened."""
        return self.stats.tau2 if self.stats.HasField("tau2") else None

    @property
    def data(self) -> list[bytes]:
        """Each image's bytes as the server encoded them (or raw latents)."""
        return [image.data for image in self.response.images]

    @property
    def images(self) -> list[Image.Image]:
        """The decoded images (empty for raw latents)."""
        return [
            Image.open(io.BytesIO(image.data))
            for image in self.response.images
            if image.mime_type.startswith("image/")
        ]


ProgressCallback = Callable[[pb.StepProgress], object]
_Result = TypeVar("_Result")


class _Client(ABC, Generic[_Result]):
    """What the sync and async clients share: target, credentials, deadlines, the request built
    from ``generate``'s keywords, and the metadata of every call (token, trace context)."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        channel: grpc.Channel | grpc.aio.Channel | None = None,
        attempts: int | None = None,
    ) -> None:
        """``target``: HOST:PORT (default ``$HYBRIDIFF_TARGET``, else 127.0.0.1:50051). Plaintext by
        default; TLS with ``tls_ca`` (mutual with ``tls_cert``/``tls_key``); a bearer ``token`` rides
        on TLS as call credentials, or in metadata on a plaintext channel. Several coordinators:
        a list or comma-separated targets; ``attempts``: how often a request is sent before its
        UNAVAILABLE is final (default one more than the targets; 1: never again)."""
        self.targets = parse_targets(target)
        self.target = self.targets[0]
        self.attempts = attempts if attempts is not None else len(self.targets) + 1
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        self.timeout, self.connect_timeout = timeout, connect_timeout
        creds = security.channel_credentials(tls_ca, tls_cert, tls_key)
        self._metadata: list[tuple[str, str]] = []
        if token and creds:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(security.TokenAuth(token))
            )
        elif token:
            self._metadata.append(("authorization", f"Bearer {token}"))
            if remote := [t for t in self.targets if not is_loopback(t)]:
                warnings.warn(
                    f"the bearer token goes to {', '.join(remote)} over plaintext: anyone on the path can "
                    "read and reuse it (pass tls_ca to use TLS)",
                    PlaintextTokenWarning,
                    stacklevel=2,
                )
        self._creds = creds
        self.channel = channel if channel is not None else self._open_channel(creds)
        self.stub = diffusion_pb2_grpc.DiffusionServiceStub(self.channel)
        self._connected = False
        self._failover_lock = threading.Lock()
        self._retired: list = []  # channels failed over from, closed with the client

    def _next_target(self, failed) -> None:
        """Go on with the next target, on a new channel (with one target, a new connection to
        it: behind a Service, maybe another replica), unless another call of this client has
        already left ``failed``, the channel its attempt used. The old channel is closed with the
        client, not now: calls still running on it (a draining coordinator's) go on."""
        with self._failover_lock:
            if self.channel is not failed:
                return
            self._retired.append(self.channel)
            self.target = self.targets[(self.targets.index(self.target) + 1) % len(self.targets)]
            self.channel = self._open_channel(self._creds)
            self.stub = diffusion_pb2_grpc.DiffusionServiceStub(self.channel)
            self._connected = False

    def _retry(self, error: Unavailable, attempt: int, deadline: float, lost: list[str]) -> bool:
        """Whether a request that failed with ``error`` on ``self.target`` is sent again."""
        lost.append(f"{self.target}: {error}")
        return attempt + 1 < self.attempts and deadline - time.monotonic() > 0

    def _all_lost(self, lost: list[str], error: Unavailable) -> Unavailable:
        """The one error of a request that every attempt lost."""
        if len(lost) == 1:
            return error
        return Unavailable(f"no coordinator could run the request ({len(lost)} attempts): " + "; ".join(lost))

    @abstractmethod
    def _open_channel(self, creds: grpc.ChannelCredentials | None):
        """The channel to ``self.target`` (sync or asyncio)."""

    @abstractmethod
    def _generate(
        self, request: pb.GenerateRequest, timeout: float | None, on_progress: ProgressCallback | None
    ) -> _Result:
        """Stream ``request``; a ``Generation`` (or an awaitable of one)."""

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        mode: str | Mode = Mode.AUTO,
        hybrid: dict[str, int | float] | None = None,
        window_guidance: str | int = 0,
        output_format: str | OutputFormat = OutputFormat.PNG,
        quality: int = 0,
        model: str = "",
        request_id: str = "",
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> _Result:
        """Generate ``num_images`` images of ``prompt``: a ``Generation`` (awaited, for the async
        client). Unset arguments take the model's defaults; ``mode``, ``window_guidance`` and
        ``output_format`` take enums or their CLI names ("cfg-parallel", "last-difference",
        "webp"). ``on_progress`` sees every step."""
        request = request_from_names(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            mode=mode,
            hybrid=hybrid,
            window_guidance=window_guidance,
            output_format=output_format,
            quality=quality,
            num_images=num_images,
            request_id=request_id,
            model=model,
        )
        return self._generate(request, timeout, on_progress)

    def _call_metadata(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the caller's span, if its application traces
        return self._metadata + list(carrier.items())

    def _error(self, err: grpc.RpcError) -> HybridiffError:
        """The typed error of a failed call. UNAVAILABLE without the coordinator's error details
        is the transport's (a coordinator killed, stopped past the keepalive timeout, or cut off):
        said as a lost connection instead of gRPC's "Stream removed" or "Socket closed"."""
        if err.code() == grpc.StatusCode.UNAVAILABLE and "ErrorInfo" not in status_details(err):
            return Unavailable(
                f"lost the connection to the coordinator at {self.target} ({err.details() or 'no details'}); "
                "the request may not have finished: retry it"
            )
        return from_rpc_error(err)

    def _unreachable(self, failed: bool) -> Unavailable:
        """``failed``: the channel went to TRANSIENT_FAILURE (refused, unknown host, handshake),
        else it did not connect within the connect timeout."""
        if failed:
            return Unavailable(why_unreachable(self.target))
        return Unavailable(f"cannot reach {self.target} within {self.connect_timeout:g}s")


class DiffusionClient(_Client[Generation]):
    """The blocking client: ``generate`` returns a ``Generation``."""

    def _open_channel(self, creds: grpc.ChannelCredentials | None) -> grpc.Channel:
        if creds:
            return grpc.secure_channel(self.target, creds, options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def _generate(
        self, request: pb.GenerateRequest, timeout: float | None, on_progress: ProgressCallback | None
    ) -> Generation:
        return Generation(self.generate_request(request, timeout=timeout, on_progress=on_progress))

    def generate_request(
        self,
        request: pb.GenerateRequest,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> pb.GenerateResponse:
        """Stream one request; ``on_progress`` sees every step. Raises ``HybridiffError``. Sent
        again on the next target when it fails with UNAVAILABLE (see the module's doc)."""
        request = pinned(request)
        deadline = time.monotonic() + (timeout or self.timeout)
        lost: list[str] = []
        for attempt in range(self.attempts):
            used = self.channel
            try:
                return self._stream_once(request, max(0.001, deadline - time.monotonic()), on_progress)
            except Unavailable as error:
                if not self._retry(error, attempt, deadline, lost):
                    raise self._all_lost(lost, error) from None
                self._next_target(used)
        raise AssertionError("unreachable")

    def _stream_once(
        self, request: pb.GenerateRequest, timeout: float, on_progress: ProgressCallback | None
    ) -> pb.GenerateResponse:
        with _tracer.start_as_current_span("hybridiff.client.generate"):
            events = self._call(self.stub.GenerateStream, pb.GenerateStreamRequest(request=request), timeout)
            try:
                for event in events:
                    if not event.HasField("progress"):
                        return event.result
                    if on_progress:
                        on_progress(event.progress)
            except grpc.RpcError as err:
                raise self._error(err) from None
        raise WorkerFailed("the stream ended without a result")

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatusResponse:
        return self._call(self.stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)

    def _connect(self) -> None:
        """Wait until the channel is ready: fail at once when it goes to TRANSIENT_FAILURE (a refused
        connection, an unknown host), after ``connect_timeout`` when it stays connecting."""
        if self._connected:
            return
        changed = threading.Condition()
        states: list[grpc.ChannelConnectivity] = []

        def watch(state: grpc.ChannelConnectivity) -> None:
            with changed:
                states.append(state)
                changed.notify_all()

        done = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        deadline = time.monotonic() + self.connect_timeout
        self.channel.subscribe(watch, try_to_connect=True)
        try:
            with changed:
                while not (states and states[-1] in done) and (left := deadline - time.monotonic()) > 0:
                    changed.wait(left)
                state = states[-1] if states else None
        finally:
            self.channel.unsubscribe(watch)
        if state != grpc.ChannelConnectivity.READY:
            raise self._unreachable(state == grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        self._connected = True

    def _call(self, method, request, timeout: float | None):
        self._connect()
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._call_metadata())
        except grpc.RpcError as err:
            raise self._error(err) from None

    def close(self) -> None:
        for channel in [*self._retired, self.channel]:
            channel.close()

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDiffusionClient(_Client[Awaitable[Generation]]):
    """The asyncio client (``grpc.aio``), the same API awaited: ``await client.generate(...)``.
    Make it inside the event loop that uses it (``async with AsyncDiffusionClient(...)``)."""

    def _open_channel(self, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if creds:
            return grpc.aio.secure_channel(self.target, creds, options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    async def _generate(
        self, request: pb.GenerateRequest, timeout: float | None, on_progress: ProgressCallback | None
    ) -> Generation:
        return Generation(await self.generate_request(request, timeout=timeout, on_progress=on_progress))

    async def generate_request(
        self,
        request: pb.GenerateRequest,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> pb.GenerateResponse:
        """Stream one request; ``on_progress`` (a function or a coroutine function) sees every step.
        Sent again on the next target when it fails with UNAVAILABLE (see the module's doc)."""
        request = pinned(request)
        deadline = time.monotonic() + (timeout or self.timeout)
        lost: list[str] = []
        for attempt in range(self.attempts):
            used = self.channel
            try:
                return await self._stream_once(request, max(0.001, deadline - time.monotonic()), on_progress)
            except Unavailable as error:
                if not self._retry(error, attempt, deadline, lost):
                    raise self._all_lost(lost, error) from None
                self._next_target(used)
        raise AssertionError("unreachable")

    async def _stream_once(
        self, request: pb.GenerateRequest, timeout: float, on_progress: ProgressCallback | None
    ) -> pb.GenerateResponse:
        with _tracer.start_as_current_span("hybridiff.client.generate"):
            await self._connect()
            call = self.stub.GenerateStream(
                pb.GenerateStreamRequest(request=request),
                timeout=timeout or self.timeout,
                metadata=self._call_metadata(),
            )
            try:
                async for event in call:
                    if not event.HasField("progress"):
                        return event.result
                    if on_progress and inspect.isawaitable(done := on_progress(event.progress)):
                        await done
            except grpc.RpcError as err:
                raise self._error(err) from None
            finally:
                call.cancel()  # no-op once the stream ended; frees the call if the caller left early
        raise WorkerFailed("the stream ended without a result")

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatusResponse:
        return await self._call(self.stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)

    async def _connect(self) -> None:
        """As the blocking client's: at once on TRANSIENT_FAILURE, else within ``connect_timeout``."""
        if self._connected:
            return
        deadline = time.monotonic() + self.connect_timeout
        state = self.channel.get_state(try_to_connect=True)
        while state not in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            try:
                await asyncio.wait_for(self.channel.wait_for_state_change(state), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            state = self.channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:  # the lookup blocks: off the loop
            raise Unavailable(await asyncio.to_thread(why_unreachable, self.target))
        if state != grpc.ChannelConnectivity.READY:
            raise self._unreachable(False)
        self._connected = True

    async def _call(self, method, request, timeout: float | None):
        await self._connect()
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._call_metadata())
        except grpc.RpcError as err:
            raise self._error(err) from None

    async def close(self) -> None:
        for channel in [*self._retired, self.channel]:
            await channel.close()

    async def __aenter__(self) -> AsyncDiffusionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "AsyncDiffusionClient",
    "DiffusionClient",
    "Generation",
    "HybridiffError",
    "PlaintextTokenWarning",
    "request_from_names",
    "default_target",
]

"""The Python clients of the public API (``hybridiff.v1``), light: grpcio, protobuf, Pillow and
the OpenTelemetry API only.

``DiffusionClient(target).generate(prompt=..., num_images=2, seed=7)`` returns a ``Generation``:
the images (PIL), the seed used and the run's statistics; ``AsyncDiffusionClient`` (``grpc.aio``)
is the same API awaited; both build requests and call metadata in one place (``_Client``). Every
call has a deadline (``timeout``, 300 s unless given); an unreachable target fails within
``connect_timeout`` seconds. Failures raise the typed errors of ``hybridiff.errors``
(``InvalidArgument`` names its field, read from the status details, never from text). Tracing
goes through the OpenTelemetry API: the host application configures (or not) the SDK; the client
installs nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import ipaddress
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from PIL import Image

from hybridiff import security
from hybridiff.errors import HybridiffError, Unavailable, WorkerFailed, from_rpc_error
from hybridiff.protocol import Mode, OutputFormat
from hybridiff.request import request_from_names
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc

TARGET_ENV = "HYBRIDIFF_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
_tracer = trace.get_tracer("hybridiff.client")


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


class PlaintextTokenWarning(UserWarning):
    """A bearer token is about to travel unencrypted to a host other than this one."""


def is_loopback(target: str) -> bool:
    """Whether a gRPC target stays on this host: a Unix socket, ``localhost`` or a loopback IP
    (``127.0.0.1:50051``, ``[::1]:50051``, ``dns:///localhost:50051``, ``ipv4:127.0.0.1:50051``)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    rest = re.sub(r"^(dns:(//[^/]*)?/|ipv4:|ipv6:)", "", target)
    if rest.startswith("["):
        host = rest[1 : rest.find("]")]
    else:
        host = rest.split(":")[0] if rest.count(":") == 1 else rest
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Generation:
    """A finished request: its id and seed, the encoded images, and the run's statistics."""

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
        target: str | None = None,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        channel: grpc.Channel | grpc.aio.Channel | None = None,
    ) -> None:
        """``target``: HOST:PORT (default ``$HYBRIDIFF_TARGET``, else 127.0.0.1:50051). Plaintext by
        default; TLS with ``tls_ca`` (mutual with ``tls_cert``/``tls_key``); a bearer ``token`` rides
        on TLS as call credentials, or in metadata on a plaintext channel."""
        self.target = target or default_target()
        self.timeout, self.connect_timeout = timeout, connect_timeout
        creds = security.channel_credentials(tls_ca, tls_cert, tls_key)
        self._metadata: list[tuple[str, str]] = []
        if token and creds:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(security.TokenAuth(token))
            )
        elif token:
            self._metadata.append(("authorization", f"Bearer {token}"))
            if not is_loopback(self.target):
                warnings.warn(
                    f"the bearer token goes to {self.target} over plaintext: anyone on the path can "
                    "read and reuse it (pass tls_ca to use TLS)",
                    PlaintextTokenWarning,
                    stacklevel=2,
                )
        self.channel = channel if channel is not None else self._open_channel(creds)
        self.stub = diffusion_pb2_grpc.DiffusionServiceStub(self.channel)
        self._connected = False

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

    def _unreachable(self) -> Unavailable:
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
        """Stream one request; ``on_progress`` sees every step. Raises ``HybridiffError``."""
        with _tracer.start_as_current_span("hybridiff.client.generate"):
            events = self._call(self.stub.GenerateStream, pb.GenerateStreamRequest(request=request), timeout)
            try:
                for event in events:
                    if not event.HasField("progress"):
                        return event.result
                    if on_progress:
                        on_progress(event.progress)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
        raise WorkerFailed("the stream ended without a result")

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatusResponse:
        return self._call(self.stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)

    def _connect(self) -> None:
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise self._unreachable() from None
        self._connected = True

    def _call(self, method, request, timeout: float | None):
        self._connect()
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._call_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self.channel.close()

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
        """Stream one request; ``on_progress`` (a function or a coroutine function) sees every step."""
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
                raise from_rpc_error(err) from None
            finally:
                call.cancel()  # no-op once the stream ended; frees the call if the caller left early
        raise WorkerFailed("the stream ended without a result")

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatusResponse:
        return await self._call(self.stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)

    async def _connect(self) -> None:
        if self._connected:
            return
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise self._unreachable() from None
        self._connected = True

    async def _call(self, method, request, timeout: float | None):
        await self._connect()
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._call_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def close(self) -> None:
        await self.channel.close()

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

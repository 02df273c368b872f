"""The Python client of the public API (``hybridiff.v1``), light: grpcio, protobuf, Pillow and
the OpenTelemetry API only.

``DiffusionClient(target).generate(prompt=..., num_images=2, seed=7)`` returns a ``Generation``:
the images (PIL), the seed used and the run's statistics. Every call has a deadline (``timeout``,
300 s unless given); an unreachable target fails within ``connect_timeout`` seconds. Failures
raise the typed errors of ``hybridiff.errors`` (``InvalidArgument`` names its field, read from
the status details, never from text). Tracing goes through the OpenTelemetry API: the host
application configures (or not) the SDK; the client installs nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import grpc
from opentelemetry import propagate, trace
from PIL import Image

from hybridiff import security
from hybridiff.errors import HybridiffError, Unavailable, WorkerFailed, from_rpc_error
from hybridiff.protocol import Mode, OutputFormat, WindowGuidance, parse
from hybridiff.request import RequestInput
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc

TARGET_ENV = "HYBRIDIFF_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_tracer = trace.get_tracer("hybridiff.client")


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def request_to_proto(raw: RequestInput) -> pb.GenerateRequest:
    """The wire request of a ``RequestInput`` (None fields stay unset: the server's defaults)."""
    req = pb.GenerateRequest(
        model=raw.model,
        prompt=raw.prompt,
        mode=int(raw.mode),
        request_id=raw.request_id,
        window_guidance=int(raw.window_guidance),
        output_format=int(raw.output_format),
        quality=raw.quality,
        num_images=raw.num_images,
    )
    for name, value in (
        ("negative_prompt", raw.negative_prompt),
        ("width", raw.width),
        ("height", raw.height),
        ("num_inference_steps", raw.num_steps),
        ("guidance_scale", raw.guidance_scale),
        ("seed", raw.seed),
    ):
        if value is not None:
            setattr(req, name, value)
    for name, value in raw.hybrid.items():
        if value is not None:
            setattr(req.hybrid, name, value)
    return req


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


def _enum(enum: type[IntEnum], value: str | int) -> int:
    return int(parse(enum, value)) if isinstance(value, str) else int(value)


class DiffusionClient:
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
        channel: grpc.Channel | None = None,
    ) -> None:
        """``target``: HOST:PORT (default ``$HYBRIDIFF_TARGET``, else 127.0.0.1:50051). Plaintext by
        default; TLS with ``tls_ca`` (mutual with ``tls_cert``/``tls_key``); a bearer ``token`` rides
        on TLS as call credentials, or in metadata on a plaintext channel."""
        self.target = target or default_target()
        self.timeout, self.connect_timeout = timeout, connect_timeout
        options = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        creds = security.channel_credentials(tls_ca, tls_cert, tls_key)
        self._metadata: list[tuple[str, str]] = []
        if token and creds:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(security.TokenAuth(token))
            )
        elif token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if channel is None:
            channel = (
                grpc.secure_channel(self.target, creds, options=options)
                if creds
                else grpc.insecure_channel(self.target, options=options)
            )
        self.channel = channel
        self.stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        self._connected = False

    # --- calls ----------------------------------------------------------------------
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
        on_progress: Callable[[pb.StepProgress], None] | None = None,
    ) -> Generation:
        """Generate ``num_images`` images of ``prompt``. Unset arguments take the model's defaults;
        ``mode``, ``window_guidance`` and ``output_format`` take enums or their CLI names
        ("cfg-parallel", "last-difference", "webp"). ``on_progress`` sees every step."""
        raw = RequestInput(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            mode=_enum(Mode, mode),
            hybrid=dict(hybrid or {}),
            window_guidance=_enum(WindowGuidance, window_guidance) if window_guidance else 0,
            output_format=_enum(OutputFormat, output_format),
            quality=quality,
            num_images=num_images,
            request_id=request_id,
            model=model,
        )
        return Generation(
            self.generate_request(request_to_proto(raw), timeout=timeout, on_progress=on_progress)
        )

    def generate_request(
        self,
        request: pb.GenerateRequest,
        timeout: float | None = None,
        on_progress: Callable[[pb.StepProgress], None] | None = None,
    ) -> pb.GenerateResponse:
        """Stream one request; ``on_progress`` sees every step. Raises ``HybridiffError``."""
        with _tracer.start_as_current_span("hybridiff.client.generate"):
            events = self._call(self.stub.GenerateStream, pb.GenerateStreamRequest(request=request), timeout)
            for event in self._events(events):
                if event.HasField("progress"):
                    if on_progress:
                        on_progress(event.progress)
                else:
                    return event.result
        raise WorkerFailed("the stream ended without a result")

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatusResponse:
        return self._call(self.stub.ClusterStatus, pb.ClusterStatusRequest(), timeout)

    # --- plumbing -------------------------------------------------------------------
    def _connect(self) -> None:
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"cannot reach {self.target} within {self.connect_timeout:g}s") from None
        self._connected = True

    def _call(self, method, request, timeout: float | None):
        self._connect()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the caller's span, if its application traces
        try:
            return method(
                request, timeout=timeout or self.timeout, metadata=self._metadata + list(carrier.items())
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    @staticmethod
    def _events(stream) -> Iterator:
        try:
            yield from stream
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DiffusionClient", "Generation", "HybridiffError", "request_to_proto", "default_target"]

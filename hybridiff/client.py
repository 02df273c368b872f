"""A client of the public API (``hybridiff generate``), usable from Python too."""
from __future__ import annotations

from collections.abc import Callable

import grpc

from hybridiff import telemetry
from hybridiff.api.v1 import diffusion_pb2 as pb
from hybridiff.api.v1 import diffusion_pb2_grpc
from hybridiff.phases import MODE_NAMES, OUTPUT_FORMAT_NAMES, WINDOW_GUIDANCE_WIRE
from hybridiff.request import RequestInput

def request_to_proto(raw: RequestInput) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=raw.model, prompt=raw.prompt, negative_prompt=raw.negative_prompt or "",
                             seed=raw.seed, mode=int(MODE_NAMES[raw.mode]), request_id=raw.request_id,
                             window_guidance=WINDOW_GUIDANCE_WIRE[raw.window_guidance],
                             output_format=OUTPUT_FORMAT_NAMES[raw.output_format])
    for name, value in (("width", raw.width), ("height", raw.height), ("num_inference_steps", raw.num_steps),
                        ("guidance_scale", raw.guidance_scale)):
        if value is not None:
            setattr(req, name, value)
    for name in ("l_slope", "eps_slope", "k", "tau_cap"):
        value = getattr(raw, name)
        if value is not None:
            setattr(req.hybrid, name, value)
    return req


class DiffusionClient:
    def __init__(self, target: str, channel: grpc.Channel | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None) -> None:
        """Plaintext by default; TLS with ``tls_ca`` (mutual with ``tls_cert``/``tls_key``); a
        bearer ``token`` rides on TLS (gRPC sends call credentials only over a secure channel)."""
        from hybridiff import security

        telemetry.setup_tracing("hybridiff-client")
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        creds = security.channel_credentials(tls_ca, tls_cert, tls_key)
        if token:
            call = grpc.metadata_call_credentials(security.TokenAuth(token))
            creds = grpc.composite_channel_credentials(creds, call) if creds else None
            self._token_metadata = None if creds else (("authorization", f"Bearer {token}"),)
        else:
            self._token_metadata = None
        if channel is None:
            raw = grpc.secure_channel(target, creds, options=options) if creds else grpc.insecure_channel(target, options=options)
            channel = telemetry.traced_channel(raw)
        self.channel = channel
        self.stub = diffusion_pb2_grpc.DiffusionServiceStub(self.channel)
        self._tracer = telemetry.tracer("hybridiff.client")

    def generate(self, raw: RequestInput, timeout: float | None = None,
                 on_progress: Callable[[pb.StepProgress], None] | None = None) -> pb.GenerateResponse:
        """Stream a request; ``on_progress`` sees every step. Raises ``grpc.RpcError`` on failure."""
        with self._tracer.start_as_current_span("hybridiff.client.generate"):
            for event in self.stub.GenerateStream(request_to_proto(raw), timeout=timeout, wait_for_ready=True,
                                                  metadata=self._token_metadata):
                if event.HasField("progress"):
                    if on_progress:
                        on_progress(event.progress)
                else:
                    return event.result
        raise grpc.RpcError("the stream ended without a result")

    def close(self) -> None:
        self.channel.close()

"""What both server processes share: message limits, health and reflection, the TLS or plaintext
port, the ready file, signal handling and the one way an error leaves an RPC."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hybridiff import security
from hybridiff.errors import HybridiffError, to_status

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TlsFiles = tuple[str | None, str | None, str | None]  # (cert, key, client CA)


def message_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def new_server(
    max_workers: int, interceptors: list, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        options=message_options(max_message_bytes),
    )


def add_health_and_reflection(server: grpc.Server, services: Iterable[str]) -> health.HealthServicer:
    """``grpc.health.v1`` (every service NOT_SERVING until the caller says otherwise) and reflection."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(services)
    for name in ["", *names]:
        servicer.set(name, NOT_SERVING)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


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

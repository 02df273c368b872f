"""The coordinator process (``hybridiff coordinator``): the public API, health, reflection,
metrics and tracing around the worker pool.

Health: the overall status ("") is SERVING while the process runs and is not draining (the
liveness probe); the service's own status ("hybridiff.v1.DiffusionService") is SERVING only
while at least one worker is idle or busy (the readiness probe). SIGTERM drains: health flips to NOT_SERVING, new requests get UNAVAILABLE, requests
in flight finish within the grace period.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.discovery import StaticDiscovery
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import WorkerPool
from coordinator.service import DiffusionService, ServiceConfig
from hybridiff import security, telemetry
from hybridiff.api.v1 import diffusion_pb2, diffusion_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def worker_channel_factory(credentials: grpc.ChannelCredentials | None = None, server_name: str = "hybridiff-worker"):
    """Channels to workers' control APIs; with TLS the workers' certificates are checked against
    ``server_name`` (pods come and go by IP, so certificates name the role, not the address)."""
    def make(address: str) -> grpc.Channel:
        if credentials is None:
            return telemetry.traced_channel(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        options = CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", server_name)]
        return telemetry.traced_channel(grpc.secure_channel(address, credentials, options=options))
    return make


class Coordinator:
    def __init__(self, discovery, host: str = "0.0.0.0", port: int = 50051, metrics_port: int | None = 9090,
                 queue_size: int = 16, config: ServiceConfig | None = None, grace: float = 60.0,
                 tls: tuple[str | None, str | None, str | None] = (None, None, None), token: str | None = None,
                 worker_credentials: grpc.ChannelCredentials | None = None) -> None:
        """``tls`` = (cert, key, client CA) of the public API (mutual TLS with a client CA);
        ``token``: bearer token required on the public API; ``worker_credentials``: TLS to workers."""
        telemetry.setup_tracing("hybridiff-coordinator")
        self.grace = grace
        self.metrics = CoordinatorMetrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.pool = WorkerPool(worker_channel_factory(worker_credentials), queue_capacity=queue_size,
                               on_change=self._pool_changed)
        self.service = DiffusionService(self.pool, self.metrics, config)
        interceptors = telemetry.server_interceptors()
        if token:
            interceptors.append(security.BearerTokenInterceptor(token))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(16, 2 * queue_size + 8)),
                                  interceptors=interceptors, options=CHANNEL_OPTIONS)
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(False)
        credentials = security.server_credentials(*tls)
        address = f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port is not None else None
        self.discovery = discovery
        self._stopped = threading.Event()

    def _set_health(self, has_workers: bool) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        draining = self.service.draining
        self.health.set("", not_serving if draining else serving)
        self.health.set(SERVICE_NAME, serving if has_workers and not draining else not_serving)

    def _pool_changed(self, pool: WorkerPool) -> None:
        self.metrics.observe_pool(pool)
        counts = pool.counts()
        self._set_health(counts["idle"] + counts["busy"] > 0)

    def start(self) -> "Coordinator":
        self.server.start()
        self.discovery.start(self.pool)
        log.info("coordinator on port %d, metrics on %s", self.port, self.metrics_port)
        return self

    def drain_and_stop(self) -> None:
        if self._stopped.is_set():
            return
        self.service.draining = True
        self._set_health(False)
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace).wait()
        self.discovery.stop()
        self.pool.close()
        telemetry.shutdown_tracing()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve_coordinator(workers: list[str] | None = None, discovery=None, ready_file: str | None = None,
                      **kwargs) -> None:
    """Serve until SIGTERM/SIGINT; ``ready_file`` receives {"port": P, "metrics_port": M} once listening."""
    coordinator = Coordinator(discovery or StaticDiscovery(workers or []), **kwargs).start()
    print(f"coordinator ready on port {coordinator.port}", flush=True)
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": coordinator.port, "metrics_port": coordinator.metrics_port}))
        tmp.replace(ready_file)

    def on_signal(signum, frame):
        threading.Thread(target=coordinator.drain_and_stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    coordinator.wait()

"""The coordinator process (``hybridiff coordinator``): the public API, health, reflection,
metrics and tracing around the worker pool, in named steps: start, serve until signalled, drain.

Health: the overall status ("") is SERVING while the process runs and is not draining (the
liveness probe); the service's own status ("hybridiff.v1.DiffusionService") is SERVING only
while at least one worker is idle or busy (the readiness probe). SIGTERM drains: health flips
to NOT_SERVING, new requests get UNAVAILABLE, requests in flight finish within the grace period.
"""

from __future__ import annotations

import logging
import threading

import grpc

from coordinator.discovery import StaticDiscovery
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import WorkerPool
from coordinator.service import DiffusionService, ServiceConfig
from hybridiff import security, serving, telemetry
from hybridiff.v1 import diffusion_pb2, diffusion_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name


def worker_channel_factory(
    credentials: grpc.ChannelCredentials | None = None, server_name: str = "hybridiff-worker"
):
    """Channels to workers' control APIs; with TLS the workers' certificates are checked against
    ``server_name`` (pods come and go by IP, so certificates name the role, not the address)."""

    def make(address: str) -> grpc.Channel:
        if credentials is None:
            return telemetry.traced_channel(grpc.insecure_channel(address, options=serving.message_options()))
        options = serving.message_options() + [("grpc.ssl_target_name_override", server_name)]
        return telemetry.traced_channel(grpc.secure_channel(address, credentials, options=options))

    return make


class Coordinator:
    def __init__(
        self,
        discovery,
        host: str = "0.0.0.0",
        port: int = 50051,
        metrics_port: int | None = 9090,
        queue_size: int = 16,
        config: ServiceConfig | None = None,
        grace: float = 60.0,
        tls: serving.TlsFiles = (None, None, None),
        token: str | None = None,
        worker_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``tls`` = (cert, key, client CA) of the public API (mutual TLS with a client CA);
        ``token``: bearer token required on the public API; ``worker_credentials``: TLS to workers."""
        telemetry.setup_tracing("hybridiff-coordinator")
        self.grace = grace
        self.metrics = CoordinatorMetrics()
        self.pool = WorkerPool(
            worker_channel_factory(worker_credentials),
            queue_capacity=queue_size,
            on_change=self._pool_changed,
        )
        self.service = DiffusionService(self.pool, self.metrics, config)
        interceptors = telemetry.server_interceptors()
        if token:
            interceptors.append(security.BearerTokenInterceptor(token))
        self.server = serving.new_server(max(16, 2 * queue_size + 8), interceptors)
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(self.service, self.server)
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        self._set_health(False)
        self.port = serving.bind(self.server, f"{host}:{port}", tls)
        self.service.server_address = f"{host}:{self.port}"
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port is not None else None
        self.discovery = discovery
        self._stopped = threading.Event()

    def _set_health(self, has_workers: bool) -> None:
        draining = self.service.draining
        self.health.set("", serving.NOT_SERVING if draining else serving.SERVING)
        self.health.set(
            SERVICE_NAME, serving.SERVING if has_workers and not draining else serving.NOT_SERVING
        )

    def _pool_changed(self, pool: WorkerPool) -> None:
        self.metrics.observe_pool(pool)
        counts = pool.counts()
        self._set_health(counts["idle"] + counts["busy"] > 0)

    def start(self) -> Coordinator:
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

    def serve_until_signalled(self, ready_file: str | None = None) -> None:
        print(f"coordinator ready on port {self.port}", flush=True)
        serving.write_ready_file(ready_file, {"port": self.port, "metrics_port": self.metrics_port})
        serving.on_termination(lambda: threading.Thread(target=self.drain_and_stop, daemon=True).start())
        self._stopped.wait()


def serve_coordinator(
    workers: list[str] | None = None, discovery=None, ready_file: str | None = None, **kwargs
) -> None:
    """Serve until SIGTERM/SIGINT; ``ready_file`` receives {"port": P, "metrics_port": M} once listening."""
    Coordinator(discovery or StaticDiscovery(workers or []), **kwargs).start().serve_until_signalled(
        ready_file
    )

"""The coordinator process (``hybridiff coordinator``): the public API, health, reflection,
metrics and tracing around the worker pool, in named steps: start, serve until signalled, drain.

Health: the overall status ("") is SERVING while the process runs and is not draining (the
liveness probe); the service's own status ("hybridiff.v1.DiffusionService") is SERVING only
while at least one worker is idle or busy (the readiness probe). SIGTERM drains: health flips
to NOT_SERVING, new and queued requests get UNAVAILABLE, requests in flight finish within the
grace period, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import NoReturn

import grpc
from opentelemetry import trace

from coordinator.allocation import Policy
from coordinator.config import CoordinatorConfig
from coordinator.discovery import StaticDiscovery
from coordinator.http_api import HttpEdge, HttpServer
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import WorkerPool
from coordinator.remote import join_session_readers
from coordinator.runner import RequestRunner, RunnerConfig
from coordinator.service import DiffusionService
from hybridiff import security, serving, telemetry
from hybridiff.v1 import diffusion_pb2, diffusion_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name
# The public API's requests carry no image: two prompts of at most 4000 characters (16 000 bytes
# each in UTF-8) and a short id fit in 64 KiB with room to spare; a longer one is refused with
# RESOURCE_EXHAUSTED (serving.new_server keeps it from being read). Responses carry images:
# sends keep the large limit.
MAX_REQUEST_BYTES = 64 * 1024
# Worker addresses and request ids: only the admin token may read them.
ADMIN_METHODS = (f"/{SERVICE_NAME}/ClusterStatus",)


def call_slots(queue_size: int) -> int:
    """Calls the public port runs at once (one thread each; the next is refused with
    RESOURCE_EXHAUSTED): ``queue_size`` waiting requests, as many running ones and short calls
    (health Check, ListModels) besides, plus the few health Watch / reflection streams
    (``serving.LINGERING_STREAMS``) on top, so that those never take the API's share."""
    return max(16, 2 * queue_size + 8) + serving.LINGERING_STREAMS


def worker_channel_factory(
    credentials: grpc.ChannelCredentials | None = None, server_name: str = security.WORKER_NAME
):
    """Channels to workers' control APIs; with TLS the workers' certificates are checked against
    ``server_name`` (pods come and go by IP, so certificates name the role, not the address)."""

    # Keepalive: a worker that stops answering (SIGSTOP, a dead node) fails its session within
    # about KEEPALIVE_TIME + KEEPALIVE_TIMEOUT, and the request resumes elsewhere.
    base = serving.message_options(serving.CONTROL_MESSAGE_BYTES) + serving.keepalive_channel_options()

    def make(address: str) -> grpc.Channel:
        if credentials is None:
            return telemetry.traced_channel(grpc.insecure_channel(address, options=base))
        options = base + [("grpc.ssl_target_name_override", server_name)]
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
        config: RunnerConfig | None = None,
        grace: float = 60.0,
        tls: serving.TlsFiles = (None, None, None),
        token: str | None = None,
        worker_credentials: grpc.ChannelCredentials | None = None,
        admin_token: str | None = None,
        worker_tls_name: str = security.WORKER_NAME,
        health_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        """``tls`` = (cert, key, client CA) of the public API (mutual TLS with a client CA);
        ``token``: bearer token required on the public API; ``admin_token``: the only token
        ``ClusterStatus`` takes (with a ``token`` and no ``admin_token`` nobody may call it);
        ``worker_credentials``: TLS to workers, whose certificates must name ``worker_tls_name``;
        ``health_port``: plaintext gRPC health Check only, on threads of its own (kubelet probes:
        no caller of the public port can starve them; 0: any free port); ``http_port``: the
        OpenAI-compatible HTTP API and the playground (``coordinator.http_api``), with the same
        token, TLS and body limit (None: none; 0: any free port)."""
        telemetry.setup_tracing("hybridiff-coordinator")
        self.grace = grace
        self.metrics = CoordinatorMetrics()
        self.pool = WorkerPool(
            worker_channel_factory(worker_credentials, worker_tls_name),
            queue_capacity=queue_size,
            on_change=self._pool_changed,
        )
        self.runner = RequestRunner(self.pool, self.metrics, config)
        self.service = DiffusionService(self.runner)
        interceptors = telemetry.server_interceptors()
        auth = security.BearerTokenInterceptor(token, admin_token, ADMIN_METHODS)
        self.requires_token = bool(token or admin_token)
        if self.requires_token:  # first: a refused call is answered before anything reads it
            interceptors.insert(0, auth)
        # Health Check without a token runs in open slots of its own: it never takes a token holder's.
        self.server = serving.new_server(
            call_slots(queue_size),
            interceptors,
            max_receive_bytes=MAX_REQUEST_BYTES,
            authenticated=auth.authenticated,
        )
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(self.service, self.server)
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        self._set_health(False)
        self.port = serving.bind(self.server, f"{host}:{port}", tls)
        self.health_server, self.health_port = (
            serving.health_server(f"{host}:{health_port}", self.health)
            if health_port is not None
            else (None, None)
        )
        self.service.server_address = f"{host}:{self.port}"
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port is not None else None
        self.http, self.http_server = None, None
        if http_port is not None:
            self.http = HttpEdge(
                self.runner,
                token=token,
                admin_token=admin_token,
                max_body=MAX_REQUEST_BYTES,
                max_calls=call_slots(queue_size),
            )
            self.http_server = HttpServer(self.http.app, host, http_port, tls, grace)
        self.http_port = self.http_server.port if self.http_server else None
        self.discovery = discovery
        self._stopped = threading.Event()
        self._drain_lock = threading.Lock()
        self._draining = False

    def _set_health(self, has_workers: bool) -> None:
        draining = self.runner.draining
        self.health.set("", serving.NOT_SERVING if draining else serving.SERVING)
        self.health.set(
            SERVICE_NAME, serving.SERVING if has_workers and not draining else serving.NOT_SERVING
        )

    def _pool_changed(self, pool: WorkerPool) -> None:
        self.metrics.observe_pool(pool)
        counts = pool.counts()
        self._set_health(counts["idle"] + counts["busy"] + counts["elsewhere"] > 0)

    def start(self) -> Coordinator:
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        if self.http_server is not None:
            self.http_server.start()
        self.discovery.start(self.pool)
        ports = (self.port, self.health_port, self.metrics_port)
        log.info("coordinator on port %d, health on %s, metrics on %s", *ports)
        if not self.requires_token:  # a demo (the chart's insecure=true) or a local cluster
            log.warning(
                "serving without authentication: no --auth-token-file or --admin-token-file, so anyone "
                "who reaches port %d may call every method, ClusterStatus included",
                self.port,
            )
        return self

    def drain_and_stop(self) -> None:
        """Drain: new requests get UNAVAILABLE and queued ones never start (the pool is closed
        first); the running ones finish within the grace period; then every call to a worker
        ends (its channels close) and the threads that made them are joined."""
        with self._drain_lock:
            if self._draining:
                return
            self._draining = True
        try:
            self.runner.draining = True
            self.pool.close()
            self._set_health(False)
            self.health.enter_graceful_shutdown()
            if self.http_server is not None:  # both edges drain at once, within the one grace period
                self.http_server.begin_stop()
            self.server.stop(self.grace).wait()
            if self.http_server is not None:
                self.http_server.wait_stopped(self.grace)
            if self.health_server is not None:
                self.health_server.stop(0)
            self.discovery.stop()
            self._let_go_of_workers()
            telemetry.shutdown_tracing()
        finally:
            self._stopped.set()

    def _let_go_of_workers(self, timeout: float = 5.0) -> None:
        """Close every worker channel (a probe or a session still in a call ends with it) and wait,
        bounded, for the threads that were in those calls: the pool's probes, the streamed
        requests' threads and the sessions' readers."""
        deadline = time.monotonic() + timeout
        if not self.pool.shutdown(timeout):
            log.warning("a worker probe was still running at exit")
        self.service.join_streams(max(0.0, deadline - time.monotonic()))
        if self.http is not None:
            self.http.close(max(0.0, deadline - time.monotonic()))
        join_session_readers(max(0.0, deadline - time.monotonic()))
        self.metrics.close()

    def serve_until_signalled(self, ready_file: str | None = None) -> None:
        print(f"coordinator ready on port {self.port}", flush=True)
        ports = {"port": self.port, "metrics_port": self.metrics_port, "health_port": self.health_port}
        ports["http_port"] = self.http_port
        serving.write_ready_file(ready_file, ports)
        serving.on_termination(lambda: threading.Thread(target=self.drain_and_stop, daemon=True).start())
        self._stopped.wait()


def serve_coordinator(
    workers: list[str] | None = None, discovery=None, ready_file: str | None = None, **kwargs
) -> NoReturn:
    """Serve until SIGTERM/SIGINT, drain, and end the process (exit 0 after a drain);
    ``ready_file`` receives {"port": P, "metrics_port": M, "health_port": H} once listening."""
    coordinator = Coordinator(discovery or StaticDiscovery(workers or []), **kwargs).start()
    coordinator.serve_until_signalled(ready_file)
    end_process(0)


def serve_configured(config: CoordinatorConfig) -> NoReturn:
    """Serve what ``config`` describes (``hybridiff coordinator``): its discovery, its files read."""
    if config.discovery == "kubernetes":
        from coordinator.discovery.kubernetes import KubernetesDiscovery  # deferred: the kubernetes client

        discovery = KubernetesDiscovery(config.namespace, config.selector, config.worker_port)
    else:
        discovery = StaticDiscovery(config.workers.split(","))
    serve_coordinator(
        discovery=discovery,
        ready_file=config.ready_file,
        host=config.host,
        port=config.port,
        metrics_port=config.metrics_port,
        queue_size=config.queue_size,
        config=RunnerConfig(
            step_timeout=config.step_timeout,
            speculative_steps=config.speculative_steps,
            hybrid_defaults=config.hybrid_overrides,
            policy=Policy(config.policy),
        ),
        tls=config.tls,
        token=security.read_token(config.auth_token_file, env="HYBRIDIFF_AUTH_TOKEN"),
        admin_token=security.read_token(config.admin_token_file, env="HYBRIDIFF_ADMIN_TOKEN"),
        worker_credentials=security.channel_credentials(
            config.worker_tls_ca, config.worker_tls_cert, config.worker_tls_key
        ),
        worker_tls_name=config.worker_tls_name,
        health_port=config.health_port,
        http_port=config.http_port or None,
    )


def end_process(code: int) -> NoReturn:
    """Flush what must not be lost (spans, logs), then end the process without interpreter
    finalization.

    Why not a plain return: gRPC keeps threads of its own (and the Python layer's channel and
    completion-queue pollers) that can still be returning from C-core calls while Python
    finalizes. Python 3.11 ends such a daemon thread with pthread_exit when it takes the GIL
    back, and the forced unwinding through gRPC's C++ frames calls std::terminate: "terminate
    called without an active exception", exit -6, a crash on every rollout it hits.
    The drain closed our channels and joined our threads first; this closes the race that is
    left inside gRPC.
    """
    try:
        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()  # flushes the spans and ends the exporter's thread and channel
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

"""Prometheus metrics of the coordinator (served on ``--metrics-port``, path /metrics)."""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from hybridiff import __version__


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, fds), python_info and python_gc_*, as on the default registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "hybridiff_build_info", "The running version (value 1)", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.queue_wait_seconds = Histogram(
            "hybridiff_queue_wait_seconds",
            "Time a request waited in the admission queue for workers",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "hybridiff_requests_in_flight", "Generate requests being handled (queued or running)", registry=r
        )
        self.queue_depth = Gauge("hybridiff_queue_depth", "Requests waiting for workers", registry=r)
        self.workers = Gauge("hybridiff_workers", "Workers by state", ["state"], registry=r)
        self.requests = Counter(
            "hybridiff_requests_total",
            "Finished requests by mode used, status code and API (grpc or http)",
            ["mode", "code", "api"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "hybridiff_step_seconds",
            "Wall time of a denoising step by phase",
            ["phase"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.request_seconds = Histogram(
            "hybridiff_request_seconds",
            "End-to-end request latency by mode used and API (grpc or http)",
            ["mode", "api"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.recoveries = Counter(
            "hybridiff_recoveries_total", "Requests resumed after a worker failed", registry=r
        )
        self.elastic_events = Counter(
            "hybridiff_elastic_events_total",
            "Running requests that shrank to one worker or grew to a pair (adaptive policy)",
            ["kind"],
            registry=r,
        )
        self.worker_demand = Gauge(
            "hybridiff_worker_demand",
            "Workers busy plus workers wanted by queued requests (the autoscaler's signal)",
            registry=r,
        )
        self.data_plane_bytes = Counter(
            "hybridiff_data_plane_bytes_total", "Bytes workers sent each other", registry=r
        )
        self.worker_quarantines = Counter(
            "hybridiff_worker_quarantines_total",
            "Workers taken out of service after a failure or an unconfirmed abort",
            registry=r,
        )
        self._quarantines_seen = 0
        self._pool_lock = threading.Lock()
        self._http = None  # the /metrics server, once serving
        self._http_thread: threading.Thread | None = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop serving /metrics (its thread ends, its socket closes)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(timeout=5)
            self._http = None

    def observe_pool(self, pool) -> None:
        with self._pool_lock:  # the pool counts quarantines; the counter follows its total
            self.worker_quarantines.inc(pool.quarantines - self._quarantines_seen)
            self._quarantines_seen = pool.quarantines
        self.queue_depth.set(pool.queue_depth)
        self.worker_demand.set(pool.demand())
        for state, n in pool.counts().items():
            self.workers.labels(state).set(n)

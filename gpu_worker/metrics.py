"""Prometheus metrics of a worker (served on ``--metrics-port``, path /metrics).

The engine, the mailbox and the control service take an optional ``WorkerMetrics``; in-process
use (``hybridiff_launch/inprocess.py``) passes none and counts nothing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hybridiff.v1 import diffusion_pb2 as pb

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_compute_seconds = Histogram(
            "hybridiff_worker_step_compute_seconds",
            "Device compute time of a denoising step on this worker, by phase",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "hybridiff_worker_step_seconds",
            "Wall time of a denoising step on this worker (compute, exchange and waiting), by phase",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "hybridiff_worker_data_plane_sent_bytes", "Data-plane bytes sent to peers", registry=r
        )
        self.received_bytes = Counter(
            "hybridiff_worker_data_plane_received_bytes",
            "Data-plane bytes received from peers (accepted messages)",
            registry=r,
        )
        self.rejected_frames = Counter(
            "hybridiff_worker_data_plane_rejected_frames",
            "Data-plane messages refused, by reason (malformed, size, unknown_request, solo, session, "
            "sender, kind, step, duplicate, cap)",
            ["reason"],
            registry=r,
        )
        self.peer_wait_seconds = Histogram(
            "hybridiff_worker_peer_wait_seconds",
            "Time spent waiting for a peer's message",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "hybridiff_worker_model_load_seconds", "Seconds the model took to load", registry=r
        )
        self.requests = Counter(
            "hybridiff_worker_requests_total",
            "Sessions this worker ended, by outcome (ok, error, cancelled, busy, idle_timeout)",
            ["outcome"],
            registry=r,
        )
        self.stalled = Gauge(
            "hybridiff_worker_stalled",
            "1 once the watchdog saw a command make no progress (the worker is NOT_SERVING until restarted)",
            registry=r,
        )
        self.weights_digest_seconds = Gauge(
            "hybridiff_worker_weights_digest_seconds",
            "Seconds the weights digest took at load (part of the model load time)",
            registry=r,
        )

        self.compile_mode = Gauge(
            "hybridiff_worker_compile_mode",
            "1 for the --compile mode this worker resolved to (none, default, reduce-overhead, max-autotune)",
            ["mode"],
            registry=r,
        )
        self.compile_warm = Gauge(
            "hybridiff_worker_compile_warm",
            "1 once the default size is compiled (or compile is off): the worker is ready",
            registry=r,
        )
        self.compilations = Counter(
            "hybridiff_worker_compilations",
            "Graphs compiled (one per function and shape: batch, height, width), by function",
            ["function"],
            registry=r,
        )
        self.copy_seconds = Counter(
            "hybridiff_worker_copy_seconds",
            "Seconds of tensor copies around the data plane, by direction (to_host: device to a "
            "pinned send buffer; to_device: after a receive; to_frame: into a fresh message frame, "
            "every send of a CPU worker)",
            ["direction"],
            registry=r,
        )
        self.copies = Counter(
            "hybridiff_worker_copies",
            "Tensor copies around the data plane, by direction (see hybridiff_worker_copy_seconds)",
            ["direction"],
            registry=r,
        )
        self.device_memory_bytes = Gauge(
            "hybridiff_worker_device_memory_bytes",
            "The accelerator memory torch holds (kind: allocated, reserved, peak_allocated), read at scrape",
            ["kind"],
            registry=r,
        )
        self.compile_cache_lookups = Counter(
            "hybridiff_worker_compile_cache_lookups",
            "Calls through the compile cache, by result (hit: the shape was compiled; miss: compiled now)",
            ["result"],
            registry=r,
        )
        self.compile_seconds = Counter(
            "hybridiff_worker_compile_seconds",
            "Seconds spent compiling (the first call of each function and shape), by function",
            ["function"],
            registry=r,
        )

    def observe_step(self, phase: str, w: pb.WorkerStep) -> None:
        """One step's report: its compute and wall time by phase, and its copies by direction
        (a staged send's device-to-host copy counts its overlapped time too)."""
        self.step_compute_seconds.labels(phase).observe(w.compute_seconds)
        self.step_seconds.labels(phase).observe(w.wall_seconds)
        for direction, count, seconds in (
            ("to_host", w.device_to_host_copies, w.device_to_host_seconds + w.overlapped_copy_seconds),
            ("to_device", w.host_to_device_copies, w.host_to_device_seconds),
            ("to_frame", w.frame_copies, w.frame_copy_seconds),
        ):
            if count:
                self.copies.labels(direction).inc(count)
                self.copy_seconds.labels(direction).inc(seconds)

    def compile_lookup(self, hit: bool) -> None:
        """A call through the ``CompileCache``: its shape was compiled already (hit) or not (miss)."""
        self.compile_cache_lookups.labels("hit" if hit else "miss").inc()

    def compiled(self, function: str, seconds: float) -> None:
        """A ``CompileCache`` compiled ``function`` for a new shape in ``seconds``."""
        self.compilations.labels(function).inc()
        self.compile_seconds.labels(function).inc(seconds)

    def watch_device_memory(self, device) -> None:
        """Export the CUDA memory of ``device`` (read at each scrape); a CPU worker has none."""
        import torch  # deferred: only a worker that owns a device calls this

        if torch.device(device).type != "cuda":
            return
        readers = {
            "allocated": torch.cuda.memory_allocated,
            "reserved": torch.cuda.memory_reserved,
            "peak_allocated": torch.cuda.max_memory_allocated,
        }
        for kind, read in readers.items():
            self.device_memory_bytes.labels(kind).set_function(lambda read=read: read(device))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

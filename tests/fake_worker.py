"""The one fake worker of the coordinator's tests: a real gRPC server on 127.0.0.1 that speaks the
worker's control API (``Info``, ``MeasureSplit``) and ``grpc.health.v1``, and misbehaves as told."""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridiff import serving
from hybridiff.errors import InvalidArgument
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import WORKER_PROTOCOL_VERSION
from hybridiff.v1 import diffusion_pb2 as pb

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerControlService"].full_name
DEFAULT_LIMITS = worker_pb2.SizeLimits(multiple=8, min_side=64, max_side=1024, default_side=512, max_images=4)


class FakeWorker(worker_pb2_grpc.WorkerControlServiceServicer, health_pb2_grpc.HealthServicer):
    """A worker of ``model`` that answers ``Info`` (refused while ``healthy`` is clear, as one still
    loading its model or just failed) and health ``Check`` (``serving`` clear: NOT_SERVING, as a
    worker whose watchdog fired; ``health_script``: the next probes' answers first; ``slots_held``
    set: RESOURCE_EXHAUSTED, as when others hold the open slots health Check runs in), logging every
    call with its time in ``calls``. While ``frozen`` is set it answers nothing (a stopped process:
    every call runs into its deadline, or until ``stop``). ``MeasureSplit`` does ``measure``:
    "crash" (a handler exception: UNKNOWN), "refuse" (INVALID_ARGUMENT), "hang" (until
    cancelled), "cut" (each worker its own cut: 2 for ``fake0``, 4 otherwise).
    ``info`` replaces fields of its ``InfoResponse``."""

    def __init__(
        self,
        worker_id: str,
        model: str = "sdxl",
        healthy: bool = True,
        version: int = WORKER_PROTOCOL_VERSION,
        dtype: str = "float32",
        device: str = "cpu",
        digest: str = "d1",
        measure: str = "cut",
        **info,
    ) -> None:
        self.worker_id, self.model, self.measure = worker_id, model, measure
        self.version, self.dtype, self.device, self.digest = version, dtype, device, digest
        self.info = info
        self.healthy, self.serving, self.frozen = threading.Event(), threading.Event(), threading.Event()
        if healthy:
            self.healthy.set()
        self.serving.set()
        self.slots_held = threading.Event()
        self.health_script: list[bool] = []
        self.active_request_id = ""
        self.calls: list[tuple[str, float]] = []
        self.sizes: list[tuple[int, int]] = []  # MeasureSplit's (width, height)
        self.cancelled = threading.Event()  # a hanging MeasureSplit was cancelled
        self._released = threading.Event()  # set by ``stop``: no handler stays blocked
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        worker_pb2_grpc.add_WorkerControlServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    # --- what the tests read ----------------------------------------------------------
    def count(self, name: str) -> int:
        with self._lock:
            return sum(n == name for n, _ in self.calls)

    @property
    def info_calls(self) -> int:
        return self.count("Info")

    @property
    def health_calls(self) -> int:
        return self.count("Check")

    def probed_after(self, when: float) -> bool:
        with self._lock:
            return any(name in ("Check", "Info") and at > when for name, at in self.calls)

    def measured_at(self) -> float | None:
        with self._lock:
            return next((at for name, at in self.calls if name == "MeasureSplit"), None)

    def stop(self) -> None:
        self._released.set()
        self.server.stop(0)

    # --- the API ------------------------------------------------------------------------
    def _arrive(self, name: str, context) -> None:
        with self._lock:
            self.calls.append((name, time.monotonic()))
        while self.frozen.is_set() and context.is_active() and not self._released.wait(0.01):
            pass

    def Check(self, request, context):
        self._arrive("Check", context)
        if not self.healthy.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} is down")
        if self.slots_held.is_set():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the open call slots are held")
        if request.service not in ("", WORKER_SERVICE):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        with self._lock:
            up = self.health_script.pop(0) if self.health_script else self.serving.is_set()
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    def Info(self, request, context):
        self._arrive("Info", context)
        if not self.healthy.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} is loading")
        number = int(re.sub(r"\D", "", self.worker_id) or 0)
        fields = {
            "worker_id": self.worker_id,
            "model_name": self.model,
            "arch": "sdxl",
            "data_address": f"tcp://127.0.0.1:{6000 + number}",
            "limits": DEFAULT_LIMITS,
            "default_steps": 20,
            "default_guidance_scale": 5.0,
            "hybrid_defaults": pb.HybridParams(l_slope=12, eps_slope=4e-4, k=5, tau_cap=15),
            "device": self.device,
            "dtype": self.dtype,
            "protocol_version": self.version,
            "weights_digest": self.digest,
            "active_request_id": self.active_request_id,
        }
        return worker_pb2.InfoResponse(**(fields | self.info))

    def MeasureSplit(self, request, context):
        self._arrive("MeasureSplit", context)
        if self.measure == "crash":
            raise RuntimeError("secret internal detail")
        if self.measure == "refuse":  # as a worker refuses: a typed error with its google.rpc details
            serving.abort(context, InvalidArgument("width", "64 is not a valid size for this model"))
        if self.measure == "cut":
            with self._lock:
                self.sizes.append((request.width, request.height))
            return worker_pb2.MeasureSplitResponse(cut=2 if self.worker_id == "fake0" else 4)
        context.add_callback(self.cancelled.set)
        while context.is_active() and not self._released.wait(0.02):
            pass
        context.abort(grpc.StatusCode.CANCELLED, "stopped")

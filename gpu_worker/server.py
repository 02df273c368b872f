"""The worker process (``hybridiff worker``): loads one model, serves the control API over gRPC,
and talks to its peers over the ZeroMQ data plane.

Health is NOT_SERVING until the model is loaded, SERVING after, NOT_SERVING again while it
drains on SIGTERM. One request at a time: a second Session is refused with RESOURCE_EXHAUSTED
(the coordinator's allocator never does that). Each Session executes its commands in order on
the handler thread; the coordinator sends steps ahead, so the next command is already queued.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import zmq
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpu_worker.dataplane import Mailbox
from gpu_worker.engine import WorkerEngine
from gpu_worker.loader import load_adapter
from gpu_worker.split_balance import balanced_plan, measure_unit_costs
from gpu_worker.zmq_plane import DataPlaneReceiver, ZmqLinks
from hybridiff import security, telemetry
from hybridiff.api.v1 import diffusion_pb2, worker_pb2, worker_pb2_grpc
from hybridiff.errors import HybridiffError, InvalidArgument
from hybridiff.messages import (begin_from_proto, finish_report_to_proto, step_from_proto,
                                step_report_to_proto)

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
SERVICE_NAME = "hybridiff.v1.WorkerControl"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WorkerService(worker_pb2_grpc.WorkerControlServicer):
    """Registered before the model loads (so health answers at once); ``attach`` makes it ready."""

    def __init__(self, worker_id: str, model_name: str) -> None:
        self.worker_id = worker_id
        self.model_name = model_name
        self.data_address = ""
        self.engine: WorkerEngine | None = None
        self._busy = threading.Lock()
        self._measure_lock = threading.Lock()
        self._plans: dict[tuple[int, int], worker_pb2.MeasureSplitResponse] = {}
        self._tracer = telemetry.tracer("hybridiff.worker")

    def attach(self, engine: WorkerEngine, data_address: str) -> None:
        self.adapter = engine.adapter
        self.data_address = data_address
        self.engine = engine

    def _ready(self, context) -> None:
        if self.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is still loading its model")

    def Info(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        d = self.adapter.defaults
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, model_name=self.model_name, arch=self.adapter.arch,
            data_address=self.data_address,
            limits=worker_pb2.SizeLimits(multiple=limits.multiple, min_side=limits.min_side,
                                         max_side=limits.max_side, default_side=limits.default_side),
            default_steps=d.steps, default_guidance_scale=d.guidance_scale,
            hybrid_defaults=diffusion_pb2.HybridParams(l_slope=d.hybrid.l_slope, eps_slope=d.hybrid.eps_slope,
                                                       k=d.hybrid.k, tau_cap=d.hybrid.tau_cap),
            device=str(self.adapter.device), dtype=str(self.adapter.dtype).removeprefix("torch."),
            protocol_version=PROTOCOL_VERSION,
        )

    def MeasureSplit(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        for name, side in (("width", request.width), ("height", request.height)):
            if side % limits.multiple or not limits.min_side <= side <= limits.max_side:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {side} is not a valid size for this model")
        key = (request.height, request.width)
        with self._measure_lock:
            if key not in self._plans:
                plan = balanced_plan(self.adapter, measure_unit_costs(self.adapter, request.height, request.width))
                self._plans[key] = worker_pb2.MeasureSplitResponse(
                    cut=plan.cut, stage1_seconds=plan.stage1_seconds, stage2_seconds=plan.stage2_seconds,
                    unit_seconds=plan.unit_seconds)
                log.info("split at %dx%d: cut %d, stages %.4fs / %.4fs (ratio %.3f)", request.width, request.height,
                         plan.cut, plan.stage1_seconds, plan.stage2_seconds, plan.ratio)
            return self._plans[key]

    def Session(self, request_iterator, context):
        self._ready(context)
        # The previous session may still be unwinding after its last event reached the
        # coordinator, which then hands this worker on: wait a little before refusing.
        if not self._busy.acquire(timeout=10):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {self.worker_id} is busy with another request")
        request_id = None
        try:
            for cmd in request_iterator:
                which = cmd.WhichOneof("command")
                if which == "begin":
                    if request_id is not None:
                        raise InvalidArgument("begin", "a session runs one request")
                    begin = begin_from_proto(cmd)
                    request_id = begin.spec.request_id
                    context.add_callback(lambda rid=request_id: self.engine.mailbox.close(rid))
                    with telemetry.span_from(begin.trace_context, self._tracer, "worker.begin",
                                             **{"hybridiff.worker": self.worker_id, "hybridiff.role": begin.role.value}):
                        seconds = self.engine.begin(begin)
                    yield worker_pb2.WorkerEvent(request_id=request_id, worker_id=self.worker_id,
                                                 begin=worker_pb2.BeginDone(encoding_seconds=seconds))
                elif cmd.request_id != request_id:
                    raise InvalidArgument("request_id", f"command for {cmd.request_id!r} in the session of {request_id!r}")
                elif which == "step":
                    step = step_from_proto(cmd)
                    with telemetry.span_from(step.trace_context, self._tracer, "worker.step",
                                             **{"hybridiff.step": step.step, "hybridiff.phase": step.phase.name,
                                                "hybridiff.worker": self.worker_id}):
                        report = self.engine.step(replace(step, trace_context=telemetry.inject()))
                    yield step_report_to_proto(report)
                elif which == "finish":
                    report = self.engine.finish(request_id, cmd.finish.decode)
                    request_id = None
                    yield finish_report_to_proto(report)
                    return
                else:
                    raise InvalidArgument("command", "empty worker command")
        except HybridiffError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # a failed request is a typed result, not a dead worker
            log.exception("request %s failed on %s", request_id, self.worker_id)
            context.abort(grpc.StatusCode.INTERNAL, f"{self.worker_id}: {type(exc).__name__}: {exc}")
        finally:
            if request_id is not None:
                self.engine.abort(request_id)
            self._busy.release()


def pin_cpus(cpus: str | None) -> None:
    """Pin this process to ``cpus`` ("0", "0,1", "2-3") with one torch thread per core."""
    import torch

    if cpus:
        chosen: set[int] = set()
        for part in cpus.split(","):
            lo, _, hi = part.partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
        os.sched_setaffinity(0, chosen)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_num_interop_threads(1)


def serve_worker(model_dir: str, port: int, data_port: int, host: str = "0.0.0.0", advertise_host: str | None = None,
                 device: str | None = None, dtype: str | None = None, model_name: str | None = None,
                 worker_id: str | None = None, grace: float = 30.0, ready_file: str | None = None,
                 tls: tuple[str | None, str | None, str | None] = (None, None, None),
                 curve_keys_dir: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Port 0 picks a free port; ``ready_file`` receives a JSON
    {"control": "host:port", "data": "tcp://host:port"} once the model is loaded. ``tls`` =
    (cert, key, client CA): with a client CA only the coordinator (a cert that CA signed) may
    control this worker. ``curve_keys_dir``: ZeroMQ CURVE with the pool keypair found there."""
    telemetry.setup_tracing("hybridiff-worker")
    advertise = advertise_host or (socket.gethostname() if host in ("0.0.0.0", "::") else host)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=telemetry.server_interceptors(),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = security.server_credentials(*tls)
    curve = security.load_curve_keys(curve_keys_dir) if curve_keys_dir else None
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    worker_id = worker_id or f"{advertise}:{bound}"
    service = WorkerService(worker_id, model_name or Path(model_dir).name)
    worker_pb2_grpc.add_WorkerControlServicer_to_server(service, server)
    server.start()
    log.info("worker control API on %s:%d (loading model)", host, bound)

    adapter = load_adapter(model_dir, device, dtype)
    context = zmq.Context()
    mailbox = Mailbox(worker_id, adapter.device)
    receiver = DataPlaneReceiver(context, mailbox, host, data_port, curve=curve).start()
    links = ZmqLinks(context, worker_id, curve=curve)
    engine = WorkerEngine(adapter, worker_id, mailbox, links)
    service.attach(engine, f"tcp://{advertise}:{receiver.port}")
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker %s serving %s (%s) on %s, data plane %s", worker_id, service.model_name, adapter.arch,
             adapter.device, service.data_address)
    print(f"worker ready: control {advertise}:{bound} data {service.data_address}", flush=True)

    stop = threading.Event()

    def on_signal(signum, frame):
        health_servicer.enter_graceful_shutdown()
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"control": f"{advertise}:{bound}", "data": service.data_address}))
        tmp.replace(ready_file)
    stop.wait()
    server.stop(grace).wait()
    receiver.stop()
    links.close()
    context.term()
    telemetry.shutdown_tracing()

"""The worker's control API (``hybridiff.internal.v1.WorkerControlService``), answered for the
coordinator.

One request at a time: a second Session is refused with WORKER_BUSY (the coordinator's
allocator never does that). Each Session runs its commands in order on the handler thread;
the coordinator sends steps ahead, so the next command is already queued. Every failure
leaves as a typed status (``hybridiff.errors.to_status``): the coordinator reads its reason,
never its text.
"""

from __future__ import annotations

import logging
import threading

import grpc

from gpu_worker.engine import WorkerEngine
from gpu_worker.split_balance import SplitPlanner
from hybridiff import logs, serving, telemetry
from hybridiff.errors import (
    BadCommand,
    HybridiffError,
    InvalidArgument,
    Unavailable,
    WorkerBusy,
    WorkerFailed,
)
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import Phase
from hybridiff.v1 import diffusion_pb2

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 3
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerControlService"].full_name
BUSY_WAIT_SECONDS = 10.0


class WorkerService(worker_pb2_grpc.WorkerControlServiceServicer):
    """Registered before the model loads (so health answers at once); ``attach`` makes it ready."""

    def __init__(self, worker_id: str, model_name: str, metrics=None) -> None:
        """``metrics``: an optional ``gpu_worker.metrics.WorkerMetrics`` (sessions by outcome)."""
        self.worker_id = worker_id
        self.metrics = metrics
        self.model_name = model_name
        self.data_address = ""
        self.engine: WorkerEngine | None = None
        self.planner: SplitPlanner | None = None
        self._busy = threading.Lock()
        self._tracer = telemetry.tracer("hybridiff.worker")

    def attach(self, engine: WorkerEngine, data_address: str) -> None:
        self.adapter = engine.adapter
        self.planner = SplitPlanner(engine.adapter)
        self.data_address = data_address
        self.engine = engine

    def _ready(self, context: grpc.ServicerContext) -> None:
        if self.engine is None:
            serving.abort(context, Unavailable(f"worker {self.worker_id} is still loading its model"))

    def Info(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        d = self.adapter.defaults
        return worker_pb2.InfoResponse(
            worker_id=self.worker_id,
            model_name=self.model_name,
            arch=self.adapter.arch,
            data_address=self.data_address,
            limits=worker_pb2.SizeLimits(
                multiple=limits.multiple,
                min_side=limits.min_side,
                max_side=limits.max_side,
                default_side=limits.default_side,
                max_images=limits.max_images,
            ),
            default_steps=d.steps,
            default_guidance_scale=d.guidance_scale,
            hybrid_defaults=diffusion_pb2.HybridParams(
                l_slope=d.hybrid.l_slope, eps_slope=d.hybrid.eps_slope, k=d.hybrid.k, tau_cap=d.hybrid.tau_cap
            ),
            device=str(self.adapter.device),
            dtype=str(self.adapter.dtype).removeprefix("torch."),
            protocol_version=PROTOCOL_VERSION,
        )

    def MeasureSplit(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        for name, side in (("width", request.width), ("height", request.height)):
            if side % limits.multiple or not limits.min_side <= side <= limits.max_side:
                serving.abort(context, InvalidArgument(name, f"{side} is not a valid size for this model"))
        plan = self.planner.plan(request.height, request.width)
        return worker_pb2.MeasureSplitResponse(
            cut=plan.cut,
            stage1_seconds=plan.stage1_seconds,
            stage2_seconds=plan.stage2_seconds,
            unit_seconds=plan.unit_seconds,
        )

    def Session(self, request_iterator, context):
        self._ready(context)
        # The previous session may still be unwinding after its last event reached the
        # coordinator, which then hands this worker on: wait a little before refusing.
        if not self._busy.acquire(timeout=BUSY_WAIT_SECONDS):
            self._count("busy")
            serving.abort(context, WorkerBusy(f"worker {self.worker_id} is busy with another request"))
        request_id = None
        outcome = "cancelled"  # the stream ended (or the coordinator cancelled it) before finish
        try:
            for cmd in request_iterator:
                which = cmd.WhichOneof("command")
                if which == "begin":
                    if request_id is not None:
                        raise BadCommand("begin", "a session runs one request")
                    if not cmd.request_id:
                        raise BadCommand("request_id", "a session needs a request id")
                    request_id = cmd.request_id
                    logs.set_request_id(request_id)  # this handler thread's log lines name it
                    context.add_callback(lambda rid=request_id: self.engine.mailbox.close(rid))
                elif cmd.request_id != request_id:
                    raise BadCommand(
                        "request_id", f"command for {cmd.request_id!r} in the session of {request_id!r}"
                    )
                yield self._run(cmd, which)
                if which == "finish":
                    request_id, outcome = None, "ok"
                    return
        except HybridiffError as exc:
            outcome = "cancelled" if exc.code == grpc.StatusCode.CANCELLED else "error"
            serving.abort(context, exc)
        except Exception as exc:  # a failed request is a typed result, not a dead worker
            outcome = "error"
            log.exception("request %s failed on %s", request_id, self.worker_id)
            serving.abort(context, WorkerFailed(f"{self.worker_id}: {type(exc).__name__}: {exc}"))
        finally:
            if request_id is not None:
                self.engine.abort(request_id)
            self._busy.release()
            self._count(outcome)
            logs.set_request_id(None)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()

    def _run(self, cmd: worker_pb2.SessionRequest, which: str | None) -> worker_pb2.SessionResponse:
        """One command under its span; a step's frames carry the worker's step span."""
        attributes = {"hybridiff.worker": self.worker_id}
        if which == "step":
            attributes.update(
                {
                    "hybridiff.step": cmd.step.step,
                    "hybridiff.phase": Phase(cmd.step.phase).name
                    if cmd.step.phase in Phase.__members__.values()
                    else str(cmd.step.phase),
                }
            )
        with telemetry.span_from(
            dict(cmd.trace_context), self._tracer, f"worker.{which or 'empty'}", **attributes
        ):
            if which in ("begin", "finish"):
                log.info("%s: %s of request %s", self.worker_id, which, cmd.request_id)
            return self.engine.handle(cmd, trace_context=telemetry.inject())

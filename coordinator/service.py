"""The gRPC edge of the coordinator: the public ``hybridiff.v1.DiffusionService``
(docs/design.md section 3).

It converts and nothing more: a ``GenerateRequest`` goes to the request runner
(``coordinator.runner``), which validates, queues, runs and counts it; its result comes back as a
``GenerateResponse`` (or a stream of step progress and then the response). Every error leaves
through ``serving.abort`` as one gRPC status with its ``google.rpc`` details — never a stack
trace.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import grpc
from opentelemetry import context as otel_context

from coordinator.auto_mode import AutoChoice
from coordinator.driver import GenerationResult, StepStat
from coordinator.runner import RequestRunner, as_typed_error
from coordinator.worker_info import WorkerInfo
from hybridiff import serving
from hybridiff.errors import Cancelled, DeadlineExceeded, HybridiffError
from hybridiff.protocol import MIME_TYPES, OutputFormat
from hybridiff.request import MAX_STEPS, side_multiple
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_FULL_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
DEADLINE_SLACK_SECONDS = 0.25


def step_stat_to_proto(s: StepStat) -> pb.StepStat:
    msg = pb.StepStat(
        step=s.step,
        phase=s.phase,
        bytes_sent=s.bytes_sent,
        wall_seconds=s.wall_seconds,
        compute_seconds=s.compute_seconds,
        workers=list(s.workers.values()),
        critical_compute_seconds=s.critical_compute_seconds,
        copy_seconds=s.copy_seconds,
        wire_seconds=s.wire_seconds,
        worker_other_seconds=s.worker_other_seconds,
        control_seconds=s.control_seconds,
    )
    if s.rel_mae is not None:
        msg.rel_mae = s.rel_mae
    return msg


def auto_choice_to_proto(choice: AutoChoice) -> pb.AutoChoice:
    s = choice.schedule
    return pb.AutoChoice(
        mode=s.mode,
        window_guidance=s.window_guidance or 0,
        k=s.k,
        predicted_seconds=choice.predicted_seconds,
        single_seconds=choice.single_seconds,
        cfg_parallel_seconds=choice.cfg_parallel_seconds,
        basis=choice.basis,
    )


def response_to_proto(
    result: GenerationResult, width: int, height: int, fmt: OutputFormat
) -> pb.GenerateResponse:
    st = result.stats
    stats = pb.GenerateStats(
        mode_used=st.mode_used,
        steps=[step_stat_to_proto(s) for s in st.steps],
        workers=st.workers,
        data_plane_bytes=st.data_plane_bytes,
        queued_seconds=st.queued_seconds,
        encoding_seconds=st.encoding_seconds,
        denoising_seconds=st.denoising_seconds,
        decoding_seconds=st.decoding_seconds,
        tau1_source=st.tau1_source,
        notes=st.notes,
        window_guidance=st.window_guidance or 0,
    )
    if st.tau1 is not None:
        stats.tau1 = st.tau1
    if st.auto_choice is not None:
        stats.auto_choice.CopyFrom(auto_choice_to_proto(st.auto_choice))
    if st.tau2 is not None:
        stats.tau2 = st.tau2
    response = pb.GenerateResponse(
        request_id=result.request_id, width=width, height=height, stats=stats, seed=result.seed
    )
    if fmt == OutputFormat.RAW_LATENTS:
        # One image per latent of the batch: [1, C, h, w] each, float32 little-endian.
        shape = list(result.latents.shape)
        per_image = len(result.latents.data) // max(1, shape[0])
        for i in range(shape[0]):
            response.images.add(
                data=result.latents.data[i * per_image : (i + 1) * per_image],
                mime_type=MIME_TYPES[fmt],
                latent_shape=[1, *shape[1:]],
            )
    else:
        response.images.extend(pb.Image(data=image, mime_type=result.mime_type) for image in result.images)
    return response


def model_info_to_proto(info: WorkerInfo) -> pb.ModelInfo:
    lim, defaults = info.limits, info.defaults
    return pb.ModelInfo(
        name=info.model_name,
        arch=info.arch,
        default_width=lim.default_side,
        default_height=lim.default_side,
        max_width=lim.max_side,
        max_height=lim.max_side,
        hybrid_defaults=pb.HybridParams(**dataclasses.asdict(defaults.hybrid)),
        default_guidance_scale=defaults.guidance_scale,
        default_steps=defaults.steps,
        size_multiple=side_multiple(lim.multiple),
        min_side=lim.min_side,
        max_images=lim.max_images,
        max_steps=MAX_STEPS,
    )


class GrpcCall:
    """A gRPC call as the runner sees its client (``runner.ClientCall``)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def check_alive(self) -> None:
        """Raise DeadlineExceeded or Cancelled once the client's call has ended."""
        remaining = self.context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the client's deadline passed")
        if not self.context.is_active():
            # gRPC ends the call when its deadline passes, a moment before time_remaining()
            # reaches 0 on this side: a call that ends at its deadline timed out, not cancelled.
            if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
                raise DeadlineExceeded("the client's deadline passed")
            raise Cancelled("the client cancelled the request")


class DiffusionService(diffusion_pb2_grpc.DiffusionServiceServicer):
    """The gRPC edge of the request runner: requests in, responses and statuses out."""

    def __init__(self, runner: RequestRunner) -> None:
        self.runner = runner
        self.pool = runner.pool
        self._lock = threading.Lock()
        self._streams: set[threading.Thread] = set()  # GenerateStream's request threads
        self.server_address = ""  # host:port of the public API, for the spans (the server sets it)

    def join_streams(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the streamed requests' threads to end (at exit:
        none may still be in a call to a worker). Whether all ended."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._streams)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # --- RPCs -----------------------------------------------------------------------
    def Generate(self, request, context):
        try:
            return self._generate(request, context, on_step=None, method="Generate")
        except HybridiffError as exc:
            serving.abort(context, exc)

    def GenerateStream(self, request, context):
        events: queue.Queue = queue.Queue()
        request_id: list[str] = []  # the server's id, known once the request is resolved

        def on_step(stat: StepStat, total: int) -> None:
            progress = pb.StepProgress(
                request_id=request_id[0], step=stat.step, total_steps=total, phase=stat.phase
            )
            if stat.rel_mae is not None:
                progress.rel_mae = stat.rel_mae
            events.put(pb.GenerateStreamResponse(progress=progress))

        parent = otel_context.get_current()  # the RPC's server span: contexts are per thread

        def work() -> None:
            token = otel_context.attach(parent)
            try:
                result = self._generate(
                    request.request,
                    context,
                    on_step,
                    on_resolved=lambda spec: request_id.append(spec.request_id),
                    method="GenerateStream",
                )
                events.put(pb.GenerateStreamResponse(result=result))
            except BaseException as exc:  # handed to the stream below
                events.put(as_typed_error(exc))
            finally:
                otel_context.detach(token)
                with self._lock:
                    self._streams.discard(threading.current_thread())

        thread = threading.Thread(target=work, name="generate-stream", daemon=True)
        with self._lock:
            self._streams.add(thread)
        thread.start()
        while True:
            item = events.get()
            if isinstance(item, HybridiffError):
                serving.abort(context, item)
            yield item
            if item.HasField("result"):
                return

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_info_to_proto(info) for info in self.runner.models()])

    def ClusterStatus(self, request, context):
        workers = [
            pb.WorkerStatus(address=e.address, state=e.state, model=e.model, current_request_id=e.request_id)
            for e in self.pool.snapshot()
        ]
        return pb.ClusterStatusResponse(
            workers=workers,
            queue_depth=self.pool.queue_depth,
            queue_capacity=self.pool.queue_capacity,
            draining=self.runner.draining,
        )

    def _generate(
        self, request, context, on_step, on_resolved=None, method: str = "Generate"
    ) -> pb.GenerateResponse:
        # The standard RPC attributes (OpenTelemetry semantic conventions) beside hybridiff.*.
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE_FULL_NAME, "rpc.method": method}
        host, _, port = self.server_address.rpartition(":")
        if host and host not in ("0.0.0.0", "::", "[::]"):  # a wildcard names no address
            attributes["server.address"] = host
            attributes["server.port"] = int(port)
        done = self.runner.generate(
            request, GrpcCall(context), on_step=on_step, on_resolved=on_resolved, span_attributes=attributes
        )
        spec = done.spec
        return response_to_proto(done.result, spec.width, spec.height, spec.output_format)

"""The public ``hybridiff.v1.DiffusionService`` (DESIGN section 3).

Every request: validate (INVALID_ARGUMENT naming the field, NOT_FOUND for an unknown model),
wait in the admission queue for a pair (RESOURCE_EXHAUSTED at once when full), resolve AUTO
against what was free, drive the steps, answer the image and the stats. Every error leaves
through ``_abort`` as one gRPC status — never a stack trace.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from coordinator.driver import GenerationResult, StepStat, drive_request
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import WorkerPool
from coordinator.remote import RemoteWorker
from hybridiff import telemetry
from hybridiff.api.v1 import diffusion_pb2 as pb
from hybridiff.api.v1 import diffusion_pb2_grpc
from hybridiff.errors import Cancelled, DeadlineExceeded, HybridiffError, Unavailable
from hybridiff.phases import MODE_NAMES, OUTPUT_FORMAT_NAMES, WINDOW_GUIDANCE_WIRE, Mode, Phase
from hybridiff.request import HybridParams, ModelDefaults, RequestInput, SizeLimits, resolve_spec

log = logging.getLogger(__name__)

# Wire enum -> the names RequestInput takes (one table each, in hybridiff.phases); unset = default.
_MODE_FROM_PB = {int(v): k for k, v in MODE_NAMES.items()} | {pb.MODE_UNSPECIFIED: "auto"}
_POLICY_FROM_PB = {v: k for k, v in WINDOW_GUIDANCE_WIRE.items()}
_FORMAT_FROM_PB = {v: k for k, v in OUTPUT_FORMAT_NAMES.items()} | {pb.OUTPUT_FORMAT_UNSPECIFIED: "png"}


def request_input_from_proto(req: pb.GenerateRequest) -> RequestInput:
    def opt(msg, name):
        return getattr(msg, name) if msg.HasField(name) else None

    h = req.hybrid
    return RequestInput(
        prompt=req.prompt, negative_prompt=req.negative_prompt, width=opt(req, "width"), height=opt(req, "height"),
        num_steps=opt(req, "num_inference_steps"), guidance_scale=opt(req, "guidance_scale"), seed=req.seed,
        mode=_MODE_FROM_PB.get(req.mode, f"<enum {req.mode}>"),
        l_slope=opt(h, "l_slope"), eps_slope=opt(h, "eps_slope"), k=opt(h, "k"), tau_cap=opt(h, "tau_cap"),
        window_guidance=_POLICY_FROM_PB.get(req.window_guidance, f"<enum {req.window_guidance}>"),
        output_format=_FORMAT_FROM_PB.get(req.output_format, f"<enum {req.output_format}>"),
        request_id=req.request_id, model=req.model,
    )


def _model_rules(info, overrides: dict[str, float | int]) -> tuple[SizeLimits, ModelDefaults]:
    """Size limits and defaults of the model a worker serves; ``overrides`` replace hybrid defaults."""
    lim, hd = info.limits, info.hybrid_defaults
    params = {"l_slope": hd.l_slope, "eps_slope": hd.eps_slope, "k": hd.k, "tau_cap": hd.tau_cap}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return (SizeLimits(lim.multiple, lim.min_side, lim.max_side, lim.default_side),
            ModelDefaults(HybridParams(**params).validate(), info.default_steps, info.default_guidance_scale))


def step_stat_to_proto(s: StepStat) -> pb.StepStat:
    msg = pb.StepStat(step=s.step, phase=int(Phase[s.phase.upper()]), bytes_sent=s.bytes_sent,
                      wall_seconds=s.wall_seconds, compute_seconds=s.compute_seconds,
                      workers=[pb.WorkerStep(worker=name, phase=int(Phase[w["phase"].upper()]),
                                             compute_seconds=w["compute_seconds"], wall_seconds=w["wall_seconds"],
                                             bytes_sent=w["bytes_sent"]) for name, w in s.workers.items()])
    if s.rel_mae is not None:
        msg.rel_mae = s.rel_mae
    return msg


def response_to_proto(result: GenerationResult, width: int, height: int) -> pb.GenerateResponse:
    st = result.stats
    stats = pb.GenerateStats(
        tau1=-1 if st.tau1 is None else st.tau1, tau2=-1 if st.tau2 is None else st.tau2,
        mode_used=int(MODE_NAMES[st.mode_used]), steps=[step_stat_to_proto(s) for s in st.steps],
        workers=st.workers, data_plane_bytes=st.data_plane_bytes, queued_seconds=st.queued_seconds,
        encoding_seconds=st.encoding_seconds, denoising_seconds=st.denoising_seconds,
        decoding_seconds=st.decoding_seconds, tau1_source=st.tau1_source, notes=st.notes,
        window_guidance=WINDOW_GUIDANCE_WIRE[st.window_guidance or "default"],
    )
    if result.image_png is not None:
        return pb.GenerateResponse(request_id=result.request_id, image=result.image_png, mime_type="image/png",
                                   width=width, height=height, stats=stats)
    latents = result.latents.contiguous()
    return pb.GenerateResponse(request_id=result.request_id, image=latents.numpy().astype("<f4").tobytes(),
                               mime_type="application/x-hybridiff-latents-f32le", width=width, height=height,
                               latent_shape=list(latents.shape), stats=stats)


@dataclass
class ServiceConfig:
    acquire_timeout: float = 600.0
    step_timeout: float = 600.0
    # Operator overrides of the models' hybrid defaults (l_slope, eps_slope, k, tau_cap); None keeps the model's.
    hybrid_defaults: dict = field(default_factory=dict)


class DiffusionService(diffusion_pb2_grpc.DiffusionServiceServicer):
    def __init__(self, pool: WorkerPool, metrics: CoordinatorMetrics, config: ServiceConfig | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.config = config or ServiceConfig()
        self.draining = False
        self._tracer = telemetry.tracer("hybridiff.coordinator")

    # --- RPCs -----------------------------------------------------------------------
    def Generate(self, request, context):
        try:
            return self._generate(request, context, on_step=None)
        except HybridiffError as exc:
            self._abort(context, exc)

    def GenerateStream(self, request, context):
        events: queue.Queue = queue.Queue()

        def on_step(stat: StepStat, total: int) -> None:
            progress = pb.StepProgress(request_id=request.request_id, step=stat.step, total_steps=total,
                                       phase=int(Phase[stat.phase.upper()]))
            if stat.rel_mae is not None:
                progress.rel_mae = stat.rel_mae
            events.put(pb.GenerateEvent(progress=progress))

        parent = otel_context.get_current()  # the RPC's server span: contexts are per thread

        def work() -> None:
            token = otel_context.attach(parent)
            try:
                events.put(pb.GenerateEvent(result=self._generate(request, context, on_step)))
            except BaseException as exc:  # handed to the stream below
                events.put(exc)
            finally:
                otel_context.detach(token)

        worker = threading.Thread(target=work, name="generate-stream", daemon=True)
        worker.start()
        while True:
            item = events.get()
            if isinstance(item, HybridiffError):
                self._abort(context, item)
            if isinstance(item, BaseException):
                log.error("request failed: %r", item)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator log")
            yield item
            if item.HasField("result"):
                return

    def ListModels(self, request, context):
        seen: dict[str, pb.ModelInfo] = {}
        for e in self.pool.snapshot():
            if e.info is None or e.gone or e.model in seen:
                continue
            i = e.info
            seen[e.model] = pb.ModelInfo(
                name=i.model_name, arch=i.arch, default_width=i.limits.default_side, default_height=i.limits.default_side,
                max_width=i.limits.max_side, max_height=i.limits.max_side, hybrid_defaults=i.hybrid_defaults,
                default_guidance_scale=i.default_guidance_scale, default_steps=i.default_steps)
        return pb.ListModelsResponse(models=list(seen.values()))

    def ClusterStatus(self, request, context):
        workers = [pb.WorkerStatus(address=e.address, state=e.state, model=e.model, current_request_id=e.request_id)
                   for e in self.pool.snapshot()]
        return pb.ClusterStatusResponse(workers=workers, queue_depth=self.pool.queue_depth,
                                        queue_capacity=self.pool.queue_capacity, draining=self.draining)

    # --- one request ----------------------------------------------------------------
    def _generate(self, request, context, on_step) -> pb.GenerateResponse:
        received = time.perf_counter()
        mode_label, code = "unknown", grpc.StatusCode.OK
        with self._tracer.start_as_current_span("hybridiff.generate") as span:
            try:
                if self.draining:
                    raise Unavailable("the coordinator is draining")
                raw = request_input_from_proto(request)
                info = self.pool.model_info(raw.model)
                raw.model = info.model_name
                spec = resolve_spec(raw, *_model_rules(info, self.config.hybrid_defaults))
                span.set_attributes({"hybridiff.request_id": spec.request_id, "hybridiff.model": spec.model,
                                     "hybridiff.mode_requested": spec.mode, "hybridiff.steps": spec.num_steps})
                result = self._run(spec, context, on_step)
                mode_label = result.stats.mode_used
                span.set_attributes({"hybridiff.mode": result.stats.mode_used,
                                     "hybridiff.tau1": -1 if result.stats.tau1 is None else result.stats.tau1,
                                     "hybridiff.tau2": -1 if result.stats.tau2 is None else result.stats.tau2,
                                     "hybridiff.workers": ",".join(result.stats.workers)})
                for s in result.stats.steps:
                    self.metrics.step_seconds.labels(s.phase).observe(s.wall_seconds)
                self.metrics.data_plane_bytes.inc(result.stats.data_plane_bytes)
                self.metrics.request_seconds.labels(mode_label).observe(time.perf_counter() - received)
                return response_to_proto(result, spec.width, spec.height)
            except HybridiffError as exc:
                code = exc.code
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                raise
            finally:
                self.metrics.requests.labels(mode_label, code.name).inc()

    def _run(self, spec, context, on_step) -> GenerationResult:
        def check_alive() -> None:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the client's deadline passed")
            if not context.is_active():
                raise Cancelled("the client cancelled the request")

        mode = MODE_NAMES[spec.mode]
        want = 1 if (mode == Mode.SINGLE or not spec.guided and mode != Mode.PIPELINE) else 2
        start = time.perf_counter()
        entries = self.pool.acquire(spec.model, want, accept_one=(mode == Mode.AUTO), request_id=spec.request_id,
                                    timeout=self.config.acquire_timeout, check_alive=check_alive)
        queued = time.perf_counter() - start
        failed = False
        try:
            if mode == Mode.AUTO:
                mode = Mode.HYBRID if (len(entries) == 2 and spec.guided) else Mode.SINGLE
            cut = None
            if mode in (Mode.HYBRID, Mode.PIPELINE) and len(entries) == 2:
                cut = self.pool.split_cut(entries[0], spec.height, spec.width)
            handles = [RemoteWorker(e.worker_id, e.channel, e.info.data_address) for e in entries]

            def recover(failed_handle, survivors):
                """Swap a failed worker for an idle one, or go on with the survivor alone."""
                dead = next(e for e in entries if e.worker_id == failed_handle.name)
                entries.remove(dead)
                self.pool.release([dead], failed=True)
                keep = [e for e in entries if e.worker_id in {h.name for h in survivors}]
                want = 1 if mode == Mode.SINGLE else 2
                entries.extend(self.pool.take_idle(spec.model, want - len(keep), spec.request_id))
                if not entries:
                    raise Unavailable(f"worker {failed_handle.name} failed and no other worker is free")
                self.metrics.recoveries.inc()
                return [RemoteWorker(e.worker_id, e.channel, e.info.data_address) for e in entries]

            result = drive_request(spec, mode, handles, split_cut=cut, on_step=on_step, check_alive=check_alive,
                                   step_timeout=self.config.step_timeout, recover=recover)
            result.stats.queued_seconds = queued
            return result
        except HybridiffError as exc:
            failed = not isinstance(exc, (Cancelled, DeadlineExceeded))
            raise
        finally:
            self.pool.release(entries, failed=failed)

    @staticmethod
    def _abort(context, exc: HybridiffError) -> None:
        context.abort(exc.code, str(exc))

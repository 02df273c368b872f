"""The public ``hybridiff.v1.DiffusionService`` (docs/design.md section 3).

Every request: validate (INVALID_ARGUMENT naming the field, NOT_FOUND for an unknown model),
wait in the admission queue for a pair (RESOURCE_EXHAUSTED at once when full), resolve AUTO
against what was free, drive the steps, answer the images and the stats. Every error leaves
through ``serving.abort`` as one gRPC status with its ``google.rpc`` details — never a stack
trace.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from dataclasses import astuple, dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from coordinator.allocation import CostBook, Policy, admission
from coordinator.driver import ALIVE_CHECK_SECONDS, GenerationResult, StepStat, drive_request
from coordinator.elastic import ElasticLease
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import Lease, WorkerPool, pairing_key
from coordinator.remote import RemoteWorker
from hybridiff import logs, serving, telemetry
from hybridiff.errors import (
    Cancelled,
    DeadlineExceeded,
    HybridiffError,
    InvalidArgument,
    Unavailable,
    WorkerFailed,
    from_rpc_error,
    status_details,
)
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import MIME_TYPES, Mode, OutputFormat, Phase, label
from hybridiff.request import MAX_STEPS, HybridParams, ModelDefaults, RequestInput, SizeLimits, resolve_spec
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_FULL_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
DEADLINE_SLACK_SECONDS = 0.25
MEASURE_SPLIT_TIMEOUT = 300.0  # a worker measures a size once (a few forwards) and keeps it


def request_input_from_proto(req: pb.GenerateRequest) -> RequestInput:
    def opt(msg, name):
        return getattr(msg, name) if msg.HasField(name) else None

    h = req.hybrid
    return RequestInput(
        prompt=req.prompt,
        negative_prompt=opt(req, "negative_prompt"),
        width=opt(req, "width"),
        height=opt(req, "height"),
        num_steps=opt(req, "num_inference_steps"),
        guidance_scale=opt(req, "guidance_scale"),
        seed=opt(req, "seed"),
        mode=req.mode,
        hybrid={name: opt(h, name) for name in ("l_slope", "eps_slope", "k", "tau_cap")},
        window_guidance=req.window_guidance,
        output_format=req.output_format,
        quality=req.quality,
        num_images=req.num_images,
        request_id=req.request_id,
        model=req.model,
    )


def model_rules(
    info: worker_pb2.InfoResponse, overrides: dict[str, float | int | None]
) -> tuple[SizeLimits, ModelDefaults]:
    """Size limits and defaults of the model a worker serves; ``overrides`` replace hybrid defaults."""
    lim, hd = info.limits, info.hybrid_defaults
    params = HybridParams(hd.l_slope, hd.eps_slope, hd.k, hd.tau_cap).replace(**overrides).validate()
    return (
        SizeLimits(lim.multiple, lim.min_side, lim.max_side, lim.default_side, lim.max_images or 1),
        ModelDefaults(params, info.default_steps, info.default_guidance_scale),
    )


def step_stat_to_proto(s: StepStat) -> pb.StepStat:
    msg = pb.StepStat(
        step=s.step,
        phase=s.phase,
        bytes_sent=s.bytes_sent,
        wall_seconds=s.wall_seconds,
        compute_seconds=s.compute_seconds,
        workers=[
            pb.WorkerStep(
                worker=name,
                phase=w.phase,
                compute_seconds=w.compute_seconds,
                wall_seconds=w.wall_seconds,
                bytes_sent=w.bytes_sent,
                device_to_host_copies=w.device_to_host_copies,
                device_to_host_seconds=w.device_to_host_seconds,
                host_to_device_copies=w.host_to_device_copies,
                host_to_device_seconds=w.host_to_device_seconds,
                send_seconds=w.send_seconds,
                receive_wait_seconds=w.receive_wait_seconds,
                bytes_received=w.bytes_received,
                other_seconds=w.other_seconds,
                frame_copies=w.frame_copies,
                frame_copy_seconds=w.frame_copy_seconds,
                resolve_wait_seconds=w.resolve_wait_seconds,
                command_wait_seconds=w.command_wait_seconds,
                overlapped_copy_seconds=w.overlapped_copy_seconds,
                overlapped_send_seconds=w.overlapped_send_seconds,
            )
            for name, w in s.workers.items()
        ],
        critical_compute_seconds=s.critical_compute_seconds,
        copy_seconds=s.copy_seconds,
        wire_seconds=s.wire_seconds,
        worker_other_seconds=s.worker_other_seconds,
        control_seconds=s.control_seconds,
    )
    if s.rel_mae is not None:
        msg.rel_mae = s.rel_mae
    return msg


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


def model_info_to_proto(info: worker_pb2.InfoResponse) -> pb.ModelInfo:
    lim = info.limits
    return pb.ModelInfo(
        name=info.model_name,
        arch=info.arch,
        default_width=lim.default_side,
        default_height=lim.default_side,
        max_width=lim.max_side,
        max_height=lim.max_side,
        hybrid_defaults=info.hybrid_defaults,
        default_guidance_scale=info.default_guidance_scale,
        default_steps=info.default_steps,
        size_multiple=lim.multiple,
        min_side=lim.min_side,
        max_images=lim.max_images or 1,
        max_steps=MAX_STEPS,
    )


def as_typed_error(exc: BaseException) -> HybridiffError:
    """What the client is told: a typed error as it is; anything else is this service's bug,
    logged here with its traceback and answered as INTERNAL without its text."""
    if isinstance(exc, HybridiffError):
        return exc
    log.error("request failed", exc_info=exc)
    return WorkerFailed("internal error; see the coordinator log")


def worker_call_error(worker: str, what: str, err: grpc.RpcError) -> HybridiffError:
    """A failed control call to a worker as the client sees it, naming the worker: a worker that
    is gone stays UNAVAILABLE (a retry may find another); one that did not answer in time is
    UNAVAILABLE too; one that refused or broke is this service's fault: INTERNAL."""
    if "ErrorInfo" not in status_details(err):  # not one of ours: its text is the worker's internals
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"worker {worker} is unreachable ({what})", worker=worker)
        return WorkerFailed(f"worker {worker}: {what} failed ({err.code().name}); see its log", worker=worker)
    cause = from_rpc_error(err, prefix=f"worker {worker}: {what}: ")
    if isinstance(cause, Unavailable):
        return cause
    if isinstance(cause, (DeadlineExceeded, Cancelled)):
        return Unavailable(f"worker {worker} did not answer {what}: {err.details()}", worker=worker)
    verb = "refused" if isinstance(cause, InvalidArgument) else "failed"
    return WorkerFailed(f"worker {worker} {verb} {what} ({cause.reason}): {err.details()}", worker=worker)


class _Outcome:
    """A request's status, counted once, as soon as it is known: before its workers are
    released (a release may wait for them), and under the code the client is answered with."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics
        self.counted = False

    def count(self, mode_label: str, code: grpc.StatusCode) -> None:
        if not self.counted:
            self.counted = True
            self.metrics.requests.labels(mode_label, code.name).inc()


@dataclass
class ServiceConfig:
    acquire_timeout: float = 600.0
    step_timeout: float = 600.0
    # Operator overrides of the models' hybrid defaults (l_slope, eps_slope, k, tau_cap);
    # None keeps the model's.
    hybrid_defaults: dict = field(default_factory=dict)
    policy: Policy = Policy.ADAPTIVE  # how AUTO requests are given workers (coordinator.allocation)
    speculative_steps: bool = True  # HYBRID's undecided step goes out speculatively (coordinator.driver)


class DiffusionService(diffusion_pb2_grpc.DiffusionServiceServicer):
    def __init__(
        self, pool: WorkerPool, metrics: CoordinatorMetrics, config: ServiceConfig | None = None
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.config = config or ServiceConfig()
        self.draining = False
        self.costs = CostBook()
        # The stage cut per (model, pairing key, size), first measurement wins:
        # every pair of a model then splits alike, so an identical request gives an identical
        # image whichever pair runs it (each worker's timing differs, most under load).
        self._cuts: dict[tuple, int] = {}
        self._cuts_lock = threading.Lock()
        # Per model: seconds of one step per pixel of the batch (the slowest worker's compute),
        # a moving average; a request's expected step cost scales it by its own size.
        self._pixel_cost: dict[str, float] = {}
        self._lock = threading.Lock()
        self._streams: set[threading.Thread] = set()  # GenerateStream's request threads
        self._tracer = telemetry.tracer("hybridiff.coordinator")
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
                events.put(
                    pb.GenerateStreamResponse(
                        result=self._generate(
                            request.request,
                            context,
                            on_step,
                            on_resolved=request_id.append,
                            method="GenerateStream",
                        )
                    )
                )
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
        seen: dict[str, pb.ModelInfo] = {}
        for e in self.pool.snapshot():
            if e.info is not None and not e.gone and e.model not in seen:
                seen[e.model] = model_info_to_proto(e.info)
        return pb.ListModelsResponse(models=list(seen.values()))

    def ClusterStatus(self, request, context):
        workers = [
            pb.WorkerStatus(address=e.address, state=e.state, model=e.model, current_request_id=e.request_id)
            for e in self.pool.snapshot()
        ]
        return pb.ClusterStatusResponse(
            workers=workers,
            queue_depth=self.pool.queue_depth,
            queue_capacity=self.pool.queue_capacity,
            draining=self.draining,
        )

    # --- one request ----------------------------------------------------------------
    def _generate(
        self, request, context, on_step, on_resolved=None, method: str = "Generate"
    ) -> pb.GenerateResponse:
        received = time.perf_counter()
        mode_label, code = "unknown", grpc.StatusCode.OK
        outcome = _Outcome(self.metrics)
        # The standard RPC attributes (OpenTelemetry semantic conventions) beside hybridiff.*.
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE_FULL_NAME, "rpc.method": method}
        host, _, port = self.server_address.rpartition(":")
        if host and host not in ("0.0.0.0", "::", "[::]"):  # a wildcard names no address
            attributes["server.address"] = host
            attributes["server.port"] = int(port)
        self.metrics.requests_in_flight.inc()
        log_token = logs.set_request_id(None)  # named once the request is resolved
        with self._tracer.start_as_current_span("hybridiff.generate", attributes=attributes) as span:
            try:
                if self.draining:
                    raise Unavailable("the coordinator is draining")
                raw = request_input_from_proto(request)
                info = self.pool.model_info(raw.model)
                raw.model = info.model_name
                spec = resolve_spec(raw, *model_rules(info, self.config.hybrid_defaults))
                logs.set_request_id(spec.request_id)
                if on_resolved:
                    on_resolved(spec.request_id)
                span.set_attributes(
                    {
                        "gen_ai.request.model": spec.model,
                        "hybridiff.request_id": spec.request_id,
                        "hybridiff.model": spec.model,
                        "hybridiff.mode_requested": label(spec.mode),
                        "hybridiff.steps": spec.num_steps,
                    }
                )
                result = self._run(spec, context, on_step, outcome)
                mode_label = label(result.stats.mode_used)
                span.set_attributes(
                    {
                        "hybridiff.mode": mode_label,
                        "hybridiff.tau1": -1 if result.stats.tau1 is None else result.stats.tau1,
                        "hybridiff.tau2": -1 if result.stats.tau2 is None else result.stats.tau2,
                        "hybridiff.workers": ",".join(result.stats.workers),
                    }
                )
                for s in result.stats.steps:
                    self.metrics.step_seconds.labels(label(s.phase)).observe(s.wall_seconds)
                self.metrics.data_plane_bytes.inc(result.stats.data_plane_bytes)
                self.metrics.request_seconds.labels(mode_label).observe(time.perf_counter() - received)
                log.info(
                    "request done: mode %s, %d steps, %.3fs",
                    mode_label,
                    len(result.stats.steps),
                    time.perf_counter() - received,
                )
                response = response_to_proto(result, spec.width, spec.height, spec.output_format)
                _check_alive(context)  # a client gone meanwhile is answered, and counted, as such
                return response
            except Exception as exc:
                error = as_typed_error(exc)
                code = error.code
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
                if error is exc:
                    raise
                raise error from exc
            except BaseException:
                code = grpc.StatusCode.INTERNAL
                raise
            finally:
                outcome.count(mode_label, code)
                self.metrics.requests_in_flight.dec()
                logs.reset_request_id(log_token)

    def _run(self, spec, context, on_step, outcome: _Outcome) -> GenerationResult:
        def check_alive() -> None:
            _check_alive(context)

        mode = spec.mode
        policy = self.config.policy
        width = admission(policy, mode, spec.guided, self.pool.view(spec.model), self.costs.costs(spec.model))
        start = time.perf_counter()
        decide_again = None
        if mode == Mode.AUTO:  # the width is decided again when the request reaches the queue's head

            def decide_again(view):
                return astuple(admission(policy, mode, spec.guided, view, self.costs.costs(spec.model)))

        lease = self.pool.lease(
            spec.model,
            width.want,
            accept_one=width.accept_one,
            request_id=spec.request_id,
            timeout=self.config.acquire_timeout,
            check_alive=check_alive,
            admission=decide_again,
        )
        queued = time.perf_counter() - start
        self.metrics.queue_wait_seconds.observe(queued)
        if self.draining:  # granted as the drain began: it starts nothing new
            lease.release()
            raise Unavailable("the coordinator is draining")
        failed = finished = False
        blamed: str | None = None
        try:
            elastic = None
            if mode == Mode.AUTO and policy == Policy.ADAPTIVE and spec.guided:
                # The paired schedule; alone, the request runs the CFG batch until it grows.
                mode = Mode.HYBRID
                elastic = ElasticLease(
                    lease,
                    policy,
                    self.costs,
                    spec.num_steps,
                    _handles,
                    lambda decision: self.metrics.elastic_events.labels(decision.value).inc(),
                )
            elif mode == Mode.AUTO:
                mode = Mode.HYBRID if (len(lease) == 2 and spec.guided) else Mode.SINGLE
            cut = None
            if mode in (Mode.HYBRID, Mode.PIPELINE) and (len(lease) == 2 or elastic is not None):
                cut = self._split_cut(lease, spec, check_alive)

            def recover(failed_handle, survivors):
                """Swap a failed worker for an idle one, or go on with the survivor alone."""
                lease.replace_failed(
                    failed_handle.name, {h.name for h in survivors}, want=1 if mode == Mode.SINGLE else 2
                )
                self.metrics.recoveries.inc()
                return _handles(lease)

            result = drive_request(
                spec,
                mode,
                _handles(lease),
                split_cut=cut,
                on_step=on_step,
                check_alive=check_alive,
                step_timeout=self.config.step_timeout,
                recover=recover,
                elastic=elastic,
                step_cost=self._expected_step(spec),
                speculate=self.config.speculative_steps,
            )
            finished = True  # the workers ended their sessions: free at once
            result.stats.queued_seconds = queued
            self._learn_costs(spec, result)
            return result
        except Exception as exc:
            error = as_typed_error(exc)
            # A cancel, a deadline or a refused argument says nothing about the workers' health.
            failed = not isinstance(error, (Cancelled, DeadlineExceeded, InvalidArgument))
            blamed = error.blamed_worker
            outcome.count("unknown", error.code)
            if error is exc:
                raise
            raise error from exc
        finally:
            if failed and blamed is not None:  # only the worker at fault is quarantined
                lease.release_blaming(blamed)
            else:  # ended early, the workers may still be in the aborted step: free once they confirm
                lease.release(failed=failed, aborted=not finished)

    def _split_cut(self, lease: Lease, spec, check_alive) -> int:
        """The model's stage cut at this size: measured once, by the first lease that needs it."""
        info = lease.entries[0].info
        key = (spec.model, pairing_key(info), spec.height, spec.width)
        with self._cuts_lock:
            cut = self._cuts.get(key)
        if cut is None:
            try:
                cut = self._measure_cut(lease, spec, check_alive)
            except HybridiffError as error:
                if error.blamed_worker is None:
                    raise
                cut = self._measure_cut(self._replace(lease, error), spec, check_alive)
            with self._cuts_lock:
                cut = self._cuts.setdefault(key, cut)
        return cut

    def _replace(self, lease: Lease, error: HybridiffError) -> Lease:
        """A worker failed before any step: quarantine it and go on with an idle one, as the driver
        does for a failed step; ``error`` again when no worker is free to take its place."""
        want = len(lease)
        others = {e.worker_id for e in lease.entries if e.worker_id != error.blamed_worker}
        try:
            lease.replace_failed(error.blamed_worker, others, want)
        except Unavailable:
            raise error from None
        if len(lease) < want:
            raise error
        self.metrics.recoveries.inc()
        log.warning(
            "worker %s failed (%s); measuring on %s", error.blamed_worker, error, lease.entries[0].worker_id
        )
        return lease

    def _measure_cut(self, lease: Lease, spec, check_alive) -> int:
        """The balanced stage cut, measured by the lease's first worker: a call that a cancel or
        a passed deadline ends at once, and whose failure names the worker."""
        entry = lease.entries[0]
        request = worker_pb2.MeasureSplitRequest(width=spec.width, height=spec.height)
        call = entry.stub.MeasureSplit.future(request, timeout=MEASURE_SPLIT_TIMEOUT)
        try:
            while True:
                try:
                    return call.result(timeout=ALIVE_CHECK_SECONDS).cut
                except grpc.FutureTimeoutError:
                    check_alive()
        except grpc.RpcError as err:
            error = worker_call_error(entry.worker_id, "MeasureSplit", err)
            error.blamed_worker = entry.worker_id
            raise error from None
        finally:
            call.cancel()  # no-op once done

    def _expected_step(self, spec) -> float | None:
        """One step of ``spec`` as the model's earlier requests measured it (None: none yet)."""
        per_pixel = self._pixel_cost.get(spec.model)
        return None if per_pixel is None else per_pixel * spec.width * spec.height * spec.num_images

    def _learn_costs(self, spec, result: GenerationResult) -> None:
        """Feed the allocation policy the step costs this request measured (median per kind)."""
        by_kind: dict[str, list[float]] = {"single": [], "paired": []}
        for s in result.stats.steps[1:]:  # the first step after a begin carries no queueing of steps
            if s.phase == Phase.SINGLE and spec.guided:
                by_kind["single"].append(s.wall_seconds)
            elif s.phase == Phase.DATA_PARALLEL:
                by_kind["paired"].append(s.wall_seconds)
        for kind, values in by_kind.items():
            if values:
                self.costs.observe(spec.model, kind, statistics.median(values))
        self.costs.observe(spec.model, "switch", result.stats.encoding_seconds)
        steps = [s.compute_seconds for s in result.stats.steps[1:]]
        if steps:
            per_pixel = statistics.median(steps) / (spec.width * spec.height * spec.num_images)
            old = self._pixel_cost.get(spec.model)
            self._pixel_cost[spec.model] = per_pixel if old is None else 0.8 * old + 0.2 * per_pixel


def _check_alive(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExceeded or Cancelled once the client's call has ended."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the client's deadline passed")
    if not context.is_active():
        # gRPC ends the call when its deadline passes, a moment before time_remaining()
        # reaches 0 on this side: a call that ends at its deadline timed out, not cancelled.
        if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
            raise DeadlineExceeded("the client's deadline passed")
        raise Cancelled("the client cancelled the request")


def _handles(lease: Lease) -> list[RemoteWorker]:
    return [
        RemoteWorker(e.worker_id, e.channel, e.info.data_address, e.info.worker_id) for e in lease.entries
    ]

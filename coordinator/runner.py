"""The coordinator's request runner: one request's life, from the public ``GenerateRequest`` to
its ``GenerationResult``, whichever edge (gRPC or HTTP) received it (docs/design.md section 2).

In order: validate against the model's limits (``hybridiff.request.resolve_spec``), wait in the
model's admission queue for the workers the policy wants (``coordinator.pool``), resolve AUTO,
measure the stage cut once per model and size, drive the steps (``coordinator.driver``) with
recovery and elastic changes on the lease, learn the step costs, and count the request in the
metrics, the span and the logs. The edges only convert: their message to a ``GenerateRequest``,
the result to theirs, and a typed error to their status.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from typing import Protocol

import grpc
from opentelemetry import trace

from coordinator.allocation import CostBook, Policy, admission
from coordinator.auto_mode import AutoChoice, applied, calibrated, choose
from coordinator.device_costs import DeviceCostBook
from coordinator.driver import ALIVE_CHECK_SECONDS, GenerationResult, StepStat, drive_request
from coordinator.elastic import ElasticLease
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import Lease, WorkerPool
from coordinator.remote import WorkerFault, measure_split
from coordinator.worker_info import WorkerInfo, pairing_key
from hybridiff import logs, telemetry
from hybridiff.errors import (
    Cancelled,
    DeadlineExceeded,
    HybridiffError,
    InvalidArgument,
    Unavailable,
    WorkerFailed,
)
from hybridiff.internal.v1 import dataplane_pb2, worker_pb2_grpc
from hybridiff.protocol import Mode, Phase, label
from hybridiff.request import GenerationSpec, resolve_spec
from hybridiff.v1 import diffusion_pb2 as pb

log = logging.getLogger(__name__)

OnStep = Callable[[StepStat, int], None]


class ClientCall(Protocol):
    """The client's side of one request, as the runner sees it: ``check_alive`` raises
    ``Cancelled`` once the client went away and ``DeadlineExceeded`` once its deadline passed."""

    def check_alive(self) -> None: ...


@dataclass
class RunnerConfig:
    acquire_timeout: float = 600.0
    step_timeout: float = 600.0
    # Operator overrides of the models' hybrid defaults (hybridiff.request.HYBRID_FIELDS);
    # None keeps the model's.
    hybrid_defaults: dict = field(default_factory=dict)
    policy: Policy = Policy.ADAPTIVE  # how AUTO requests are given workers (coordinator.allocation)
    speculative_steps: bool = True  # HYBRID's undecided step goes out speculatively (coordinator.driver)


@dataclass
class Generation:
    """A request that ran: the spec it resolved to and what the workers made of it."""

    spec: GenerationSpec
    result: GenerationResult


def as_typed_error(exc: BaseException) -> HybridiffError:
    """What the client is told: a typed error as it is; anything else is this service's bug,
    logged here with its traceback and answered as INTERNAL without its text."""
    if isinstance(exc, WorkerFault):
        exc = exc.error
    if isinstance(exc, HybridiffError):
        return exc
    log.error("request failed", exc_info=exc)
    return WorkerFailed("internal error; see the coordinator log")


class _Outcome:
    """A request's status, counted once, as soon as it is known: before its workers are
    released (a release may wait for them), and under the code the client is answered with."""

    def __init__(self, metrics: CoordinatorMetrics, api: str) -> None:
        self.metrics, self.api = metrics, api
        self.counted = False
        self.mode_label = "unknown"  # the mode the request runs in, once known

    def count(self, code: grpc.StatusCode) -> None:
        if not self.counted:
            self.counted = True
            self.metrics.requests.labels(self.mode_label, code.name, self.api).inc()


class RequestRunner:
    def __init__(
        self, pool: WorkerPool, metrics: CoordinatorMetrics, config: RunnerConfig | None = None
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.config = config or RunnerConfig()
        self.draining = False
        self.costs = CostBook()
        self.device_costs = DeviceCostBook()  # per model and size: AUTO's schedule model's inputs
        # The stage cut per (model, pairing key, size), first measurement wins:
        # every pair of a model then splits alike, so an identical request gives an identical
        # image whichever pair runs it (each worker's timing differs, most under load).
        self._cuts: dict[tuple, int] = {}
        self._cuts_lock = threading.Lock()
        # Per model: seconds of one step per pixel of the batch (the slowest worker's compute),
        # a moving average; a request's expected step cost scales it by its own size.
        self._pixel_cost: dict[str, float] = {}
        self._tracer = telemetry.tracer("hybridiff.coordinator")

    def models(self) -> list[WorkerInfo]:
        """What each served model's workers say of it, one per model, in pool order."""
        seen: dict[str, WorkerInfo] = {}
        for e in self.pool.snapshot():
            if e.info is not None and not e.gone and e.model not in seen:
                seen[e.model] = e.info
        return list(seen.values())

    def generate(
        self,
        request: pb.GenerateRequest,
        client: ClientCall,
        *,
        on_step: OnStep | None = None,
        on_resolved: Callable[[GenerationSpec], None] | None = None,
        span_attributes: dict | None = None,
        api: str = "grpc",
        on_latents: Callable[[int, dataplane_pb2.Tensor], None] | None = None,
    ) -> Generation:
        """Run one request to its end; raises a ``HybridiffError`` (never anything else) on failure.
        ``on_resolved`` is told the spec once validated, ``on_step`` every completed step;
        ``span_attributes``: the edge's own attributes of the request's span; ``api``: the edge
        (grpc or http), a label of the request metrics; ``on_latents(step,
        latents)``: the latents after each step (the checkpoint worker U reports), for previews."""
        received = time.perf_counter()
        code = grpc.StatusCode.OK
        outcome = _Outcome(self.metrics, api)
        self.metrics.requests_in_flight.inc()
        log_token = logs.set_request_id(None)  # named once the request is resolved
        with self._tracer.start_as_current_span("hybridiff.generate", attributes=span_attributes) as span:
            try:
                if self.draining:
                    raise Unavailable("the coordinator is draining")
                spec = self._resolve(request)
                logs.set_request_id(spec.request_id)
                if on_resolved:
                    on_resolved(spec)
                span.set_attributes(
                    {
                        "gen_ai.request.model": spec.model,
                        "hybridiff.request_id": spec.request_id,
                        "hybridiff.model": spec.model,
                        "hybridiff.mode_requested": label(spec.mode),
                        "hybridiff.steps": spec.num_steps,
                    }
                )
                result = self._run(spec, client, on_step, outcome, on_latents)
                self._observe(span, result, time.perf_counter() - received, api)
                client.check_alive()  # a client gone meanwhile is answered, and counted, as such
                return Generation(spec, result)
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
                outcome.count(code)
                self.metrics.requests_in_flight.dec()
                logs.reset_request_id(log_token)

    def _resolve(self, request: pb.GenerateRequest) -> GenerationSpec:
        info = self.pool.model_info(request.model)
        limits, defaults = info.rules(self.config.hybrid_defaults)
        return resolve_spec(request, limits, defaults, model=info.model_name)

    def _observe(self, span: trace.Span, result: GenerationResult, seconds: float, api: str) -> None:
        stats = result.stats
        mode_label = label(stats.mode_used)
        span.set_attributes(
            {
                "hybridiff.mode": mode_label,
                "hybridiff.tau1": -1 if stats.tau1 is None else stats.tau1,
                "hybridiff.tau2": -1 if stats.tau2 is None else stats.tau2,
                "hybridiff.workers": ",".join(stats.workers),
            }
        )
        if stats.auto_choice is not None:
            choice = stats.auto_choice
            span.set_attributes(
                {
                    "hybridiff.auto.mode": label(choice.mode),
                    "hybridiff.auto.window_guidance": label(choice.schedule.window_guidance)
                    if choice.schedule.window_guidance is not None
                    else "",
                    "hybridiff.auto.k": choice.schedule.k,
                    "hybridiff.auto.predicted_seconds": choice.predicted_seconds,
                    "hybridiff.auto.basis": choice.basis,
                }
            )
        for s in stats.steps:
            self.metrics.step_seconds.labels(label(s.phase)).observe(s.wall_seconds)
        self.metrics.data_plane_bytes.inc(stats.data_plane_bytes)
        self.metrics.request_seconds.labels(mode_label, api).observe(seconds)
        log.info("request done: mode %s, %d steps, %.3fs", mode_label, len(stats.steps), seconds)

    def _run(
        self, spec: GenerationSpec, client: ClientCall, on_step, outcome: _Outcome, on_latents=None
    ) -> GenerationResult:
        lease, queued = self._lease(spec, client)
        failed = finished = False
        blamed: str | None = None
        try:
            spec, mode, elastic, choice, notes = self._mode(spec, lease, client)
            # A request that ends early is counted under the mode it was running in.
            outcome.mode_label = label(mode)
            cut = None
            if mode in (Mode.HYBRID, Mode.PIPELINE) and (len(lease) == 2 or elastic is not None):
                cut = self._split_cut(lease, spec, client)

            def recover(failed_handle, survivors, needs_pair: bool, busy: bool = False):
                """Swap a failed worker for an idle one, or go on with the survivor alone where that
                gives the same image; else wait at the head of the queue for the next free worker
                (or pair), within the request's own deadline (docs/design.md section 5). ``busy``:
                the worker serves another coordinator: held aside, not quarantined (section 10)."""
                want = 1 if mode == Mode.SINGLE else 2
                lease.replace_failed(
                    failed_handle.name,
                    {h.name for h in survivors},
                    want=want,
                    need=2 if needs_pair else 1,
                    timeout=self.config.acquire_timeout,
                    check_alive=client.check_alive,
                    busy=busy,
                )
                if not busy:
                    self.metrics.recoveries.inc()
                return lease.handles()

            result = drive_request(
                spec,
                mode,
                lease.handles(),
                split_cut=cut,
                on_step=on_step,
                check_alive=client.check_alive,
                step_timeout=self.config.step_timeout,
                recover=recover,
                elastic=elastic,
                step_cost=self._expected_step(spec),
                speculate=self.config.speculative_steps,
                on_latents=on_latents,
            )
            finished = True  # the workers ended their sessions: free at once
            outcome.mode_label = label(result.stats.mode_used)
            result.stats.queued_seconds = queued
            result.stats.auto_choice = choice
            result.stats.notes[:0] = notes
            self._learn_costs(spec, result)
            return result
        except Exception as exc:
            blamed = exc.worker if isinstance(exc, WorkerFault) else None
            error = as_typed_error(exc)
            # A cancel, a deadline or a refused argument says nothing about the workers' health.
            failed = not isinstance(error, (Cancelled, DeadlineExceeded, InvalidArgument))
            outcome.count(error.code)
            if error is exc:
                raise
            raise error from exc
        finally:
            if failed and blamed is not None:  # only the worker at fault is quarantined
                lease.release_blaming(blamed)
            else:  # ended early, the workers may still be in the aborted step: free once they confirm
                lease.release(failed=failed, aborted=not finished)

    def _lease(self, spec: GenerationSpec, client: ClientCall) -> tuple[Lease, float]:
        """The workers the policy wants for ``spec``, and the seconds it waited for them."""
        policy = self.config.policy
        width = admission(
            policy, spec.mode, spec.guided, self.pool.view(spec.model), self.costs.costs(spec.model)
        )
        decide_again = None
        if spec.mode == Mode.AUTO:  # the width is decided again when the request reaches the queue's head

            def decide_again(view):
                return astuple(admission(policy, spec.mode, spec.guided, view, self.costs.costs(spec.model)))

        start = time.perf_counter()
        lease = self.pool.lease(
            spec.model,
            width.want,
            accept_one=width.accept_one,
            request_id=spec.request_id,
            timeout=self.config.acquire_timeout,
            check_alive=client.check_alive,
            admission=decide_again,
        )
        queued = time.perf_counter() - start
        self.metrics.queue_wait_seconds.observe(queued)
        if self.draining:  # granted as the drain began: it starts nothing new
            lease.release()
            raise Unavailable("the coordinator is draining")
        return lease, queued

    def _mode(
        self, spec: GenerationSpec, lease: Lease, client: ClientCall
    ) -> tuple[GenerationSpec, Mode, ElasticLease | None, AutoChoice | None, list[str]]:
        """The mode the request runs in on its lease (AUTO resolved, ``spec`` with the window
        AUTO chose), its elastic hook, AUTO's choice and what the stats' notes should say of it.

        The allocation policy decides whether a pair may be used at all (docs/design.md section
        10); cost-aware AUTO (``coordinator.auto_mode``) then picks the fastest paired schedule
        the model's calibration allows, priced on the costs its workers measured."""
        if spec.mode != Mode.AUTO:
            return spec, spec.mode, None, None, []
        elastic = self.config.policy == Policy.ADAPTIVE and spec.guided
        if not (spec.guided and (len(lease) == 2 or elastic)):
            return spec, Mode.SINGLE, None, None, []
        choice, notes = self._choose(spec, lease, client)
        mode = Mode.HYBRID if choice is None else choice.mode
        if choice is not None and mode != Mode.SINGLE:
            spec = applied(choice, spec)
            if calibrated(choice):  # without a calibration the elastic rule keeps today's costs
                steps = spec.num_steps
                self.costs.predicted(
                    spec.model, choice.single_seconds / steps, choice.predicted_seconds / steps
                )
        if mode == Mode.SINGLE:
            if len(lease) == 2:
                lease.give_back(lease.entries[1].worker_id)  # the pair would not pay: not held
            return spec, mode, None, choice, notes
        if elastic:
            # The paired schedule; alone, the request runs the CFG batch until it grows.
            return (
                spec,
                mode,
                ElasticLease(
                    lease,
                    self.config.policy,
                    self.costs,
                    spec.num_steps,
                    lambda decision: self.metrics.elastic_events.labels(decision.value).inc(),
                ),
                choice,
                notes,
            )
        return spec, mode, None, choice, notes

    def _choose(
        self, spec: GenerationSpec, lease: Lease, client: ClientCall
    ) -> tuple[AutoChoice | None, list[str]]:
        """AUTO's choice for a request that may run paired, and the notes that explain a
        fallback to the fixed choice (HYBRID with the model's window)."""
        if spec.num_images != 1:
            return None, ["AUTO: costs are measured for one image; HYBRID as before"]
        self._split_cut(lease, spec, client)  # measures the size's costs with the cut, once
        costs = self.device_costs.costs(self._cost_key(spec))
        if costs is None:
            return None, ["AUTO: the workers measured no costs; HYBRID as before"]
        calibration = lease.entries[0].info.calibration
        k = spec.hybrid.k if "k" in spec.hybrid_set else None
        choice = choose(costs, calibration, spec.num_steps, spec.hybrid, spec.window_guidance, k)
        notes = [] if calibration is not None else ["AUTO: the model has no calibration; HYBRID as before"]
        return choice, notes

    @staticmethod
    def _cost_key(spec: GenerationSpec) -> tuple[str, int, int]:
        return (spec.model, spec.height, spec.width)

    def _split_cut(self, lease: Lease, spec: GenerationSpec, client: ClientCall) -> int:
        """The model's stage cut at this size: measured once, by the first lease that needs it."""
        info = lease.entries[0].info
        key = (spec.model, pairing_key(info), spec.height, spec.width)
        with self._cuts_lock:
            cut = self._cuts.get(key)
        if cut is None:
            try:
                cut = self._measure_cut(lease, spec, client)
            except WorkerFault as fault:
                cut = self._measure_cut(self._replace(lease, fault), spec, client)
            with self._cuts_lock:
                cut = self._cuts.setdefault(key, cut)
        return cut

    def _replace(self, lease: Lease, fault: WorkerFault) -> Lease:
        """A worker failed before any step: quarantine it and go on with an idle one, as the driver
        does for a failed step; ``fault`` again when no worker is free to take its place."""
        want = len(lease)
        others = {e.worker_id for e in lease.entries if e.worker_id != fault.worker}
        try:
            lease.replace_failed(fault.worker, others, want)
        except Unavailable:
            raise fault from None
        if len(lease) < want:
            raise fault
        self.metrics.recoveries.inc()
        log.warning(
            "worker %s failed (%s); measuring on %s", fault.worker, fault.error, lease.entries[0].worker_id
        )
        return lease

    def _measure_cut(self, lease: Lease, spec: GenerationSpec, client: ClientCall) -> int:
        entry = lease.entries[0]
        stub = worker_pb2_grpc.WorkerControlServiceStub(entry.channel)
        measured = measure_split(
            stub, entry.worker_id, spec.width, spec.height, client.check_alive, ALIVE_CHECK_SECONDS
        )
        self.device_costs.measured(self._cost_key(spec), measured)
        return measured.cut

    def _expected_step(self, spec: GenerationSpec) -> float | None:
        """One step of ``spec`` as the model's earlier requests measured it (None: none yet)."""
        per_pixel = self._pixel_cost.get(spec.model)
        return None if per_pixel is None else per_pixel * spec.width * spec.height * spec.num_images

    def _learn_costs(self, spec: GenerationSpec, result: GenerationResult) -> None:
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
        if spec.guided and spec.num_images == 1:
            self.device_costs.observe(self._cost_key(spec), result.stats.steps, result.stats.window_guidance)
        steps = [s.compute_seconds for s in result.stats.steps[1:]]
        if steps:
            per_pixel = statistics.median(steps) / (spec.width * spec.height * spec.num_images)
            old = self._pixel_cost.get(spec.model)
            self._pixel_cost[spec.model] = per_pixel if old is None else 0.8 * old + 0.2 * per_pixel

"""Drives one request over its worker(s): the coordinator's side of the step protocol.

The driver owns the schedule (and so the discrepancy monitor). It issues every step whose
phase is already decided — all of them in SINGLE / CFG_PARALLEL / PIPELINE, and in HYBRID
the steps before the monitor could possibly fire — so both workers run each step with the same
phase at the same index. In HYBRID between L and tau1, where the phase of step i + 1 depends on
the rel-MAE of step i, it also issues step i + 1 *speculatively* before that value arrives: the
workers compute it as data parallel (the conditional branch through the stages), and once the
monitor has observed step i the driver sends the step's ``ResolveCommand``: DATA_PARALLEL, or
the PIPELINE_FILL opening the window. The round trip then overlaps step i + 1's compute
instead of idling both workers; the decision stays the monitor's, and both workers
switch at the step it names whatever the timing of the messages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from google.protobuf.message import Message
from opentelemetry import trace

from coordinator.allocation import Decision
from coordinator.auto_mode import AutoChoice
from coordinator.remote import WorkerFault, as_seen_by_the_client
from coordinator.schedule import StepSchedule
from hybridiff import step_stats, telemetry
from hybridiff.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PeerTimeout,
    WorkerBusy,
    WorkerFailed,
)
from hybridiff.internal.v1 import dataplane_pb2, worker_pb2
from hybridiff.protocol import REFRESHING_POLICIES, Mode, OutputFormat, Phase, Role, WindowGuidance, label
from hybridiff.protojson import message_json
from hybridiff.request import GenerationSpec
from hybridiff.v1 import diffusion_pb2 as pb

log = logging.getLogger(__name__)


class WorkerHandle(Protocol):
    """The coordinator's view of one worker: commands (``SessionRequest``) run in order and
    their events (``SessionResponse``) come back as futures."""

    name: str
    data_address: str  # where its peer pushes data-plane frames ("" in process)
    identity: str  # the sender name its data-plane frames carry (InfoResponse.worker_id)

    def send(self, cmd: worker_pb2.SessionRequest) -> Future: ...
    def abort(self, request_id: str) -> None: ...


@dataclass
class StepStat:
    """One step as the coordinator saw it; the split fields describe its slowest worker, and
    critical_compute + copy + wire + worker_other + control = wall (control never below 0):
    control is the time between coordinator and workers, a speculative step's wait for its
    phase included."""

    step: int
    phase: Phase
    rel_mae: float | None
    bytes_sent: int
    wall_seconds: float
    compute_seconds: float
    workers: dict[str, pb.WorkerStep] = field(default_factory=dict)  # each names its worker
    critical_compute_seconds: float = field(init=False, default=0.0)
    copy_seconds: float = field(init=False, default=0.0)
    wire_seconds: float = field(init=False, default=0.0)
    worker_other_seconds: float = field(init=False, default=0.0)
    control_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.workers:
            self._split_overhead()

    def _split_overhead(self) -> None:
        """The split of the slowest worker; control is what the step's wall time spent outside
        it (commands and events in flight, the worker waiting for its next command)."""
        w = max(self.workers.values(), key=lambda w: w.wall_seconds)
        self.critical_compute_seconds = w.compute_seconds
        self.copy_seconds = step_stats.copy_seconds(w)
        self.wire_seconds = step_stats.wire_seconds(w)
        self.worker_other_seconds = w.other_seconds
        self.control_seconds = max(0.0, self.wall_seconds - (w.wall_seconds - w.resolve_wait_seconds))


@dataclass
class GenerationStats:
    mode_used: Mode
    window_guidance: WindowGuidance | None  # None when no window was opened
    tau1: int | None
    tau2: int | None
    tau1_source: str
    split_cut: int | None
    workers: list[str]
    steps: list[StepStat]
    data_plane_bytes: int
    encoding_seconds: float
    denoising_seconds: float
    decoding_seconds: float
    queued_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    auto_choice: AutoChoice | None = None  # what AUTO chose (coordinator.auto_mode); None: a named mode

    def to_dict(self) -> dict:
        """The stats as JSON-ready data (enums by their edge names)."""
        return _jsonable(self)


def _named(worker: str, report: pb.WorkerStep) -> pb.WorkerStep:
    """A worker's step report as the public API gives it: copied whole, naming the worker."""
    named = pb.WorkerStep()
    named.CopyFrom(report)
    named.worker = worker
    return named


def _jsonable(value):
    if isinstance(value, AutoChoice):
        return value.to_dict()
    if isinstance(value, IntEnum):
        return label(value)
    if isinstance(value, Message):
        return message_json(value)
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class GenerationResult:
    request_id: str
    seed: int
    images: list[bytes]  # encoded as the request asked; empty for raw latents
    mime_type: str
    latents: dataplane_pb2.Tensor  # the final latents (float32)
    stats: GenerationStats


def window_guidance_for(mode: Mode, requested: WindowGuidance | None) -> WindowGuidance:
    """The window policy: as requested, else CONDITIONAL for HYBRID and FULL_CFG for PIPELINE."""
    if requested is not None:
        return requested
    return WindowGuidance.FULL_CFG if mode == Mode.PIPELINE else WindowGuidance.CONDITIONAL


def worker_request(spec: GenerationSpec) -> worker_pb2.WorkerRequest:
    """What a worker needs of the request (the schedule's parameters stay here)."""
    req = worker_pb2.WorkerRequest(
        prompt=spec.prompt,
        width=spec.width,
        height=spec.height,
        num_steps=spec.num_steps,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        num_images=spec.num_images,
    )
    if spec.negative_prompt is not None:
        req.negative_prompt = spec.negative_prompt
    return req


class WorkerStepFailed(Exception):
    """Internal: ``worker`` failed with ``cause`` (the driver may resume elsewhere)."""

    def __init__(self, worker: WorkerHandle, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.worker = worker
        self.cause = cause


# The driver waits for workers in slices this long, calling ``check_alive`` between them: a cancel
# or a passed deadline is noticed within a slice, not after the step.
ALIVE_CHECK_SECONDS = 0.1


def _results(
    futures: list[Future],
    workers: list[WorkerHandle],
    timeout: float,
    what: str,
    check_alive: Callable[[], None] | None = None,
) -> list:
    """All results, or the first failure as soon as any worker fails (its peer may be blocked).
    ``check_alive`` is called while waiting; what it raises (Cancelled, DeadlineExceeded) ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        done, not_done = wait(
            futures, timeout=max(0.0, min(ALIVE_CHECK_SECONDS, remaining)), return_when=FIRST_EXCEPTION
        )
        failed = [(w, f.exception()) for f, w in zip(futures, workers) if f in done and f.exception()]
        if failed:
            # A worker that failed by itself is to blame over one that only waited for its peer.
            worker, cause = next(((w, c) for w, c in failed if not isinstance(c, PeerTimeout)), failed[0])
            if isinstance(cause, PeerTimeout) and len(workers) == 2:
                worker = workers[1 - workers.index(worker)]  # it waited in vain: blame the silent peer
            raise WorkerStepFailed(worker, cause)
        if not not_done:
            return [f.result() for f in futures]
        if check_alive:
            check_alive()
        if time.monotonic() >= deadline:
            raise WorkerStepFailed(
                workers[futures.index(next(iter(not_done)))],
                WorkerFailed(f"{what}: no answer within {timeout:.1f}s"),
            )


@dataclass(frozen=True)
class StepWaits:
    """How long to wait, in step costs (docs/design.md section 8): a worker waits for its peer's frame
    ``peer_steps`` expected steps (at least ``peer_floor`` seconds, at most ``cap``); the driver
    waits for a step's answers longer than a worker may wait for its peer three times (a
    speculative step: the peer's prediction, its resolution, a FULL_CFG fill's half), so a silent
    peer is reported by the worker that waited, which blames the right one. Before any step was
    measured (a model's first request, a new device), the worker's own default peer wait and
    ``cap`` for the step: a first step may be far slower than any floor guesses."""

    cap: float = 600.0  # the most any wait may be (--step-timeout)
    peer_steps: float = 10.0
    peer_floor: float = 5.0

    def peer(self, step_cost: float | None) -> float:
        """Seconds for ``BeginCommand.peer_timeout_seconds`` (0: the worker's default)."""
        if step_cost is None:
            return 0.0
        return min(max(self.peer_floor, self.peer_steps * step_cost), self.cap)

    def step(self, step_cost: float | None) -> float:
        if step_cost is None:
            return self.cap
        return min(3 * self.peer(step_cost) + step_cost, self.cap)


# Given the failed worker and the survivors, the workers to continue on (one or two); raises
# (e.g. Unavailable) when there is nothing to continue on.
# ``needs_pair``: the steps left include pipeline-window steps, which only a pair runs as
# scheduled, so a lone survivor must wait for a partner rather than go on alone.
# Called with ``busy=True`` when the worker refused its Begin as busy with another coordinator's
# request (WORKER_BUSY): it is healthy, held aside rather than quarantined (docs/design.md section 10).
Recover = Callable[..., list[WorkerHandle]]
UNRECOVERABLE = (Cancelled, DeadlineExceeded, InvalidArgument)
# Begins refused as busy, per request, before it fails: each sends it to other workers (or back to
# the queue's head until one frees), so the bound only ends a pathological churn.
MAX_BUSY_REFUSALS = 50


class Elastic(Protocol):
    """The allocation policy's hook at step boundaries (coordinator.allocation): ``decide`` says
    whether the request should shrink to one worker or grow to a pair; once the steps already
    issued have completed, ``apply`` makes the change and gives the workers to go on with
    (None: nothing to change any more)."""

    def decide(self, next_step: int, used: list[WorkerHandle]) -> Decision: ...
    def apply(self, decision: Decision, used: list[WorkerHandle]) -> list[WorkerHandle] | None: ...


class _Switch(Exception):
    """Internal: go on from the checkpoint on other workers (an elastic shrink or grow)."""

    def __init__(self, decision: Decision, workers: list[WorkerHandle]) -> None:
        super().__init__(decision.value)
        self.decision, self.workers = decision, workers


def drive_request(
    spec: GenerationSpec,
    mode: Mode,
    workers: list[WorkerHandle],
    split_cut: int | None = None,
    on_step: Callable[[StepStat, int], None] | None = None,
    check_alive: Callable[[], None] | None = None,
    step_timeout: float = 600.0,
    recover: Recover | None = None,
    max_recoveries: int = 2,
    elastic: Elastic | None = None,
    step_cost: float | None = None,
    speculate: bool = True,
    on_latents: Callable[[int, dataplane_pb2.Tensor], None] | None = None,
) -> GenerationResult:
    """Run ``spec`` in ``mode`` (not AUTO) on ``workers`` (one for SINGLE, two otherwise; with
    ``elastic``, ``mode`` is the paired schedule and the request may start, shrink to and grow
    from a lone worker, which runs the CFG batch: Phase.SINGLE).

    ``check_alive`` is called between steps and while waiting for workers, and raises (Cancelled,
    DeadlineExceeded) to stop: the workers' sessions are aborted at once.
    Waits are measured in step costs (``StepWaits``, at most ``step_timeout``): ``step_cost`` is
    what one step of this request is expected to cost (None: not measured yet); once the request
    has run steps of its own, their times count too.
    With ``recover``, worker U reports the latents after every step (the checkpoint) and a
    worker that dies or stops answering is replaced: the request resumes from the last
    completed step on the workers ``recover`` gives (docs/design.md section 5).
    ``speculate``: issue HYBRID's undecided step ahead (see the module's doc); off, every step
    between L and tau1 waits for the round trip (kept to measure what speculation saves).
    ``on_latents(step, latents)``: the latents after each step whose checkpoint came back (every
    step with ``recover`` or ``elastic``), for previews.
    Trace context: commands carry the current span (begin/finish) or their phase's span (steps).
    """
    return _RequestRun(
        spec,
        mode,
        workers,
        split_cut,
        on_step,
        check_alive,
        StepWaits(cap=step_timeout),
        recover,
        max_recoveries,
        elastic,
        step_cost,
        speculate,
        on_latents,
    ).execute()


# With an elastic request, steps are issued at most this far ahead of the one completing, so a
# shrink or grow waits for at most one step in flight and no step is lost or computed twice.
ELASTIC_LOOKAHEAD = 1


class _RequestRun:
    def __init__(
        self,
        spec,
        mode,
        workers,
        split_cut,
        on_step,
        check_alive,
        waits,
        recover,
        max_recoveries,
        elastic,
        step_cost,
        speculate=True,
        on_latents=None,
    ) -> None:
        self.spec, self.rid = spec, spec.request_id
        self.on_latents = on_latents
        self.speculate = speculate
        self.unresolved: set[int] = set()  # speculative steps issued, their phase not yet sent
        self.window_guidance = window_guidance_for(mode, spec.window_guidance)
        refresh = self.window_guidance in REFRESHING_POLICIES
        self.schedule = StepSchedule(
            mode,
            spec.num_steps,
            spec.hybrid,
            spec.guided,
            refresh_every=spec.hybrid.refresh_every if refresh else 0,
        )
        self.request = worker_request(spec)
        self.elastic = elastic
        single = self.schedule.mode == Mode.SINGLE
        self.used: list[WorkerHandle] = workers[:1] if single else workers[:2]
        if elastic is not None and not single:
            self.used = workers[:2]  # one or two: a lone worker runs the CFG batch until it grows
        elif not single and len(self.used) < 2:
            raise WorkerFailed(f"{label(self.schedule.mode)} needs two workers, got {len(self.used)}")
        self.split_cut, self.on_step, self.check_alive = split_cut, on_step, check_alive
        self.waits, self.recover, self.max_recoveries = waits, recover, max_recoveries
        self.expected_step = step_cost  # from earlier requests of the model (None: none measured)
        self.notes: list[str] = []
        if self.schedule.mode != mode:
            self.notes.append(f"{label(mode)} needs guidance_scale > 1; ran {label(self.schedule.mode)}")
        self.stats: list[StepStat] = []
        self.checkpoint: worker_pb2.Checkpoint | None = None
        self.encoding = 0.0
        self.denoise = 0.0
        self.ever_used: list[str] = []

    @property
    def solo(self) -> bool:
        return len(self.used) == 1

    # Steps of its own this request weighs (the last few: a phase may cost more than the one before).
    OWN_STEPS = 4

    @property
    def step_cost(self) -> float | None:
        """What one step is expected to cost: the most of the model's measured cost and this
        request's recent steps (each the slowest worker's compute time)."""
        own = [s.compute_seconds for s in self.stats[-self.OWN_STEPS :]]
        known = [c for c in (self.expected_step, max(own, default=None)) if c is not None]
        return max(known) if known else None

    def _wait(self, futures: list[Future], what: str, timeout: float | None = None) -> list:
        timeout = self.waits.cap if timeout is None else timeout
        return _results(futures, self.used, timeout, what, self.check_alive)

    def _command(self, trace_context: dict[str, str] | None = None, **which) -> worker_pb2.SessionRequest:
        return worker_pb2.SessionRequest(
            request_id=self.rid, trace_context=trace_context or telemetry.inject(), **which
        )

    def execute(self) -> GenerationResult:
        recoveries = busy_refusals = 0
        while True:
            used_before = list(self.ever_used)
            try:
                self._begin()
                self._steps()
                finishes = self._finish()
                break
            except _Switch as switch:
                self._abort()
                before = ", ".join(w.name for w in self.used)
                self.used = switch.workers
                self.notes.append(
                    f"{switch.decision.value} at step {self.checkpoint.next_step}: {before} -> "
                    f"{', '.join(w.name for w in self.used)}"
                )
                trace.get_current_span().add_event(
                    f"hybridiff.{switch.decision.value}",
                    {
                        "hybridiff.step": self.checkpoint.next_step,
                        "hybridiff.workers": [w.name for w in self.used],
                    },
                )
                log.info("request %s: %s", self.rid, self.notes[-1])
            except WorkerStepFailed as failure:
                self._abort()
                cause = failure.cause
                busy = isinstance(cause, WorkerBusy)
                if (
                    self.recover is None
                    or (busy and busy_refusals >= MAX_BUSY_REFUSALS)
                    or (not busy and recoveries >= self.max_recoveries)
                    or isinstance(cause, UNRECOVERABLE)
                ):
                    error = as_seen_by_the_client(failure.worker.name, cause)
                    raise WorkerFault(error, failure.worker.name) from None  # the pool quarantines it alone
                survivors = [w for w in self.used if w is not failure.worker]
                if busy:  # it ran nothing of this request: another coordinator's, not a fault
                    refused = failure.worker.name
                    self.ever_used = [n for n in self.ever_used if n in used_before or n != refused]
                    self.used = self.recover(failure.worker, survivors, self._needs_pair(), busy=True)
                    busy_refusals += 1
                    log.info(
                        "request %s: worker %s is busy with another coordinator; going on with %s",
                        self.rid,
                        failure.worker.name,
                        ", ".join(w.name for w in self.used),
                    )
                    continue
                self.used = self.recover(failure.worker, survivors, self._needs_pair())
                recoveries += 1
                at = self.checkpoint.next_step if self.checkpoint else 0
                self.notes.append(
                    f"worker {failure.worker.name} failed ({cause}); resumed at step {at} on "
                    f"{', '.join(w.name for w in self.used)}"
                )
                log.warning("request %s: %s", self.rid, self.notes[-1])
            except BaseException:
                self._abort()
                raise
        if len({f.latents_digest for f in finishes}) != 1:
            raise WorkerFailed(
                f"workers ended with different latents ({', '.join(f.latents_digest for f in finishes)})"
            )
        single = self.schedule.mode == Mode.SINGLE or all(s.phase == Phase.SINGLE for s in self.stats)
        stats = GenerationStats(
            mode_used=Mode.SINGLE if single else self.schedule.mode,
            window_guidance=self.window_guidance if self.schedule.window() else None,
            tau1=self.schedule.tau1,
            tau2=self.schedule.tau2,
            tau1_source=self.schedule.tau1_source,
            split_cut=None if single else self.split_cut,
            workers=self.ever_used,
            steps=self.stats,
            data_plane_bytes=sum(s.bytes_sent for s in self.stats),
            encoding_seconds=self.encoding,
            denoising_seconds=self.denoise,
            decoding_seconds=finishes[0].decode_seconds,
            notes=self.notes,
        )
        image = finishes[0]
        images = list(image.images) if self.spec.output_format != OutputFormat.RAW_LATENTS else []
        return GenerationResult(self.rid, self.spec.seed, images, image.mime_type, image.latents, stats)

    def _needs_pair(self) -> bool:
        """Whether the steps left include pipeline-window steps (HYBRID before tau2, PIPELINE):
        one worker alone would run them as full forwards, which is another image. An elastic
        request runs alone by design (the CFG batch, labelled SINGLE), so it never needs one."""
        if self.elastic is not None or self.schedule.mode not in (Mode.HYBRID, Mode.PIPELINE):
            return False
        next_step = self.checkpoint.next_step if self.checkpoint else 0
        window = self.schedule.window()
        if window is not None:
            return next_step <= window[1]
        # HYBRID with tau1 undecided: a window is ahead only if a value still to come can open
        # one before the last step (a short request never decides it; a late tau1 opens none).
        monitor = self.schedule.monitor
        return monitor.tau1 is None and max(next_step, monitor.earliest_decision_step()) < self.schedule.last

    def _begin(self) -> None:
        for w in self.used:
            if w.name not in self.ever_used:
                self.ever_used.append(w.name)
        futures = []
        # A fresh nonce per attempt: frames of an aborted attempt of this request id, or of anyone
        # who only knows the id, are rejected by the workers (docs/design.md section 9).
        nonce = os.urandom(16)
        for i, w in enumerate(self.used):
            begin = worker_pb2.BeginCommand(
                request=self.request,
                role=(Role.U, Role.C)[i],
                window_guidance=self.window_guidance,
                solo=self.solo,
                peer_data_address="" if self.solo else self.used[1 - i].data_address,
                peer_worker_id="" if self.solo else self.used[1 - i].identity,
                session_nonce=nonce,
                peer_timeout_seconds=self.waits.peer(self.step_cost),
                speculative=self.speculate and self.schedule.mode == Mode.HYBRID,
            )
            if self.split_cut is not None:
                begin.split_cut = self.split_cut
            if self.checkpoint is not None:
                begin.resume.CopyFrom(self.checkpoint)
            futures.append(w.send(self._command(begin=begin)))
        # Both Begins must be done before any step: a worker files a peer's frame only for a
        # session its own Begin has opened, so this round trip is the pair's barrier.
        events = self._wait(futures, "begin")  # encoding: not a step, bounded by the cap
        self.encoding = max(self.encoding, max(e.begin.encoding_seconds for e in events))

    def _abort(self) -> None:
        for w in self.used:
            w.abort(self.rid)

    def _finish(self) -> list[worker_pb2.FinishDone]:
        encoding = worker_pb2.Encoding(format=self.spec.output_format, quality=self.spec.quality)
        futures = [
            w.send(self._command(finish=worker_pb2.FinishCommand(decode=(i == 0), encoding=encoding)))
            for i, w in enumerate(self.used)
        ]
        return [e.finish for e in self._wait(futures, "finish")]  # decoding: bounded by the cap

    def _phase(self, step: int, first: int) -> Phase:
        if self.elastic is not None and self.solo:
            return Phase.SINGLE  # a lone worker of an elastic request runs the CFG batch
        phase = self.schedule.phase(step)
        if step == first > 0 and phase == Phase.PIPELINE:
            return Phase.PIPELINE_FILL  # resumed mid-window: the new pair has no stale activations
        return phase

    def _in_speculative_zone(self, step: int) -> bool:
        """Steps after the earliest deciding one up to the window's fill (or, undecided, any):
        every one of them goes out speculative, also when a resumed attempt already knows its
        phase (then resolved at once), so each is computed the same way in every attempt and a
        resumed request is bit-identical to an unbroken one."""
        if not (self.speculate and self.schedule.mode == Mode.HYBRID) or (
            self.elastic is not None and self.solo
        ):
            return False
        monitor = self.schedule.monitor
        if step <= monitor.earliest_decision_step():
            return False
        return monitor.tau1 is None or step <= monitor.decided_at + 1

    def _decided_through(self) -> int:
        """Highest step whose phase this attempt knows now. A lone worker of an elastic request
        runs the CFG batch at every step, whatever the monitor will decide: all are known (else
        each step past the earliest deciding one would wait for the control round trip)."""
        if self.elastic is not None and self.solo:
            return self.schedule.last
        return self.schedule.decided_through()

    def _issue_limit(self, step: int) -> int:
        limit = self._decided_through()
        if limit < self.schedule.last and self._in_speculative_zone(limit + 1):
            limit += 1  # the undecided step, speculatively
        return limit if self.elastic is None else min(limit, step + ELASTIC_LOOKAHEAD)

    def _resolve(self, step: int, first: int, spans: _PhaseSpans) -> None:
        """Send the phase of speculative ``step``, now that the monitor has decided it."""
        self.unresolved.discard(step)
        phase = self._phase(step, first)
        resolve = worker_pb2.ResolveCommand(
            step=step, phase=phase, last_in_window=self.schedule.last_in_window(step)
        )
        for w in self.used:
            w.send(self._command(spans.carrier_for(step, phase), resolve=resolve))

    def _steps(self) -> None:
        schedule, used = self.schedule, self.used
        first = len(self.stats)
        issued = first
        self.unresolved.clear()
        pending: dict[int, list[Future]] = {}
        intent = Decision.KEEP  # an elastic change waiting for the steps in flight
        spans = _PhaseSpans()
        start = time.perf_counter()
        last_done = start
        try:
            for step in range(first, schedule.num_steps):
                if self.check_alive:
                    self.check_alive()
                if intent != Decision.KEEP and issued == step:  # a step boundary with nothing in flight
                    decision, intent = intent, Decision.KEEP
                    workers = self.elastic.apply(decision, used)
                    if workers is not None:
                        raise _Switch(decision, workers)
                while intent == Decision.KEEP and issued <= self._issue_limit(step):
                    decided = issued <= self._decided_through()
                    speculative = not decided or self._in_speculative_zone(issued)
                    phase = Phase.DATA_PARALLEL if speculative else self._phase(issued, first)
                    cmd = worker_pb2.StepCommand(
                        step=issued,
                        phase=phase,
                        last_in_window=decided and schedule.last_in_window(issued),
                        report_latents=self.recover is not None or self.elastic is not None,
                        speculative=speculative,
                    )
                    if speculative:
                        self.unresolved.add(issued)
                    pending[issued] = [
                        w.send(self._command(spans.carrier_for(issued, phase), step=cmd)) for w in used
                    ]
                    if speculative and decided:
                        self._resolve(issued, first, spans)  # its phase is known: resolved at once
                    issued += 1
                events = self._wait(pending.pop(step), f"step {step}", self.waits.step(self.step_cost))
                now = time.perf_counter()
                reports = [(e.worker_id, e.step) for e in events]
                d = next((r.rel_mae for _, r in reports if r.HasField("rel_mae")), None)
                schedule.observe(step, d)
                if step + 1 in self.unresolved:
                    self._resolve(step + 1, first, spans)
                spans.done(step, schedule.last)
                if reports[0][1].HasField("checkpoint"):
                    self.checkpoint = reports[0][1].checkpoint
                    if self.on_latents:
                        self.on_latents(step, self.checkpoint.latents)
                stat = StepStat(
                    step=step,
                    phase=Phase(reports[0][1].phase),
                    rel_mae=d,
                    bytes_sent=sum(r.report.bytes_sent for _, r in reports),
                    wall_seconds=now - last_done,
                    compute_seconds=max(r.report.compute_seconds for _, r in reports),
                    workers={name: _named(name, r.report) for name, r in reports},
                )
                last_done = now
                self.stats.append(stat)
                if self.on_step:
                    self.on_step(stat, schedule.num_steps)
                if self.elastic is not None and intent == Decision.KEEP and step < schedule.last:
                    intent = self.elastic.decide(step + 1, used)
        finally:
            spans.close()
            self.denoise += time.perf_counter() - start


class _PhaseSpans:
    """One child span per run of consecutive steps in the same phase family (single, data
    parallel, pipeline window), opened when its first step is issued, ended when its last
    step has completed."""

    FAMILY = {
        Phase.SINGLE: "single",
        Phase.DATA_PARALLEL: "data_parallel",
        Phase.PIPELINE_FILL: "pipeline",
        Phase.PIPELINE: "pipeline",
    }

    def __init__(self) -> None:
        self._tracer = telemetry.tracer("hybridiff.coordinator")
        self._open: list[list] = []  # [family, first, last or None, span, carrier]

    def carrier_for(self, step: int, phase: Phase) -> dict[str, str]:
        family = self.FAMILY[phase]
        if not self._open or self._open[-1][0] != family or self._open[-1][2] is not None:
            if self._open:
                self._open[-1][2] = step - 1
            span = self._tracer.start_span(
                f"phase {family}", attributes={"hybridiff.phase": family, "hybridiff.first_step": step}
            )
            with trace.use_span(span, end_on_exit=False):
                self._open.append([family, step, None, span, telemetry.inject()])
        return self._open[-1][4]

    def done(self, step: int, last_step: int) -> None:
        for seg in list(self._open):
            if seg[2] == step or (seg[2] is None and step == last_step):
                seg[3].set_attribute("hybridiff.last_step", step)
                seg[3].end()
                self._open.remove(seg)

    def close(self) -> None:
        for seg in self._open:
            seg[3].end()
        self._open.clear()

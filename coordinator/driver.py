"""Drives one request over its worker(s): the coordinator's side of the step protocol.

The driver owns the schedule (and so the discrepancy monitor). It issues every step whose
phase is already decided — all of them in SINGLE / CFG_PARALLEL / PIPELINE, and in HYBRID
the steps before the monitor could possibly fire, then one step per observed rel-MAE until
tau1 is known — so both workers run each step with the same phase at the same index, and the
control round trip is off the critical path wherever the schedule allows.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from opentelemetry import trace

from coordinator.schedule import HybridParams, Mode, Phase, StepSchedule
from hybridiff import telemetry
from hybridiff.errors import WorkerFailed
from hybridiff.messages import BeginCommand, FinishReport, Role, StepCommand, StepReport
from hybridiff.phases import WindowGuidance, mode_name
from hybridiff.request import GenerationSpec

log = logging.getLogger(__name__)


class WorkerHandle(Protocol):
    """The coordinator's view of one worker: commands run in order, results come as futures."""

    name: str
    data_address: str  # where its peer pushes data-plane frames ("" in process)

    def begin(self, cmd: BeginCommand) -> Future: ...
    def step(self, cmd: StepCommand) -> Future: ...
    def finish(self, request_id: str, decode: bool) -> Future: ...
    def abort(self, request_id: str) -> None: ...


@dataclass
class StepStat:
    step: int
    phase: str
    rel_mae: float | None
    bytes_sent: int
    wall_seconds: float
    compute_seconds: float
    workers: dict[str, dict] = field(default_factory=dict)  # per worker: phase, compute/wall seconds, bytes


@dataclass
class GenerationStats:
    mode_used: str
    window_guidance: str
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    request_id: str
    image_png: bytes | None
    latents: torch.Tensor
    stats: GenerationStats


def default_window_guidance(mode: Mode, requested: str) -> WindowGuidance:
    """The window policy: as requested, else CONDITIONAL for HYBRID and FULL_CFG for PIPELINE."""
    from hybridiff.phases import WINDOW_GUIDANCE_NAMES

    if requested != "default":
        return WINDOW_GUIDANCE_NAMES[requested]
    return WindowGuidance.FULL_CFG if mode == Mode.PIPELINE else WindowGuidance.CONDITIONAL


def _results(futures: list[Future], timeout: float, what: str) -> list:
    """All results, or the first failure as soon as any worker fails (its peer may be blocked)."""
    done, not_done = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
    for fut in futures:
        if fut in done and fut.exception() is not None:
            raise fut.exception()
    if not_done:
        raise WorkerFailed(f"{what}: no answer within {timeout:.0f}s")
    return [f.result() for f in futures]


def drive_request(
    spec: GenerationSpec,
    mode: Mode,
    workers: list[WorkerHandle],
    split_cut: int | None = None,
    on_step: Callable[[StepStat, int], None] | None = None,
    check_alive: Callable[[], None] | None = None,
    step_timeout: float = 600.0,
) -> GenerationResult:
    """Run ``spec`` in ``mode`` (not AUTO) on ``workers`` (one for SINGLE, two otherwise).

    ``check_alive`` is called between steps and raises (Cancelled, DeadlineExceeded) to stop.
    Trace context: commands carry the current span (begin/finish) or their phase's span (steps).
    """
    params = HybridParams(spec.l_slope, spec.eps_slope, spec.k, spec.tau_cap)
    schedule = StepSchedule(mode, spec.num_steps, params, spec.guided)
    policy = default_window_guidance(schedule.mode, spec.window_guidance)
    solo = schedule.mode == Mode.SINGLE
    used = workers[:1] if solo else workers[:2]
    if not solo and len(used) < 2:
        raise WorkerFailed(f"{mode_name(schedule.mode)} needs two workers, got {len(used)}")
    notes = []
    if schedule.mode != mode:
        notes.append(f"{mode_name(mode)} needs guidance_scale > 1; ran {mode_name(schedule.mode)}")
    rid = spec.request_id
    roles = [Role.U, Role.C]
    try:
        begins = [
            w.begin(BeginCommand(spec, roles[i], policy, split_cut, solo, trace_context=telemetry.inject(),
                                 peer_address="" if solo else used[1 - i].data_address))
            for i, w in enumerate(used)
        ]
        encoding = max(_results(begins, step_timeout, "begin"))
        steps, denoise_seconds = _run_steps(rid, schedule, used, on_step, check_alive, step_timeout)
        finishes: list[FinishReport] = _results(
            [w.finish(rid, decode=(i == 0)) for i, w in enumerate(used)], step_timeout, "finish")
    except BaseException:
        for w in used:
            w.abort(rid)
        raise
    digests = {f.latents_digest for f in finishes}
    if len(digests) != 1:
        raise WorkerFailed(f"workers ended with different latents ({', '.join(sorted(digests))})")
    window = schedule.window()
    stats = GenerationStats(
        mode_used=mode_name(schedule.mode),
        window_guidance=policy.name.lower().replace("_", "-") if window else "",
        tau1=schedule.tau1, tau2=schedule.tau2, tau1_source=schedule.tau1_source,
        split_cut=split_cut if not solo else None,
        workers=[w.name for w in used], steps=steps,
        data_plane_bytes=sum(s.bytes_sent for s in steps),
        encoding_seconds=encoding, denoising_seconds=denoise_seconds,
        decoding_seconds=finishes[0].decode_seconds, notes=notes,
    )
    return GenerationResult(rid, finishes[0].image_png, finishes[0].latents, stats)


class _PhaseSpans:
    """One child span per run of consecutive steps in the same phase family (single, data
    parallel, pipeline window), opened when its first step is issued, ended when its last
    step has completed."""

    FAMILY = {Phase.SINGLE: "single", Phase.DATA_PARALLEL: "data_parallel",
              Phase.PIPELINE_FILL: "pipeline", Phase.PIPELINE: "pipeline"}

    def __init__(self) -> None:
        self._tracer = telemetry.tracer("hybridiff.coordinator")
        self._open: list[list] = []  # [family, first, last or None, span, carrier]

    def carrier_for(self, step: int, phase: Phase) -> dict[str, str]:
        family = self.FAMILY[phase]
        if not self._open or self._open[-1][0] != family or self._open[-1][2] is not None:
            if self._open:
                self._open[-1][2] = step - 1
            span = self._tracer.start_span(f"phase {family}", attributes={"hybridiff.phase": family,
                                                                         "hybridiff.first_step": step})
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


def _run_steps(rid: str, schedule: StepSchedule, used: list[WorkerHandle], on_step, check_alive,
               step_timeout: float) -> tuple[list[StepStat], float]:
    issued = 0
    pending: dict[int, list[Future]] = {}
    stats: list[StepStat] = []
    spans = _PhaseSpans()
    start = time.perf_counter()
    last_done = start
    try:
        for step in range(schedule.num_steps):
            if check_alive:
                check_alive()
            while issued <= schedule.decided_through():
                window = schedule.window()
                phase = schedule.phase(issued)
                cmd = StepCommand(rid, issued, phase, last_in_window=bool(window) and issued == window[1],
                                  trace_context=spans.carrier_for(issued, phase))
                pending[issued] = [w.step(cmd) for w in used]
                issued += 1
            reports: list[StepReport] = _results(pending.pop(step), step_timeout, f"step {step}")
            now = time.perf_counter()
            d = next((r.rel_mae for r in reports if r.rel_mae is not None), None)
            schedule.observe(step, d)
            spans.done(step, schedule.last)
            stat = StepStat(
                step=step, phase=Phase(reports[0].phase).name.lower(), rel_mae=d,
                bytes_sent=sum(r.bytes_sent for r in reports), wall_seconds=now - last_done,
                compute_seconds=max(r.compute_seconds for r in reports),
                workers={r.worker: {"phase": Phase(r.phase).name.lower(), "compute_seconds": r.compute_seconds,
                                    "wall_seconds": r.wall_seconds, "bytes_sent": r.bytes_sent} for r in reports},
            )
            last_done = now
            stats.append(stat)
            if on_step:
                on_step(stat, schedule.num_steps)
    finally:
        spans.close()
    return stats, time.perf_counter() - start

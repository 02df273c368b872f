"""Cost-aware AUTO (docs/design.md section 10): the schedule a request runs in, chosen from the
device's own costs and the model's calibration.

Every schedule AUTO may run is priced by the schedule latency model (``coordinator.latency_model``)
on the costs the workers measured: SINGLE, CFG_PARALLEL, HYBRID with each window policy and
window length, PIPELINE. A window is allowed only as long as the model's calibration keeps the
image above its quality floor (``Calibration.max_window``); the fastest allowed schedule wins,
ties going to the more exact one (fewer stale steps). Which schedule wins depends on what a batch
of 2 costs: where it costs about two batches of 1 (a CPU, an RTX 3090), a window step at batch 1
(CONDITIONAL, LAST_DIFFERENCE) halves a step; where it is nearly free (SDXL on an H200), a window
step may carry both branches (FULL_CFG) for about the price of one, and a long FULL_CFG window
beats a short batch-1 one.

HYBRID's window opens where the rel-MAE curve settles, known only while the request runs: the
prediction opens it where the slope rule opened it on the calibration's images (their median
tau1, scaled to the request's steps; ``Calibration.expected_tau1``), or at the request's
``tau_cap`` (the latest it opens) where none is recorded. The calibration bounds ``k`` itself
(what it measured, wherever tau1 fell), so a window that reaches the last step from the expected
opening is given the longest ``k`` the calibration allows: a request whose curve settles earlier
then runs the longer window it was measured at, not one cut short. Pure: no clock, no I/O.

The refreshing policies (REFRESHED_DIFFERENCE, EXTRAPOLATED_DIFFERENCE) are HYBRID windows whose
every ``refresh_every``-th step, from the first, is a data-parallel fill (the CFG batch split,
one branch at batch 1 per worker) and whose other steps are pipelined at batch 1; they are priced
so, at the request's ``refresh_every``. Like every policy they are chosen only within the windows
the calibration measured for them (``hybridiff calibrate`` runs the model's ``refresh_every``).
AUTO never runs them in PIPELINE mode, where the schedule has no refreshes and the calibrated
quality would not hold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from coordinator.latency_model import ComputeTimes, LinkModel, ScheduleParams, TensorBytes, simulate
from coordinator.schedule import PIPELINE_WARMUP_STEPS
from hybridiff.calibration import Calibration
from hybridiff.protocol import REFRESHING_POLICIES, Mode, Phase, WindowGuidance, label
from hybridiff.request import GenerationSpec, HybridParams

# The stage batch of a pipelined window step per policy: one branch, or both (docs/design.md
# section 1). A refreshing policy's fills are data parallel, one branch per worker.
WINDOW_BATCH = {
    WindowGuidance.CONDITIONAL: 1,
    WindowGuidance.LAST_DIFFERENCE: 1,
    WindowGuidance.FULL_CFG: 2,
    WindowGuidance.REFRESHED_DIFFERENCE: 1,
    WindowGuidance.EXTRAPOLATED_DIFFERENCE: 1,
}
POLICIES = tuple(WINDOW_BATCH)  # in order of preference on a tie
CALIBRATED = "measured costs and calibration"
UNCALIBRATED = "no calibration: HYBRID as before"


@dataclass(frozen=True)
class DeviceCosts:
    """What one step's parts cost on a model's workers at one size, and the link between them
    (free when not known: the paired steps' measured times then carry the exchange)."""

    compute: ComputeTimes
    tensors: TensorBytes = TensorBytes(prediction=0)
    link: LinkModel = LinkModel.ideal()


@dataclass(frozen=True)
class Schedule:
    """One schedule AUTO may run: a mode, its window policy (None: no window) and HYBRID's ``k``."""

    mode: Mode
    window_guidance: WindowGuidance | None = None
    k: int = 0
    window_steps: int = 0  # stale-free steps excluded: the window's pipelined steps at most
    refresh_every: int = 0  # a refreshing policy's period (HybridParams.refresh_every); 0 otherwise

    @property
    def refreshes(self) -> bool:
        return self.mode == Mode.HYBRID and self.window_guidance in REFRESHING_POLICIES


@dataclass(frozen=True)
class AutoChoice:
    """AUTO's choice for one request and what the model predicts of it (denoising seconds)."""

    schedule: Schedule
    predicted_seconds: float
    single_seconds: float
    cfg_parallel_seconds: float
    basis: str  # CALIBRATED, or why the choice is today's fixed one

    @property
    def mode(self) -> Mode:
        return self.schedule.mode

    @property
    def speedup_vs_single(self) -> float:
        return self.single_seconds / self.predicted_seconds

    @property
    def speedup_vs_cfg_parallel(self) -> float:
        return self.cfg_parallel_seconds / self.predicted_seconds

    def describe(self) -> str:
        s = self.schedule
        what = label(s.mode)
        if s.window_guidance is not None:
            what += f", window {label(s.window_guidance)}"
            what += f" k={s.k}" if s.mode == Mode.HYBRID else f" ({s.window_steps} steps)"
            if s.refreshes:
                what += f" refreshed every {s.refresh_every}"
        return (
            f"AUTO chose {what}: predicted {self.predicted_seconds:.3f}s "
            f"({self.speedup_vs_single:.2f}x one worker, {self.speedup_vs_cfg_parallel:.2f}x cfg-parallel; "
            f"{self.basis})"
        )

    def to_dict(self) -> dict:
        s = self.schedule
        return {
            "mode": label(s.mode),
            "window_guidance": None if s.window_guidance is None else label(s.window_guidance),
            "k": s.k,
            "window_steps": s.window_steps,
            "refresh_every": s.refresh_every,
            "predicted_seconds": self.predicted_seconds,
            "single_seconds": self.single_seconds,
            "cfg_parallel_seconds": self.cfg_parallel_seconds,
            "speedup_vs_single": self.speedup_vs_single,
            "speedup_vs_cfg_parallel": self.speedup_vs_cfg_parallel,
            "basis": self.basis,
        }


@functools.lru_cache(maxsize=4096)
def _phases(
    mode: Mode, num_steps: int, tau1: int, k: int, warmup: int, refresh_every: int, source: str
) -> tuple[Phase, ...]:
    params = ScheduleParams(num_steps, tau1, k, source, pipeline_warmup=warmup, refresh_every=refresh_every)
    return tuple(params.phases(mode))


@functools.lru_cache(maxsize=4096)
def _seconds(costs: DeviceCosts, phases: tuple[Phase, ...], window_batch: int, refresh_fills: bool) -> float:
    replay = simulate(
        phases, costs.compute, costs.tensors, costs.link, window_batch, refresh_fills=refresh_fills
    )
    return replay.latency


def predict(
    costs: DeviceCosts, schedule: Schedule, num_steps: int, tau1: int, tau1_source: str = "tau_cap"
) -> float:
    """Predicted denoising seconds of ``schedule`` for a request of ``num_steps`` steps whose
    window opens at ``tau1`` (``tau1_source``: ``tau_cap`` opens it at tau1, ``slope`` after it)."""
    refresh_every = schedule.refresh_every if schedule.refreshes else 0
    phases = _phases(
        schedule.mode, num_steps, max(1, tau1), schedule.k, PIPELINE_WARMUP_STEPS, refresh_every, tau1_source
    )
    batch = WINDOW_BATCH[schedule.window_guidance] if schedule.window_guidance is not None else 1
    return _seconds(costs, phases, batch, refresh_every > 0)


def _hybrid_schedule(policy: WindowGuidance, k: int, steps: int, hybrid: HybridParams) -> Schedule:
    refresh_every = hybrid.refresh_every if policy in REFRESHING_POLICIES else 0
    return Schedule(Mode.HYBRID, policy, k, steps, refresh_every)


def hybrid_window_steps(num_steps: int, tau1: int, k: int, tau1_source: str = "tau_cap") -> int:
    """The steps HYBRID's window runs from ``tau1`` to ``tau1 + k`` (clamped to the last step):
    ``tau_cap`` opens it at tau1 itself, the slope rule the step after."""
    first = tau1 if tau1_source == "tau_cap" else tau1 + 1
    return max(0, min(tau1 + k, num_steps - 1) - first + 1)


def candidates(
    calibration: Calibration,
    num_steps: int,
    hybrid: HybridParams,
    window_guidance: WindowGuidance | None = None,
    k: int | None = None,
) -> list[Schedule]:
    """The schedules a paired request may run, in order of preference on a tie: every window the
    calibration keeps above its floor. ``window_guidance`` or ``k`` set by the request are kept."""
    out = [Schedule(Mode.SINGLE), Schedule(Mode.CFG_PARALLEL)]
    policies = POLICIES if window_guidance is None else (window_guidance,)
    tau1, source = calibration.expected_tau1(num_steps, hybrid.tau_cap, hybrid.l_slope)
    for policy in policies:
        # The calibration's lengths are window steps opened by the slope rule (k of them); the
        # tau_cap fallback opens the window at tau_cap itself, one step more for the same k.
        longest = min(calibration.max_window(policy, num_steps), num_steps)
        widest = longest - (source == "tau_cap")
        for each in range(1, widest + 1) if k is None else (k,):
            steps = hybrid_window_steps(num_steps, tau1, each, source)
            if not 0 < steps <= longest:
                continue
            reaches_end = tau1 + each >= num_steps - 1
            # Reaching the last step from the expected opening: the widest k allowed (the same
            # price here, a longer window where the curve settles earlier, as calibrated).
            out.append(_hybrid_schedule(policy, widest if reaches_end and k is None else each, steps, hybrid))
            if reaches_end:
                break
    # PIPELINE (FULL_CFG from its warm-up on, no refreshes) only as measured: its stale steps start
    # where the latents still change fast, which the windows' lengths, opened later, do not
    # predict (BENCHMARKS, the calibration of the default model).
    pipelined = num_steps - min(max(1, PIPELINE_WARMUP_STEPS), num_steps)
    full = WindowGuidance.FULL_CFG
    if k is None and full in policies and pipelined > 0 and calibration.pipeline_allowed(num_steps=num_steps):
        out.append(Schedule(Mode.PIPELINE, full, 0, pipelined))
    return out


def choose(
    costs: DeviceCosts,
    calibration: Calibration | None,
    num_steps: int,
    hybrid: HybridParams,
    window_guidance: WindowGuidance | None = None,
    k: int | None = None,
) -> AutoChoice:
    """The fastest schedule of a paired request the calibration allows, with its prediction.
    Without a calibration, today's fixed choice: HYBRID with the request's window policy
    (CONDITIONAL unless set) and ``hybrid.k``, priced all the same."""
    tau1, source = (
        (hybrid.tau_cap, "tau_cap")
        if calibration is None
        else calibration.expected_tau1(num_steps, hybrid.tau_cap, hybrid.l_slope)
    )
    single = predict(costs, Schedule(Mode.SINGLE), num_steps, tau1)
    cfg = predict(costs, Schedule(Mode.CFG_PARALLEL), num_steps, tau1)
    if calibration is None:
        policy = window_guidance or WindowGuidance.CONDITIONAL
        fixed = _hybrid_schedule(policy, hybrid.k, hybrid_window_steps(num_steps, tau1, hybrid.k), hybrid)
        seconds = predict(costs, fixed, num_steps, tau1)
        return AutoChoice(fixed, seconds, single, cfg, UNCALIBRATED)
    best, best_seconds = None, float("inf")
    for schedule in candidates(calibration, num_steps, hybrid, window_guidance, k):
        seconds = predict(costs, schedule, num_steps, tau1, source)
        if seconds < best_seconds * (1 - 1e-9):
            best, best_seconds = schedule, seconds
    return AutoChoice(best, best_seconds, single, cfg, CALIBRATED)


def applied(choice: AutoChoice, spec: GenerationSpec) -> GenerationSpec:
    """``spec`` as it runs ``choice``: its window policy and, for HYBRID, its ``k``."""
    s = choice.schedule
    if s.mode not in (Mode.HYBRID, Mode.PIPELINE):
        return spec
    hybrid = spec.hybrid.replace(k=s.k) if s.mode == Mode.HYBRID else spec.hybrid
    return replace(spec, window_guidance=s.window_guidance, hybrid=hybrid)


def calibrated(choice: AutoChoice) -> bool:
    """Whether ``choice`` was made from a calibration (not today's fixed HYBRID)."""
    return choice.basis == CALIBRATED

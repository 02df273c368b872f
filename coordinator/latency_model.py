"""The schedule latency model: predicted latency of every mode from compute times and a link model
(the coordinator's cost-aware AUTO, ``coordinator.auto_mode``, and the bench tools use this one
definition).

Pure (no torch, no generated code): the phase of every step comes from the coordinator's own
schedule (``coordinator.schedule.StepSchedule``, fed a rel-MAE curve that puts tau1 where asked),
and the model replays the step protocol of ``gpu_worker/engine.py`` on two worker clocks, U and
C, and returns when every step ends. Each step follows exactly what the engine does:

- SINGLE: one worker runs the CFG batch of 2 (``forward_b2``).
- DATA_PARALLEL: both run one branch at batch 1 (``forward_b1``) at once, then send their
  prediction to the other; both wait for the peer's before the update.
- PIPELINE_FILL: a synchronous full forward across the stages (sequential: U stage 1 -> boundary
  -> C stage 2 -> prediction -> U; nested: U outer-pre -> core input -> C core -> core output
  -> U outer-post -> prediction -> C).
- PIPELINE (one-step-stale, AsyncDiff): sequential (DiT): U runs stage 1 on x_i and sends the
  boundary while C runs stage 2 on the boundary of step i-1 and sends the prediction to U.
  Nested (UNet): U runs outer-pre on x_i, sends the core input, then outer-post around the core
  output of step i-1 and sends the prediction to C; C runs the core on step i's core input,
  concurrently with U's outer-post, and sends the core output back (used at step i+1). On the
  last window step nothing is sent forward (it would only feed a non-pipelined step): the
  sequential U skips stage 1, the nested C skips the core.

The stage batch in the window is 1 for the CONDITIONAL / LAST_DIFFERENCE policies and 2 for
FULL_CFG (PIPELINE mode); the prediction that crosses is always the guided one (batch 1).

The refreshing policies (REFRESHED_DIFFERENCE, EXTRAPOLATED_DIFFERENCE; ``refresh_fills``): the
schedule makes the window's first step and every ``refresh_every``-th after it a fill, and each
fill is data parallel: both run one branch at batch 1 (the CFG batch of 2 split, C's conditional
branch through the stages), exchange predictions as a DATA_PARALLEL step does, and unless the
window ends there C leaves its stage activations as the next pipelined step's stale input
(sequential: kept on C; nested: the core output sent to U). The pipelined steps between run at
batch 1.

Link: a message of ``b`` bytes costs ``latency + copies * b / bandwidth`` end to end. With
``copies=2`` (staged through pinned host memory, as the data plane does) the device-to-host
copy blocks the sender's compute thread and the host-to-device copy is done on arrival by the
receiver's IO thread (it only delays the message); with ``copies=1`` (peer-to-peer) nothing
blocks the sender. The "ideal" prediction is the same replay with a free link.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

from coordinator.schedule import PIPELINE_WARMUP_STEPS, StepSchedule
from hybridiff.protocol import Mode, Phase, label
from hybridiff.request import HybridParams

MODES = (Mode.SINGLE, Mode.CFG_PARALLEL, Mode.PIPELINE, Mode.HYBRID)
TOPOLOGIES = ("sequential", "nested")
TAU1_SOURCES = ("tau_cap", "slope")


# --- inputs -------------------------------------------------------------------------
@dataclass(frozen=True)
class StageTimes:
    """Seconds of the two stages at one batch size. Nested topology: stage 1 (the outer ring)
    is ``pre`` (conv_in + outer down units) then ``post`` (outer up units + head); only ``post``
    overlaps the core, so the model needs the two parts separately."""

    stage1: float
    stage2: float
    pre: float = 0.0
    post: float = 0.0

    @classmethod
    def nested(cls, pre: float, core: float, post: float) -> StageTimes:
        return cls(stage1=pre + post, stage2=core, pre=pre, post=post)


@dataclass(frozen=True)
class ComputeTimes:
    """Per-worker compute seconds (both workers alike). ``update`` = guidance combine +
    scheduler step, per step and worker (microseconds on a GPU; 0 if not measured)."""

    topology: str
    forward_b1: float
    forward_b2: float
    stages_b1: StageTimes
    stages_b2: StageTimes
    update: float = 0.0

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if self.topology == "nested":
            for st in (self.stages_b1, self.stages_b2):
                if not math.isclose(st.pre + st.post, st.stage1, rel_tol=1e-9, abs_tol=1e-12):
                    raise ValueError("nested topology: stage1 must equal pre + post (use StageTimes.nested)")

    def stages(self, batch: int) -> StageTimes:
        return self.stages_b1 if batch == 1 else self.stages_b2


@dataclass(frozen=True)
class TensorBytes:
    """Bytes of what crosses the link. ``prediction``: one latent-sized prediction (batch 1).
    ``boundary_bN``: U -> C stage activations at stage batch N (sequential: hidden states +
    encoder hidden states; nested: the core input). ``stage_return_bN``: C -> U core output
    (nested only)."""

    prediction: int
    boundary_b1: int = 0
    boundary_b2: int = 0
    stage_return_b1: int = 0
    stage_return_b2: int = 0

    def boundary(self, batch: int) -> int:
        return self.boundary_b1 if batch == 1 else self.boundary_b2

    def stage_return(self, batch: int) -> int:
        return self.stage_return_b1 if batch == 1 else self.stage_return_b2


@dataclass(frozen=True)
class LinkModel:
    bandwidth: float  # bytes/s of one copy
    latency: float  # seconds per message
    copies: int = 2  # 2: device -> pinned host -> device; 1: peer-to-peer

    def __post_init__(self) -> None:
        if self.copies not in (1, 2):
            raise ValueError(f"copies must be 1 or 2, got {self.copies}")
        if self.bandwidth <= 0 or self.latency < 0:
            raise ValueError("bandwidth must be > 0 and latency >= 0")

    @classmethod
    def ideal(cls) -> LinkModel:
        return cls(bandwidth=math.inf, latency=0.0, copies=1)

    def _copy(self, nbytes: int) -> float:
        return nbytes / self.bandwidth

    def sender_busy(self, nbytes: int) -> float:
        """Seconds the sender's compute thread is blocked (the device-to-host staging copy)."""
        return self._copy(nbytes) if self.copies == 2 else 0.0

    def in_flight(self, nbytes: int) -> float:
        """Seconds from the end of the sender's part until the tensor is usable on the receiver."""
        return self.latency + self._copy(nbytes)

    def transfer(self, nbytes: int) -> float:
        return self.sender_busy(nbytes) + self.in_flight(nbytes)


@dataclass(frozen=True)
class FixedCosts:
    """Per-request seconds outside the denoising loop (both workers encode at once; one decodes)."""

    encode: float = 0.0
    decode: float = 0.0


# --- the replay ---------------------------------------------------------------------
@dataclass
class ModePrediction:
    phases: list[Phase]
    latency: float  # encode + denoising + decode
    denoise: float
    step_seconds: list[float]
    phase_seconds: dict[Phase, float]
    phase_steps: dict[Phase, int]
    link_bytes: int  # both directions, whole request
    phase_link_bytes: dict[Phase, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: phases by their edge names (``label``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, IntEnum):
        return label(value)
    if isinstance(value, dict):
        return {_jsonable(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class _Replay:
    """Two worker clocks and the arrival times of the messages still to be consumed."""

    def __init__(
        self,
        compute: ComputeTimes,
        tensors: TensorBytes,
        link: LinkModel,
        window_batch: int,
        t0: float,
        refresh_fills: bool = False,
    ) -> None:
        self.ct, self.tb, self.link, self.wb = compute, tensors, link, window_batch
        self.refresh_fills = refresh_fills
        self.u = self.c = t0
        self.arrival: dict[tuple[str, int], float] = {}  # (kind, step) -> when usable on the receiver
        self.bytes = 0

    def send(self, t: float, kind: str, step: int, nbytes: int) -> float:
        """Send at ``t``; returns when the sender's thread is free again."""
        free = t + self.link.sender_busy(nbytes)
        self.arrival[(kind, step)] = free + self.link.in_flight(nbytes)
        self.bytes += nbytes
        return free

    def step(self, i: int, phase: Phase, last_in_window: bool) -> None:
        if phase == Phase.SINGLE:
            self.u = self.c = self.u + self.ct.forward_b2 + self.ct.update
        elif phase == Phase.DATA_PARALLEL:
            self._data_parallel(i)
        elif phase == Phase.PIPELINE_FILL and self.refresh_fills:
            self._refresh_fill(i, last_in_window)
        elif self.ct.topology == "sequential":
            self._window_sequential(i, phase == Phase.PIPELINE_FILL, last_in_window)
        else:
            self._window_nested(i, phase == Phase.PIPELINE_FILL, last_in_window)

    def _data_parallel(self, i: int) -> None:
        f, L = self.ct.forward_b1, self.tb.prediction
        u_free = self.send(self.u + f, "pred_u", i, L)
        c_free = self.send(self.c + f, "pred_c", i, L)
        self.u = max(u_free, self.arrival[("pred_c", i)]) + self.ct.update
        self.c = max(c_free, self.arrival[("pred_u", i)]) + self.ct.update

    def _refresh_fill(self, i: int, last: bool) -> None:
        """A refreshing policy's fill: a data-parallel step whose conditional branch also leaves
        the next pipelined step's stale input (at the window's batch of 1)."""
        f, L = self.ct.forward_b1, self.tb.prediction
        u_free = self.send(self.u + f, "pred_u", i, L)
        c_free = self.send(self.c + f, "pred_c", i, L)
        if not last:
            if self.ct.topology == "sequential":
                self.arrival[("boundary", i)] = c_free  # C's own stage-1 output, kept there
            else:
                c_free = self.send(c_free, "core_out", i, self.tb.stage_return(1))
        self.u = max(u_free, self.arrival[("pred_c", i)]) + self.ct.update
        self.c = max(c_free, self.arrival[("pred_u", i)]) + self.ct.update

    def _window_sequential(self, i: int, fill: bool, last: bool) -> None:
        st, B, L = self.ct.stages(self.wb), self.tb.boundary(self.wb), self.tb.prediction
        u = self.u
        if fill or not last:  # U: stage 1 on x_i, boundary -> C
            u = self.send(u + st.stage1, "boundary", i, B)
        # C: stage 2 on the boundary of step i (fill) or i-1 (stale), prediction -> U
        start = max(self.c, self.arrival[("boundary", i if fill else i - 1)])
        self.c = self.send(start + st.stage2, "pred", i, L) + self.ct.update
        self.u = max(u, self.arrival[("pred", i)]) + self.ct.update

    def _window_nested(self, i: int, fill: bool, last: bool) -> None:
        st, L = self.ct.stages(self.wb), self.tb.prediction
        CI, CO = self.tb.boundary(self.wb), self.tb.stage_return(self.wb)
        u = self.u + st.pre  # U: outer-pre on x_i
        c = self.c
        if fill or not last:
            u = self.send(u, "core_in", i, CI)
            # C: the core on step i's core input, core output -> U
            c = self.send(max(c, self.arrival[("core_in", i)]) + st.stage2, "core_out", i, CO)
        # U: outer-post around the core output of step i (fill) or i-1 (stale), prediction -> C
        u = max(u, self.arrival[("core_out", i if fill else i - 1)]) + st.post
        self.u = self.send(u, "pred", i, L) + self.ct.update
        self.c = max(c, self.arrival[("pred", i)]) + self.ct.update


_WINDOW = (Phase.PIPELINE_FILL, Phase.PIPELINE)


def _last_in_window(phases: list[Phase], i: int) -> bool:
    """As the driver sets it: the window's last step is the one no PIPELINE step follows."""
    return phases[i] in _WINDOW and (i + 1 == len(phases) or phases[i + 1] != Phase.PIPELINE)


def _check(phases: list[Phase]) -> None:
    if not phases:
        raise ValueError("no steps")
    if Phase.SINGLE in phases and set(phases) != {Phase.SINGLE}:
        raise ValueError("SINGLE steps run on one worker and cannot mix with paired phases")
    for i, p in enumerate(phases):
        if p == Phase.PIPELINE and (i == 0 or phases[i - 1] not in _WINDOW):
            raise ValueError(f"step {i}: a PIPELINE step must follow a PIPELINE_FILL or PIPELINE step")


def simulate(
    phases: Iterable[Phase],
    compute: ComputeTimes,
    tensors: TensorBytes,
    link: LinkModel,
    window_batch: int = 1,
    fixed: FixedCosts = FixedCosts(),
    refresh_fills: bool = False,
) -> ModePrediction:
    """Replay one request given the phase of every step (``Phase`` members or their wire numbers);
    ``window_batch`` is the stage batch in the window (1, or 2 for FULL_CFG); ``refresh_fills``:
    every PIPELINE_FILL is a refreshing policy's data-parallel fill (window batch 1)."""
    if window_batch not in (1, 2):
        raise ValueError(f"window_batch must be 1 or 2, got {window_batch}")
    if refresh_fills and window_batch != 1:
        raise ValueError("a refreshing policy's window runs at batch 1")
    steps = [Phase(p) for p in phases]  # ValueError for anything that is not a phase
    _check(steps)
    replay = _Replay(compute, tensors, link, window_batch, fixed.encode, refresh_fills)
    step_seconds: list[float] = []
    phase_seconds = {p: 0.0 for p in Phase}
    phase_steps = {p: 0 for p in Phase}
    phase_bytes = {p: 0 for p in Phase}
    prev_end, prev_bytes = fixed.encode, 0
    for i, p in enumerate(steps):
        replay.step(i, p, _last_in_window(steps, i))
        end = max(replay.u, replay.c)
        step_seconds.append(end - prev_end)
        phase_seconds[p] += end - prev_end
        phase_steps[p] += 1
        phase_bytes[p] += replay.bytes - prev_bytes
        prev_end, prev_bytes = end, replay.bytes
    denoise = prev_end - fixed.encode
    return ModePrediction(
        steps,
        fixed.encode + denoise + fixed.decode,
        denoise,
        step_seconds,
        {p: v for p, v in phase_seconds.items() if phase_steps[p]},
        {p: v for p, v in phase_steps.items() if v},
        replay.bytes,
        {p: v for p, v in phase_bytes.items() if phase_steps[p]},
    )


# --- all modes side by side ---------------------------------------------------------
@dataclass(frozen=True)
class ScheduleParams:
    """Where the hybrid window opens: ``tau1``, found by the slope rule (``tau1_source="slope"``:
    the window opens at tau1 + 1, step tau1 having run in phase 1) or the ``tau_cap`` fallback
    (it opens at tau1); it closes at ``min(tau1 + k, last step)``."""

    num_steps: int
    tau1: int
    k: int = 5
    tau1_source: str = "tau_cap"
    pipeline_warmup: int = PIPELINE_WARMUP_STEPS
    hybrid_window_batch: int = 1  # CONDITIONAL / LAST_DIFFERENCE; 2 for FULL_CFG
    pipeline_window_batch: int = 2  # PIPELINE mode runs FULL_CFG
    # HYBRID under a refreshing policy: every refresh_every-th window step, from its first, is a
    # data-parallel fill (HybridParams.refresh_every); 0: a policy that does not refresh.
    refresh_every: int = 0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.tau1_source not in TAU1_SOURCES:
            raise ValueError(f"tau1_source must be one of {TAU1_SOURCES}, got {self.tau1_source!r}")
        if self.tau1 < 1 or self.k < 0:  # the schedule's L and tau_cap are at least 1
            raise ValueError(f"tau1 must be >= 1 and k >= 0, got tau1={self.tau1}, k={self.k}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.refresh_every and self.hybrid_window_batch != 1:
            raise ValueError("a refreshing policy's window runs at batch 1")

    def _hybrid_params(self) -> tuple[HybridParams, float, float]:
        """Schedule parameters and a rel-MAE curve (first value, per-step change) under which the
        discrepancy monitor puts tau1 at ``tau1`` by ``tau1_source``."""
        if self.tau1_source == "slope":
            # A flat curve has slope 0 as soon as more than L values exist: tau1 = L.
            return HybridParams(l_slope=self.tau1, eps_slope=1e-3, k=self.k, tau_cap=self.tau1 + 1), 0.1, 0.0
        # The fallback fires at tau_cap, before the slope exists (L values past it) and on a
        # rising curve, whose slope is never in [0, eps).
        return HybridParams(l_slope=self.tau1, eps_slope=1e-3, k=self.k, tau_cap=self.tau1), 0.1, 0.01

    def schedule(self, mode: Mode) -> StepSchedule:
        """The coordinator's schedule of a guided request in ``mode``, every step decided."""
        params, first, change = self._hybrid_params()
        sched = StepSchedule(
            mode,
            self.num_steps,
            params,
            guidance=True,
            pipeline_warmup=self.pipeline_warmup,
            refresh_every=self.refresh_every,
        )
        step = 0
        while sched.decided_through() < sched.last:
            sched.observe(step, first + change * step)
            step += 1
        return sched

    def phases(self, mode: Mode) -> list[Phase]:
        return self.schedule(mode).phases()

    @property
    def tau2(self) -> int | None:
        return self.schedule(Mode.HYBRID).tau2


def predict_modes(
    compute: ComputeTimes,
    tensors: TensorBytes,
    link: LinkModel,
    schedule: ScheduleParams,
    fixed: FixedCosts = FixedCosts(),
) -> dict[str, dict[str, Any]]:
    """Latency, per-phase breakdown and speedup vs SINGLE of every mode, with ``link`` and ideal,
    JSON-ready (modes and phases by their edge names)."""
    batches = {
        Mode.SINGLE: 1,
        Mode.CFG_PARALLEL: 1,
        Mode.PIPELINE: schedule.pipeline_window_batch,
        Mode.HYBRID: schedule.hybrid_window_batch,
    }
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        phases = schedule.phases(mode)
        refresh = mode == Mode.HYBRID and schedule.refresh_every > 0
        real = simulate(phases, compute, tensors, link, batches[mode], fixed, refresh)
        ideal = simulate(phases, compute, tensors, LinkModel.ideal(), batches[mode], fixed, refresh)
        out[label(mode)] = {
            "predicted": real.to_dict(),
            "ideal": ideal.to_dict(),
            "window_batch": batches[mode],
        }
    single = out[label(Mode.SINGLE)]
    for rec in out.values():
        rec["speedup"] = single["predicted"]["latency"] / rec["predicted"]["latency"]
        rec["ideal_speedup"] = single["ideal"]["latency"] / rec["ideal"]["latency"]
        rec["efficiency"] = rec["speedup"] / rec["ideal_speedup"]  # measured-vs-ideal analogue
    return out

"""The worker's per-step engine: runs a branch, a stage or the whole CFG batch, as told.

One ``WorkerEngine`` per worker. The coordinator (or the in-process driver) sends ``begin``,
then one ``step`` per denoising step with the phase the schedule chose, then ``finish``. The
engine exchanges exactly what each phase needs with its peer through the data plane
(DESIGN section 1):

- SINGLE: nothing (one worker, the CFG batch of 2).
- DATA_PARALLEL: one branch prediction each way; both compute the same guided update.
- PIPELINE_FILL / PIPELINE: stage activations one way, the stage return (nested split) or the
  guided prediction the other way; the stale activations of the previous step make both
  stages run at once (AsyncDiff), the fill step is a synchronous full forward.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gpu_worker.adapters.base import Conditioning, ModelAdapter, RequestTimeline, StageSplit, png_bytes
from gpu_worker.dataplane import Mailbox, PeerLink
from gpu_worker.split_balance import device_clock
from hybridiff.errors import InvalidArgument, WorkerFailed
from hybridiff.messages import BeginCommand, Checkpoint, FinishReport, Role, StepCommand, StepReport
from hybridiff.phases import Phase, WindowGuidance
from hybridiff.request import GenerationSpec
from hybridiff.wire import FrameKind

log = logging.getLogger(__name__)


def rel_mae(e_u: torch.Tensor, e_c: torch.Tensor) -> float:
    """``mean|e_c - e_u| / (mean|e_u| + 1e-12)`` (DESIGN section 1), in float32."""
    e_u, e_c = e_u.float(), e_c.float()
    return float(((e_c - e_u).abs().mean() / (e_u.abs().mean() + 1e-12)).item())


def guide(e_u: torch.Tensor, e_c: torch.Tensor, scale: float) -> torch.Tensor:
    """The CFG combination, written exactly as the diffusers pipelines write it."""
    return e_u + scale * (e_c - e_u)


def latents_digest(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


@dataclass
class _Active:
    cmd: BeginCommand
    cond: Conditioning
    timeline: RequestTimeline
    latents: torch.Tensor
    split: StageSplit | None
    link: PeerLink | None
    last_difference: torch.Tensor | None = None
    stale: dict[str, torch.Tensor] | None = None
    stale_step: int = -1

    @property
    def spec(self) -> GenerationSpec:
        return self.cmd.spec


class WorkerEngine:
    def __init__(self, adapter: ModelAdapter, name: str, mailbox: Mailbox,
                 links: Callable[[str], PeerLink] | None, peer_timeout: float = 120.0) -> None:
        """``links(peer_address)`` gives the link to a peer (cached by the caller as it likes)."""
        self.adapter = adapter
        self.name = name
        self.mailbox = mailbox
        self.links = links
        self.peer_timeout = peer_timeout
        self._clock = device_clock(adapter.device)
        self._active: dict[str, _Active] = {}

    # --- lifecycle ------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, cmd: BeginCommand) -> float:
        """Encode prompts and draw the initial latents; returns the seconds it took."""
        start = time.perf_counter()
        spec = cmd.spec
        if spec.request_id in self._active:
            raise InvalidArgument("request_id", f"request {spec.request_id!r} is already running on {self.name}")
        link = None
        if not cmd.solo:
            if self.links is None:
                raise WorkerFailed(f"{self.name} has no data plane for a paired request")
            link = self.links(cmd.peer_address)
        a = self.adapter
        cond = a.encode(spec.prompt, spec.negative_prompt, spec.guided, spec.height, spec.width)
        timeline = a.new_timeline(spec.num_steps, spec.seed, spec.height, spec.width)
        if cmd.resume is None:
            latents = a.initial_latents(timeline, spec.height, spec.width)
        else:  # continue where another worker stopped: same latents, generator and step index
            latents = cmd.resume.latents.to(device=a.device, dtype=a.dtype)
            timeline.generator.set_state(torch.frombuffer(bytearray(cmd.resume.generator_state), dtype=torch.uint8))
            if hasattr(timeline.scheduler, "set_begin_index"):
                timeline.scheduler.set_begin_index(cmd.resume.next_step)
        split = None if cmd.solo else a.make_split(cmd.split_cut)
        self.mailbox.open(spec.request_id)
        self._active[spec.request_id] = _Active(cmd, cond, timeline, latents, split, link)
        return time.perf_counter() - start

    @torch.no_grad()
    def finish(self, request_id: str, decode: bool) -> FinishReport:
        st = self._take(request_id)
        start = time.perf_counter()
        image = png_bytes(self.adapter.decode(st.latents)) if decode and st.spec.output_format == "png" else None
        return FinishReport(request_id, self.name, latents_digest(st.latents), st.latents.detach().float().cpu(),
                            image, time.perf_counter() - start)

    def abort(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self.mailbox.close(request_id)

    def _take(self, request_id: str) -> _Active:
        st = self._active.pop(request_id, None)
        self.mailbox.close(request_id)
        if st is None:
            raise InvalidArgument("request_id", f"request {request_id!r} is not running on {self.name}")
        return st

    def active(self, request_id: str) -> _Active:
        try:
            return self._active[request_id]
        except KeyError:
            raise InvalidArgument("request_id", f"request {request_id!r} is not running on {self.name}") from None

    # --- one step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, cmd: StepCommand) -> StepReport:
        st = self.active(cmd.request_id)
        if not 0 <= cmd.step < len(st.timeline.timesteps):
            raise InvalidArgument("step", f"step {cmd.step} outside 0..{len(st.timeline.timesteps) - 1}")
        start = time.perf_counter()
        run = {
            Phase.SINGLE: self._single,
            Phase.DATA_PARALLEL: self._data_parallel,
            Phase.PIPELINE_FILL: self._window,
            Phase.PIPELINE: self._window,
        }[cmd.phase]
        self._compute = 0.0
        self._sent = 0
        d = run(st, cmd)
        checkpoint = None
        if cmd.report_latents:
            state = st.timeline.generator.get_state().numpy().tobytes()
            checkpoint = Checkpoint(cmd.step + 1, st.latents.detach().float().cpu(), state)
        return StepReport(cmd.request_id, self.name, cmd.step, cmd.phase, d, self._sent, self._compute,
                          time.perf_counter() - start, checkpoint)

    def _timed(self, fn, *args) -> Any:
        start = self._clock()
        out = fn(*args)
        self._compute += self._clock() - start
        return out

    def _send(self, st: _Active, step: int, kind: int, tensors: dict[str, torch.Tensor], cmd: StepCommand) -> None:
        rid = st.spec.request_id
        self._sent += st.link.send(rid, step, kind, tensors, cmd.trace_context,
                                   cancelled=lambda: not self.mailbox.is_open(rid))  # closed on abort/cancel

    def _recv(self, st: _Active, step: int, kind: int) -> dict[str, torch.Tensor]:
        msg = self.mailbox.take(st.spec.request_id, kind, step, self.peer_timeout)
        return {k: v.to(self.adapter.device) for k, v in msg.tensors.items()}

    def _update(self, st: _Active, eps: torch.Tensor, t: torch.Tensor) -> None:
        st.latents = self.adapter.scheduler_step(st.timeline, eps, t, st.latents)

    def _single(self, st: _Active, cmd: StepCommand) -> float | None:
        a, t = self.adapter, st.timeline.timesteps[cmd.step]
        x_in = a.model_input(st.timeline, st.latents, t)
        d = None
        if st.spec.guided:
            e_u, e_c = self._timed(a.forward, x_in, t, st.cond.for_branches("both")).chunk(2)
            d = rel_mae(e_u, e_c)
            eps = guide(e_u, e_c, st.spec.guidance_scale)
        else:
            eps = self._timed(a.forward, x_in, t, st.cond.cond)
        self._update(st, eps, t)
        return d

    def _data_parallel(self, st: _Active, cmd: StepCommand) -> float:
        a, t = self.adapter, st.timeline.timesteps[cmd.step]
        role = st.cmd.role
        x_in = a.model_input(st.timeline, st.latents, t)
        if st.cmd.solo:
            # A lone survivor of a pair runs the two branches one after the other at batch 1:
            # the same arithmetic as the pair, so the image does not change.
            e_u = self._timed(a.forward, x_in, t, st.cond.for_branches("uncond"))
            e_c = self._timed(a.forward, x_in, t, st.cond.for_branches("cond"))
        else:
            mine = self._timed(a.forward, x_in, t, st.cond.for_branches("uncond" if role == Role.U else "cond"))
            self._send(st, cmd.step, FrameKind.BRANCH_PREDICTION, {"prediction": mine}, cmd)
            other = self._recv(st, cmd.step, FrameKind.BRANCH_PREDICTION)["prediction"]
            e_u, e_c = (mine, other) if role == Role.U else (other, mine)
        if st.cmd.window_guidance == WindowGuidance.LAST_DIFFERENCE:
            st.last_difference = e_c - e_u
        eps = guide(e_u, e_c, st.spec.guidance_scale)
        self._update(st, eps, t)
        return rel_mae(e_u, e_c)

    # --- the pipeline window --------------------------------------------------------
    def _window_inputs(self, st: _Active):
        if st.spec.guided and st.cmd.window_guidance == WindowGuidance.FULL_CFG:
            return st.cond.for_branches("both")
        return st.cond.cond

    def _window_prediction(self, st: _Active, raw: torch.Tensor) -> torch.Tensor:
        """The window's prediction from the stage output, by window-guidance policy."""
        policy, s = st.cmd.window_guidance, st.spec.guidance_scale
        if not st.spec.guided or policy == WindowGuidance.CONDITIONAL:
            return raw
        if policy == WindowGuidance.FULL_CFG:
            e_u, e_c = raw.chunk(2)
            return guide(e_u, e_c, s)
        if st.last_difference is None:
            return raw  # no phase-1 step has measured e_c - e_u yet (cannot happen in HYBRID)
        return raw + (s - 1.0) * st.last_difference  # = e_u + s (e_c - e_u) with the last measured difference

    def _window(self, st: _Active, cmd: StepCommand) -> None:
        a, i = self.adapter, cmd.step
        t = st.timeline.timesteps[i]
        inputs = self._window_inputs(st)
        x_in = a.model_input(st.timeline, st.latents, t)
        if st.cmd.solo:
            # Alone, a window step is a full forward of the window's branch(es): a fill every step.
            raw = self._timed(a.forward, x_in, t, inputs)
            self._update(st, self._window_prediction(st, raw), t)
            return None
        run = self._window_sequential if st.split.topology == "sequential" else self._window_nested
        run(st, cmd, i, t, cmd.phase == Phase.PIPELINE_FILL, inputs, x_in)
        return None

    def _boundary(self, st: _Active, step: int, kind: int) -> dict[str, torch.Tensor]:
        """The peer's boundary tensors of ``step``; kept, because the step after a fill step
        re-uses the fill step's tensors as its stale input."""
        if st.stale_step != step:
            st.stale, st.stale_step = self._recv(st, step, kind), step
        return st.stale

    def _window_sequential(self, st: _Active, cmd: StepCommand, i: int, t, fill: bool, inputs, x_in) -> None:
        """DiT: U runs stage 1 on x_i; C runs stage 2 on stage 1's output of step i-1 (fresh on fill)."""
        if st.cmd.role == Role.U:
            if fill or not cmd.last_in_window:
                boundary = self._timed(st.split.stage1_fwd, x_in, t, inputs)
                self._send(st, i, FrameKind.STAGE_ACTIVATIONS, boundary, cmd)
            eps = self._recv(st, i, FrameKind.GUIDED_PREDICTION)["prediction"]
        else:
            boundary = self._boundary(st, i if fill else i - 1, FrameKind.STAGE_ACTIVATIONS)
            raw = self._timed(st.split.stage2_fwd, boundary, x_in, t, inputs)
            eps = self._window_prediction(st, raw)
            self._send(st, i, FrameKind.GUIDED_PREDICTION, {"prediction": eps}, cmd)
        self._update(st, eps, t)

    def _window_nested(self, st: _Active, cmd: StepCommand, i: int, t, fill: bool, inputs, x_in) -> None:
        """UNet: U runs the outer ring on x_i around the core's output of step i-1 (fresh on fill);
        C runs the core on the outer ring's step-i input."""
        if st.cmd.role == Role.U:
            core_in, state = self._timed(st.split.stage1_pre, x_in, t, inputs)
            if fill or not cmd.last_in_window:
                self._send(st, i, FrameKind.STAGE_ACTIVATIONS, core_in, cmd)
            core_out = self._boundary(st, i if fill else i - 1, FrameKind.STAGE_RETURN)
            raw = self._timed(st.split.stage1_post, core_out, state)
            eps = self._window_prediction(st, raw)
            self._send(st, i, FrameKind.GUIDED_PREDICTION, {"prediction": eps}, cmd)
        else:
            # On the last window step the core's output would only feed a step that is not
            # pipelined, so the core skips it (unless that step is also the fill).
            if fill or not cmd.last_in_window:
                core_in = self._recv(st, i, FrameKind.STAGE_ACTIVATIONS)
                core_out = self._timed(st.split.stage2, core_in, x_in, t, inputs)
                self._send(st, i, FrameKind.STAGE_RETURN, core_out, cmd)
            eps = self._recv(st, i, FrameKind.GUIDED_PREDICTION)["prediction"]
        self._update(st, eps, t)

"""The worker's per-step engine: runs a branch, a stage or the whole CFG batch, as told.

One ``WorkerEngine`` per worker. It takes the control API's own messages
(``hybridiff.internal.v1.SessionRequest``: begin, then one step per denoising step with the
phase the schedule chose, then finish) and answers each with a ``SessionResponse``, in the
cluster and in one process alike. It exchanges exactly what each phase needs with its peer
through the data plane (docs/design.md section 9):

- SINGLE: nothing (one worker, the CFG batch of 2).
- DATA_PARALLEL: one branch prediction each way; both compute the same guided update.
- PIPELINE_FILL / PIPELINE: stage activations one way, the stage return (nested split) or the
  guided prediction the other way; the stale activations of the previous step make both
  stages run at once (AsyncDiff), the fill step is a synchronous full forward.

A *speculative* step (HYBRID, between L and tau1, while the coordinator's monitor has not yet
decided whether the window opens at this step) runs as data parallel, with the conditional
branch computed through the stages: its output is then also what the window's fill step
computes. After the exchange the worker takes the step's ``ResolveCommand`` from its session
(sent while it computed) and finishes the step as DATA_PARALLEL or as the PIPELINE_FILL, so no
worker idles on the coordinator's round trip and both switch at the same step (docs/design.md section 8).

Each step reports where its time went (``StepDone``): compute, device/host copies around the
data plane (``gpu_worker.transfers``: none on CPU; pinned, pooled, zero-copy on CUDA) and into
message frames, time in sends and waiting for the peer's messages, and the control waits (for
the step's command, for a speculative step's resolution), with counts and bytes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.adapters.base import (
    Conditioning,
    ModelAdapter,
    RequestTimeline,
    StageSplit,
    Topology,
    encode_image,
)
from gpu_worker.dataplane import Expect, Mailbox, PeerLink, Sent, session_kinds
from gpu_worker.outgoing import Outgoing
from gpu_worker.split_balance import prepare_request_shapes, through_stages
from gpu_worker.transfers import DirectTransfers, Staged, StagedTransfers, StepCosts, transfers_for
from hybridiff.errors import BadCommand, Cancelled, SessionIdle, WorkerFailed
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import MIME_TYPES, OutputFormat, Phase, Role, WindowGuidance
from hybridiff.request import MAX_GUIDANCE, MAX_STEPS, side_problem
from hybridiff.wire import FrameError, FrameKind, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

# The session's next control message within a timeout, None when none came (the service reads
# it from the Session stream, the in-process pair from its queue): a speculative step's
# ResolveCommand.
NextCommand = Callable[[float], "wpb.SessionRequest | None"]

MIN_NONCE_BYTES = 16  # the coordinator draws 16 random bytes per attempt
MAX_NONCE_BYTES = 64
MAX_PEER_TIMEOUT = 600.0  # seconds: a coordinator's peer timeout is never trusted beyond this
# A step waits for its sends on the sending thread at most the session's peer timeout and this
# (ZmqLink's own send timeout, 60 s, ends a send the peer does not take before then).
MAX_SEND_SECONDS = 65.0


def rel_mae(e_u: torch.Tensor, e_c: torch.Tensor) -> float:
    """``mean|e_c - e_u| / (mean|e_u| + 1e-12)`` (docs/design.md section 1), in float32."""
    e_u, e_c = e_u.float(), e_c.float()
    return float(((e_c - e_u).abs().mean() / (e_u.abs().mean() + 1e-12)).item())


def guide(e_u: torch.Tensor, e_c: torch.Tensor, scale: float) -> torch.Tensor:
    """The CFG combination, written exactly as the diffusers pipelines write it."""
    return e_u + scale * (e_c - e_u)


def latents_digest(latents: torch.Tensor) -> str:
    return hashlib.sha256(
        latents.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]


# The window policies that re-use a measured e_c - e_u: every guided step that has both branches
# measures it (and a checkpoint carries it).
DIFFERENCE_POLICIES = (
    WindowGuidance.LAST_DIFFERENCE,
    WindowGuidance.REFRESHED_DIFFERENCE,
    WindowGuidance.EXTRAPOLATED_DIFFERENCE,
)
# The policies whose window fills are data-parallel fills that measure it again (docs/design.md section 7).
REFRESHING_POLICIES = (WindowGuidance.REFRESHED_DIFFERENCE, WindowGuidance.EXTRAPOLATED_DIFFERENCE)
# EXTRAPOLATED_DIFFERENCE: the trend's weight falls by this factor per step past the last
# measurement, so a difference carried h steps moves by trend * sum(rho**n, n = 1..h), at most
# rho / (1 - rho) steps' worth (measured on the default model: BENCHMARKS.md; 1.0, linear,
# overshoots over a long window).
EXTRAPOLATION_DAMPING = 0.7


def carried_difference(
    difference: torch.Tensor,
    trend: torch.Tensor | None,
    steps_since: int,
    damping: float = EXTRAPOLATION_DAMPING,
) -> torch.Tensor:
    """A difference measured ``steps_since`` steps ago carried along its damped ``trend``."""
    if trend is None or steps_since <= 0:
        return difference
    gain = sum(damping**n for n in range(1, steps_since + 1))
    return difference + gain * trend


@dataclass
class _Active:
    """One running request on this worker."""

    request_id: str
    request: wpb.WorkerRequest
    role: Role
    policy: WindowGuidance
    solo: bool
    cond: Conditioning
    timeline: RequestTimeline
    latents: torch.Tensor
    split: StageSplit | None
    link: PeerLink | None
    peer: str
    last_difference: torch.Tensor | None = None
    difference_step: int = -1  # the step that measured last_difference
    difference_trend: torch.Tensor | None = None  # per step, between its last two measurements
    stale: dict[str, torch.Tensor] | None = None
    stale_step: int = -1
    nonce: bytes = b""  # the attempt's session nonce, carried by every frame this session sends
    peer_timeout: float = 120.0  # seconds to wait for one peer message
    speculative: bool = False  # its Begin announced speculative steps
    last_end: float | None = None  # when its previous command ended (perf_counter)

    @property
    def guided(self) -> bool:
        return self.request.guidance_scale > 1.0

    @property
    def guidance_scale(self) -> float:
        return self.request.guidance_scale


class WorkerEngine:
    def __init__(
        self,
        adapter: ModelAdapter,
        name: str,
        mailbox: Mailbox,
        links: Callable[[str], PeerLink] | None,
        peer_timeout: float = 120.0,
        metrics=None,
        transfers: DirectTransfers | StagedTransfers | None = None,
    ) -> None:
        """``links(peer_address)`` gives the link to a peer (cached by the caller as it likes);
        ``metrics``: an optional ``gpu_worker.metrics.WorkerMetrics`` (step times, bytes sent);
        ``transfers``: how tensors go between the device and the wire (default: by device)."""
        self.adapter = adapter
        self.name = name
        self.mailbox = mailbox
        self.links = links
        self.peer_timeout = peer_timeout
        self.metrics = metrics
        self.transfers = transfers if transfers is not None else transfers_for(adapter.device)
        self._cuda = adapter.device.type == "cuda"
        self._active: dict[str, _Active] = {}
        self._costs = StepCosts()
        self._trace_context: dict[str, str] = {}
        self._outgoing = Outgoing(name) if self.transfers.overlaps else None

    def handle(
        self,
        cmd: wpb.SessionRequest,
        trace_context: Mapping[str, str] | None = None,
        next_command: NextCommand | None = None,
    ) -> wpb.SessionResponse:
        """Run one command of a session and answer its event. A step's data-plane frames carry
        ``trace_context`` (the worker's own step span), else the command's; a speculative step
        takes its resolution from ``next_command``."""
        which = cmd.WhichOneof("command")
        out = wpb.SessionResponse(request_id=cmd.request_id, worker_id=self.name)
        if which == "begin":
            out.begin.encoding_seconds = self.begin(cmd.request_id, cmd.begin)
        elif which == "step":
            context = cmd.trace_context if trace_context is None else trace_context
            out.step.CopyFrom(self.step(cmd.request_id, cmd.step, context, next_command))
        elif which == "finish":
            out.finish.CopyFrom(self.finish(cmd.request_id, cmd.finish))
            return out
        elif which == "resolve":
            raise BadCommand("resolve", f"no speculative step {cmd.resolve.step} is waiting for it")
        else:
            raise BadCommand("command", "empty worker command")
        self._active[cmd.request_id].last_end = time.perf_counter()
        return out

    # --- lifecycle ------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, request_id: str, cmd: wpb.BeginCommand) -> float:
        """Check the command against this worker's own limits, encode prompts and draw the initial
        latents (or take a checkpoint's); the seconds it took."""
        start = time.perf_counter()
        req = cmd.request
        if request_id in self._active:
            raise BadCommand("request_id", f"request {request_id!r} is already running on {self.name}")
        self._check_begin(cmd)
        if self._outgoing is not None:
            # Sends an aborted session left are cancelled (not this attempt's): let them end, so
            # that no link is used by two threads and this session's sends queue behind nothing.
            self._outgoing.drain(MAX_SEND_SECONDS)
        peer_timeout = self._session_peer_timeout(cmd)
        split = None if cmd.solo else self._split(cmd)
        link = None
        if not cmd.solo:
            if self.links is None:
                raise WorkerFailed(f"{self.name} has no data plane for a paired request")
            link = self.links(cmd.peer_data_address)  # BadCommand for an address it may not push to
        a = self.adapter
        negative = req.negative_prompt if req.HasField("negative_prompt") else None
        guided = req.guidance_scale > 1.0
        num_images = req.num_images or 1
        # Compile on: what the request runs is compiled now on the device thread, never during a
        # step its peer waits on; or, on a serving worker, behind the device thread's work while
        # the request's calls run eager (docs/design.md section 4).
        windowed = split if cmd.HasField("split_cut") else None
        full_cfg = cmd.window_guidance == WindowGuidance.FULL_CFG
        # a refreshing policy's fill runs the conditional branch through the stages, as a speculative step
        through_stages = cmd.speculative or cmd.window_guidance in REFRESHING_POLICIES
        prepare_request_shapes(
            a, req.height, req.width, num_images, windowed, cmd.solo, guided, full_cfg, through_stages
        )
        cond = a.encode(req.prompt, negative, guided, req.height, req.width, num_images)
        timeline = a.new_timeline(req.num_steps, req.seed, req.height, req.width)
        last_difference = None
        if not cmd.HasField("resume"):
            latents = a.initial_latents(timeline, req.height, req.width, num_images)
        else:  # continue where another worker stopped: latents, generator, scheduler, window state
            latents, last_difference = self._resume(cmd.resume, timeline, req, num_images)
        expect = None
        if not cmd.solo:
            expect = Expect(
                nonce=cmd.session_nonce,
                peer=cmd.peer_worker_id,
                kinds=session_kinds(cmd.role == Role.U, split.topology),
                first_step=cmd.resume.next_step if cmd.HasField("resume") else 0,
                end_step=len(timeline.timesteps),
            )
        self.mailbox.open(request_id, expect)
        self._active[request_id] = _Active(
            request_id,
            req,
            Role(cmd.role),
            WindowGuidance(cmd.window_guidance),
            cmd.solo,
            cond,
            timeline,
            latents,
            split,
            link,
            cmd.peer_data_address,
            nonce=cmd.session_nonce,
            peer_timeout=peer_timeout,
            last_difference=last_difference,
            difference_step=cmd.resume.last_difference_step if last_difference is not None else -1,
            speculative=cmd.speculative,
        )
        return time.perf_counter() - start

    def _check_begin(self, cmd: wpb.BeginCommand) -> None:
        """``BadCommand`` for what this worker would not run, whoever sent it: sizes, steps,
        images or guidance outside its limits, an unknown role or policy, a pair without a peer
        identity or a session nonce."""
        req, limits = cmd.request, self.adapter.size_limits()
        for name, side in (("request.width", req.width), ("request.height", req.height)):
            problem = side_problem(side, limits)
            if problem:
                raise BadCommand(name, problem)
        if not 1 <= req.num_steps <= MAX_STEPS:
            raise BadCommand("request.num_steps", f"{req.num_steps} outside 1..{MAX_STEPS}")
        if req.num_images > limits.max_images:
            raise BadCommand("request.num_images", f"{req.num_images} exceeds {limits.max_images}")
        if not (math.isfinite(req.guidance_scale) and 0 <= req.guidance_scale <= MAX_GUIDANCE):
            raise BadCommand("request.guidance_scale", f"{req.guidance_scale} outside 0..{MAX_GUIDANCE}")
        if cmd.role not in (Role.U, Role.C):
            raise BadCommand("role", f"unknown role {cmd.role}")
        if cmd.window_guidance not in WindowGuidance.__members__.values():
            raise BadCommand("window_guidance", f"unknown policy {cmd.window_guidance}")
        if cmd.solo:
            return
        if not cmd.peer_worker_id:
            raise BadCommand("peer_worker_id", "a paired session needs its peer's worker id")
        if not MIN_NONCE_BYTES <= len(cmd.session_nonce) <= MAX_NONCE_BYTES:
            raise BadCommand(
                "session_nonce",
                f"a paired session needs a nonce of {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes, "
                f"got {len(cmd.session_nonce)}",
            )

    def _session_peer_timeout(self, cmd: wpb.BeginCommand) -> float:
        """The coordinator's peer timeout for this session (0: this worker's default), at most
        ``MAX_PEER_TIMEOUT``."""
        value = cmd.peer_timeout_seconds
        if not math.isfinite(value) or value < 0:
            raise BadCommand("peer_timeout_seconds", f"{value} is not a duration")
        return min(value, MAX_PEER_TIMEOUT) if value > 0 else self.peer_timeout

    def _split(self, cmd: wpb.BeginCommand) -> StageSplit:
        try:
            return self.adapter.make_split(cmd.split_cut if cmd.HasField("split_cut") else None)
        except ValueError as exc:  # the split names the valid range of cuts
            raise BadCommand("split_cut", str(exc)) from None

    def _resume(
        self, checkpoint: wpb.Checkpoint, timeline: RequestTimeline, req: wpb.WorkerRequest, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The checkpoint's latents and last measured e_c - e_u (None if it has none); sets the
        timeline's generator and scheduler, history included, as they were after step
        ``next_step - 1``, so that the steps from there compute what the unbroken run would."""
        a = self.adapter
        if checkpoint.next_step > len(timeline.timesteps):
            raise BadCommand("resume.next_step", f"{checkpoint.next_step} is past the last step")
        s = a.vae_scale_factor
        shape = (num_images, a.denoiser.config.in_channels, req.height // s, req.width // s)
        latents = self._checkpoint_tensor(checkpoint, "latents")
        if tuple(latents.shape) != shape:
            raise BadCommand("resume.latents", f"shape {list(latents.shape)}, expected {list(shape)}")
        try:
            timeline.generator.set_state(
                torch.frombuffer(bytearray(checkpoint.generator_state), dtype=torch.uint8)
            )
        except (RuntimeError, ValueError) as exc:
            raise BadCommand("resume.generator_state", str(exc)) from None
        if not checkpoint.HasField("scheduler"):  # every worker of this protocol version sends it
            raise BadCommand("resume.scheduler", "the checkpoint carries no scheduler state")
        timeline.restore_scheduler(checkpoint.scheduler, a.device, shape, checkpoint.next_step)
        if not checkpoint.HasField("last_difference"):
            return latents, None
        difference = self._checkpoint_tensor(checkpoint, "last_difference")
        if difference.shape[:1] + difference.shape[2:] != latents.shape[:1] + latents.shape[2:]:
            raise BadCommand("resume.last_difference", f"shape {list(difference.shape)}: not a prediction's")
        if checkpoint.last_difference_step >= checkpoint.next_step:
            raise BadCommand(
                "resume.last_difference_step", f"{checkpoint.last_difference_step} is not a past step"
            )
        return latents, difference

    def _checkpoint_tensor(self, checkpoint: wpb.Checkpoint, name: str) -> torch.Tensor:
        try:
            tensor = tensor_from_proto(getattr(checkpoint, name))
        except FrameError as exc:
            raise BadCommand(f"resume.{name}", str(exc)) from None
        if not tensor.is_floating_point():
            raise BadCommand(f"resume.{name}", f"{tensor.dtype} is not a floating-point type")
        tensor = tensor.to(dtype=self.adapter.dtype)  # checked as the steps will read it
        if not bool(torch.isfinite(tensor).all()):
            raise BadCommand(f"resume.{name}", "values that are not finite (in the worker's dtype)")
        return tensor.to(device=self.adapter.device)

    def _fill_checkpoint(self, checkpoint: wpb.Checkpoint, st: _Active, next_step: int) -> None:
        """Everything another worker needs to go on at ``next_step`` as this one would: the
        latents, the generator, the scheduler's state (the history of a multistep scheduler) and
        the window policy's (the last measured e_c - e_u)."""
        checkpoint.next_step = next_step
        checkpoint.latents.CopyFrom(tensor_to_proto(st.latents.detach().float().cpu(), "latents"))
        checkpoint.generator_state = st.timeline.generator.get_state().numpy().tobytes()
        checkpoint.scheduler.CopyFrom(st.timeline.capture_scheduler())
        if st.last_difference is not None:
            checkpoint.last_difference.CopyFrom(tensor_to_proto(st.last_difference, "last_difference"))
            checkpoint.last_difference_step = st.difference_step

    @torch.no_grad()
    def finish(self, request_id: str, cmd: wpb.FinishCommand) -> wpb.FinishDone:
        st = self._take(request_id)
        start = time.perf_counter()
        latents = st.latents.detach().float().cpu()
        done = wpb.FinishDone(
            latents_digest=latents_digest(st.latents), latents=tensor_to_proto(latents, "latents")
        )
        fmt = OutputFormat(cmd.encoding.format or OutputFormat.PNG)
        if cmd.decode and fmt != OutputFormat.RAW_LATENTS:
            done.images.extend(
                encode_image(image, fmt, cmd.encoding.quality) for image in self.adapter.decode(st.latents)
            )
            done.mime_type = MIME_TYPES[fmt]
        done.decode_seconds = time.perf_counter() - start
        return done

    def abort(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self.mailbox.close(request_id)

    def close(self) -> None:
        """Ends the sending thread (once what it holds is sent)."""
        if self._outgoing is not None:
            self._outgoing.close()

    def _take(self, request_id: str) -> _Active:
        st = self._active.pop(request_id, None)
        self.mailbox.close(request_id)
        if st is None:
            raise BadCommand("request_id", f"request {request_id!r} is not running on {self.name}")
        return st

    def active(self, request_id: str) -> _Active:
        try:
            return self._active[request_id]
        except KeyError:
            raise BadCommand("request_id", f"request {request_id!r} is not running on {self.name}") from None

    # --- one step -------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        request_id: str,
        cmd: wpb.StepCommand,
        trace_context: Mapping[str, str] = (),
        next_command: NextCommand | None = None,
    ) -> wpb.StepDone:
        st = self.active(request_id)
        if not 0 <= cmd.step < len(st.timeline.timesteps):
            raise BadCommand("step", f"step {cmd.step} outside 0..{len(st.timeline.timesteps) - 1}")
        try:
            phase = Phase(cmd.phase)
        except ValueError:
            raise BadCommand("phase", f"unknown phase {cmd.phase}") from None
        if cmd.speculative:
            self._check_speculative(st, cmd, next_command)
        start = time.perf_counter()
        command_wait = start - st.last_end if st.last_end is not None else 0.0
        self._costs = StepCosts()
        self._trace_context = dict(trace_context)
        if self._outgoing is not None:
            self._outgoing.discard()  # what a failed step left on the sending thread
        if cmd.speculative:
            d, phase = self._speculative(st, cmd, next_command)
        else:
            run = {
                Phase.SINGLE: self._single,
                Phase.DATA_PARALLEL: self._data_parallel,
                Phase.PIPELINE_FILL: self._window,
                Phase.PIPELINE: self._window,
            }[phase]
            d = run(st, cmd)
        self._flush_sends(st)
        c = self._costs.finish()
        done = wpb.StepDone(
            step=cmd.step,
            phase=phase,
            report=c.report(phase, time.perf_counter() - start, command_wait),
        )
        if d is not None:
            done.rel_mae = d
        if self.metrics is not None:
            self.metrics.observe_step(phase.name.lower(), done.report)
        if cmd.report_latents:
            self._fill_checkpoint(done.checkpoint, st, cmd.step + 1)
        return done

    def _timed(self, fn, *args) -> Any:
        """``fn(*args)``, its compute time counted: on CUDA by events on the compute stream, read
        at the step's end (no device sync here, so the CPU queues ahead and copies overlap)."""
        if self._cuda:
            stream = torch.cuda.current_stream(self.adapter.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn(*args)
            end.record(stream)
            self._costs.compute_events.append((start, end))
            return out
        start = time.perf_counter()
        out = fn(*args)
        self._costs.compute_seconds += time.perf_counter() - start
        return out

    def _send(self, st: _Active, step: int, kind: int, tensors: dict[str, torch.Tensor]) -> None:
        """Stages ``tensors`` for the wire (device-to-host where the transfers need it) and sends
        them; staged buffers go back to their pool once the transport is done reading them. With
        staged transfers the copy's wait and the send run on the sending thread (``Outgoing``)
        while this thread computes on; the step's end waits for them (``_flush_sends``)."""
        costs = self._costs
        if not self.transfers.overlaps:
            staged = self.transfers.to_host(tensors, costs, st.peer_timeout)
            start = time.perf_counter()
            try:
                sent = self._send_now(st, step, kind, staged, self._trace_context)
            finally:
                costs.send_seconds += time.perf_counter() - start
            costs.send_seconds -= sent.frame_copy_seconds  # counted as a copy, not as wire time
            costs.frame_copy_seconds += sent.frame_copy_seconds
            self._count_sent(costs, sent)
            return
        staged, copied = self.transfers.stage(tensors, st.peer_timeout)
        context = self._trace_context

        def copy_and_send() -> tuple[int, float, Sent, float]:
            try:
                copies, copy_seconds = copied()
            except BaseException:
                staged.release(None)
                raise
            start = time.perf_counter()
            sent = self._send_now(st, step, kind, staged, context)
            return copies, copy_seconds, sent, time.perf_counter() - start

        self._outgoing.submit(copy_and_send)

    def _send_now(
        self, st: _Active, step: int, kind: int, staged: Staged, context: Mapping[str, str]
    ) -> Sent:
        rid = st.request_id
        try:
            # The mailbox is closed on abort or cancel, and a later attempt of the request is
            # another session: a send still waiting for the peer ends then.
            sent = st.link.send(
                rid,
                step,
                kind,
                staged.tensors,
                context,
                cancelled=lambda: not self.mailbox.is_open(rid) or self._active.get(rid) is not st,
                session=st.nonce,
                zero_copy=self.transfers.zero_copy,
            )
        except BaseException:
            staged.release(None)  # nothing was queued (a message goes all or nothing)
            raise
        staged.release(sent.tracker)
        return sent

    def _count_sent(self, costs: StepCosts, sent: Sent) -> None:
        costs.bytes_sent += sent.nbytes
        costs.frame_copies += sent.frame_copies
        if self.metrics is not None:
            self.metrics.sent_bytes.inc(sent.nbytes)

    def _flush_sends(self, st: _Active) -> None:
        """Waits for the step's sends still on the sending thread (the wait is this thread's
        send time) and counts their copies, bytes and the time they took there, overlapped."""
        if not self.transfers.overlaps:
            return
        costs, start = self._costs, time.perf_counter()
        try:
            done = self._outgoing.flush(st.peer_timeout + MAX_SEND_SECONDS)
        finally:
            costs.send_seconds += time.perf_counter() - start
        for copies, copy_seconds, sent, send_seconds in done:
            costs.device_to_host_copies += copies
            # a link that copies into a frame copied there too, overlapped like the rest
            costs.overlapped_copy_seconds += copy_seconds + sent.frame_copy_seconds
            costs.overlapped_send_seconds += send_seconds - sent.frame_copy_seconds
            self._count_sent(costs, sent)

    def _recv(self, st: _Active, step: int, kind: int) -> dict[str, torch.Tensor]:
        """The peer's tensors of ``step`` on this worker's device."""
        start = time.perf_counter()
        try:
            msg = self.mailbox.take(st.request_id, kind, step, st.peer_timeout, peer=st.peer)
        finally:
            self._costs.receive_wait_seconds += time.perf_counter() - start
        self._costs.bytes_received += msg.nbytes
        return self.transfers.to_device(msg.tensors, self._costs)

    def _update(self, st: _Active, eps: torch.Tensor, t: torch.Tensor) -> None:
        st.latents = self.adapter.scheduler_step(st.timeline, eps, t, st.latents)

    def _single(self, st: _Active, cmd: wpb.StepCommand) -> float | None:
        a, t = self.adapter, st.timeline.timesteps[cmd.step]
        x_in = a.model_input(st.timeline, st.latents, t)
        d = None
        if st.guided:
            e_u, e_c = self._timed(a.forward, x_in, t, st.cond.for_branches("both")).chunk(2)
            d = rel_mae(e_u, e_c)
            # An elastic request that grows into a pair inside the window needs it too.
            _measure_difference(st, cmd.step, e_u, e_c)
            eps = guide(e_u, e_c, st.guidance_scale)
        else:
            eps = self._timed(a.forward, x_in, t, st.cond.cond)
        self._update(st, eps, t)
        return d

    def _data_parallel(self, st: _Active, cmd: wpb.StepCommand) -> float:
        t = st.timeline.timesteps[cmd.step]
        x_in = self.adapter.model_input(st.timeline, st.latents, t)
        e_u, e_c, _ = self._branch_predictions(st, cmd, x_in, t)
        return self._guided_update(st, cmd.step, e_u, e_c, t)

    def _branch_predictions(
        self, st: _Active, cmd: wpb.StepCommand, x_in, t, through_stages_for: tuple[str, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """e_u and e_c of the step: one computed here and one from the peer, or alone both here.
        A branch named in ``through_stages_for`` runs stage by stage; what the next pipeline step
        would re-use of it is kept (by branch)."""
        a = self.adapter
        if st.solo:
            # A lone survivor of a pair runs the two branches one after the other at batch 1:
            # the same arithmetic as the pair, so the image does not change.
            e_u = self._timed(a.forward, x_in, t, st.cond.for_branches("uncond"))
            e_c = self._timed(a.forward, x_in, t, st.cond.for_branches("cond"))
            return e_u, e_c, {}
        kept: dict[str, dict[str, torch.Tensor]] = {}
        branch = "uncond" if st.role == Role.U else "cond"
        inputs = st.cond.for_branches(branch)
        if branch in through_stages_for:
            mine, kept[branch], _, _ = self._timed(through_stages, st.split, x_in, t, inputs)
        else:
            mine = self._timed(a.forward, x_in, t, inputs)
        self._send(st, cmd.step, FrameKind.BRANCH_PREDICTION, {"prediction": mine})
        other = self._recv(st, cmd.step, FrameKind.BRANCH_PREDICTION)["prediction"]
        e_u, e_c = (mine, other) if st.role == Role.U else (other, mine)
        return e_u, e_c, kept

    def _guided_update(self, st: _Active, step: int, e_u: torch.Tensor, e_c: torch.Tensor, t) -> float:
        """The CFG update of a phase-1 step; its rel-MAE."""
        _measure_difference(st, step, e_u, e_c)
        self._update(st, guide(e_u, e_c, st.guidance_scale), t)
        return rel_mae(e_u, e_c)

    # --- speculative steps (no control round trip between L and tau1) ----------------
    def _check_speculative(self, st: _Active, cmd: wpb.StepCommand, next_command: NextCommand | None) -> None:
        if not st.speculative:
            raise BadCommand("speculative", "a speculative step in a session not begun as speculative")
        if cmd.phase != Phase.DATA_PARALLEL or not st.guided:
            raise BadCommand("speculative", "a speculative step is a guided DATA_PARALLEL step")
        if not st.solo and st.split is None:
            raise BadCommand("speculative", "a speculative step of a pair needs the session's stage cut")
        if next_command is None:
            raise BadCommand("speculative", f"{self.name} has no way to receive a step's resolution")

    def _speculative(
        self, st: _Active, cmd: wpb.StepCommand, next_command: NextCommand
    ) -> tuple[float | None, Phase]:
        """The data-parallel exchange, then the step as its resolution says: DATA_PARALLEL, or
        the PIPELINE_FILL opening the window. The conditional branch ran through the stages, so
        the fill's prediction and its stale activations are at hand: the next pipeline step's
        stage keeps (or is sent) them, as after a synchronous fill (docs/design.md section 7)."""
        i = cmd.step
        t = st.timeline.timesteps[i]
        x_in = self.adapter.model_input(st.timeline, st.latents, t)
        full_cfg = st.policy == WindowGuidance.FULL_CFG
        # the branches a fill's stale activations are made of
        e_u, e_c, kept = self._branch_predictions(
            st, cmd, x_in, t, ("uncond", "cond") if full_cfg else ("cond",)
        )
        resolution = self._resolution(st, i, next_command)
        if resolution.phase == Phase.DATA_PARALLEL:
            return self._guided_update(st, i, e_u, e_c, t), Phase.DATA_PARALLEL
        if st.policy in REFRESHING_POLICIES:
            self._refreshed_fill_update(st, cmd, resolution.last_in_window, e_u, e_c, kept, t)
            return None, Phase.PIPELINE_FILL
        raw = torch.cat([e_u, e_c]) if full_cfg else e_c  # the window inputs' prediction
        if not st.solo and not resolution.last_in_window:
            self._keep_fill_activations(st, cmd, kept, full_cfg)
        self._update(st, self._window_prediction(st, raw, i), t)
        return None, Phase.PIPELINE_FILL

    def _keep_fill_activations(
        self, st: _Active, cmd: wpb.StepCommand, kept: dict[str, dict[str, torch.Tensor]], full_cfg: bool
    ) -> None:
        """Leave the fill's stale activations where the next pipeline step reads them: with C
        (sequential: stage 2 runs there) or U (nested: the outer ring). The window's batch is the
        conditional branch, or [uncond, cond] under FULL_CFG, whose halves the two workers hold."""
        i = cmd.step
        holder = Role.C if st.split.topology == Topology.SEQUENTIAL else Role.U
        kind = FrameKind.STAGE_ACTIVATIONS if holder == Role.C else FrameKind.STAGE_RETURN
        if not full_cfg:
            if st.role == Role.C and holder == Role.C:
                st.stale, st.stale_step = kept["cond"], i
            elif st.role == Role.C:
                self._send(st, i, kind, kept["cond"])  # U takes it at the next step
            return
        mine = kept["uncond" if st.role == Role.U else "cond"]
        if st.role != holder:
            self._send(st, i, kind, mine)
            return
        theirs = self._recv(st, i, kind)
        u, c = (mine, theirs) if st.role == Role.U else (theirs, mine)
        st.stale, st.stale_step = {k: torch.cat([u[k], c[k]]) for k in c}, i

    def _resolution(self, st: _Active, step: int, next_command: NextCommand) -> wpb.ResolveCommand:
        """The coordinator's ResolveCommand of speculative ``step``, waited for at most the
        session's peer timeout (sent while this step computed, it is normally there already)."""
        start = time.perf_counter()
        try:
            cmd = next_command(st.peer_timeout)
        finally:
            self._costs.resolve_wait_seconds += time.perf_counter() - start
        if cmd is None:
            if not self.mailbox.is_open(st.request_id):
                raise Cancelled(
                    f"{self.name}: request {st.request_id} was aborted in speculative step {step}"
                )
            raise SessionIdle(
                f"{self.name}: no resolution of speculative step {step} within {st.peer_timeout:.1f}s"
            )
        which = cmd.WhichOneof("command")
        if which != "resolve" or cmd.request_id != st.request_id or cmd.resolve.step != step:
            got = f"{which} step {cmd.resolve.step}" if which == "resolve" else which
            raise BadCommand("resolve", f"expected the resolution of step {step}, got {got}")
        if cmd.resolve.phase not in (Phase.DATA_PARALLEL, Phase.PIPELINE_FILL):
            raise BadCommand("resolve.phase", f"a speculative step cannot become phase {cmd.resolve.phase}")
        return cmd.resolve

    # --- the pipeline window --------------------------------------------------------
    def _window_inputs(self, st: _Active):
        if st.guided and st.policy == WindowGuidance.FULL_CFG:
            return st.cond.for_branches("both")
        return st.cond.cond

    def _window_prediction(self, st: _Active, raw: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step``'s prediction from the stage output, by window-guidance policy."""
        policy, s = st.policy, st.guidance_scale
        if not st.guided or policy == WindowGuidance.CONDITIONAL:
            return raw
        if policy == WindowGuidance.FULL_CFG:
            e_u, e_c = raw.chunk(2)
            return guide(e_u, e_c, s)
        if st.last_difference is None:
            return raw  # no phase-1 step has measured e_c - e_u yet (cannot happen in HYBRID)
        difference = st.last_difference
        if policy == WindowGuidance.EXTRAPOLATED_DIFFERENCE:
            difference = carried_difference(difference, st.difference_trend, step - st.difference_step)
        return raw + (s - 1.0) * difference  # = e_u + s (e_c - e_u) with the last measured difference

    def _window(self, st: _Active, cmd: wpb.StepCommand) -> None:
        a, i = self.adapter, cmd.step
        if st.guided and st.policy in REFRESHING_POLICIES and cmd.phase == Phase.PIPELINE_FILL:
            return self._refreshed_fill(st, cmd)
        t = st.timeline.timesteps[i]
        inputs = self._window_inputs(st)
        x_in = a.model_input(st.timeline, st.latents, t)
        if st.solo:
            # Alone, a window step is a full forward of the window's branch(es): a fill every step.
            raw = self._timed(a.forward, x_in, t, inputs)
            self._update(st, self._window_prediction(st, raw, i), t)
            return None
        run = self._window_sequential if st.split.topology == Topology.SEQUENTIAL else self._window_nested
        run(st, cmd, i, t, cmd.phase == Phase.PIPELINE_FILL, inputs, x_in)
        return None

    # --- refreshing policies: every window fill is a data-parallel fill ----------------
    def _refreshed_fill(self, st: _Active, cmd: wpb.StepCommand) -> None:
        """A fill of a refreshing policy's window (its first step, every m-th after it): U runs
        the unconditional branch, C the conditional one through the stages; they exchange
        predictions, the update is exact CFG and measures e_c - e_u again, and the conditional
        branch's stage activations are the next pipelined step's stale input (as a speculative
        step resolved into a fill). About one batch-1 forward, like a synchronous fill."""
        t = st.timeline.timesteps[cmd.step]
        x_in = self.adapter.model_input(st.timeline, st.latents, t)
        e_u, e_c, kept = self._branch_predictions(st, cmd, x_in, t, ("cond",))
        self._refreshed_fill_update(st, cmd, cmd.last_in_window, e_u, e_c, kept, t)

    def _refreshed_fill_update(
        self, st: _Active, cmd: wpb.StepCommand, last_in_window: bool, e_u, e_c, kept, t
    ) -> None:
        _measure_difference(st, cmd.step, e_u, e_c)
        if not st.solo and not last_in_window:
            self._keep_fill_activations(st, cmd, kept, full_cfg=False)
        self._update(st, guide(e_u, e_c, st.guidance_scale), t)

    def _boundary(self, st: _Active, step: int, kind: int) -> dict[str, torch.Tensor]:
        """The peer's boundary tensors of ``step``; kept, because the step after a fill step
        re-uses the fill step's tensors as its stale input."""
        if st.stale_step != step:
            st.stale, st.stale_step = self._recv(st, step, kind), step
        return st.stale

    def _window_sequential(
        self, st: _Active, cmd: wpb.StepCommand, i: int, t, fill: bool, inputs, x_in
    ) -> None:
        """DiT: U runs stage 1 on x_i; C runs stage 2 on stage 1's output of step i-1 (fresh on fill)."""
        if st.role == Role.U:
            if fill or not cmd.last_in_window:
                boundary = self._timed(st.split.stage1, x_in, t, inputs)
                self._send(st, i, FrameKind.STAGE_ACTIVATIONS, boundary)
            eps = self._recv(st, i, FrameKind.GUIDED_PREDICTION)["prediction"]
        else:
            boundary = self._boundary(st, i if fill else i - 1, FrameKind.STAGE_ACTIVATIONS)
            raw = self._timed(st.split.stage2, boundary, x_in, t, inputs)
            eps = self._window_prediction(st, raw, i)
            self._send(st, i, FrameKind.GUIDED_PREDICTION, {"prediction": eps})
        self._update(st, eps, t)

    def _window_nested(self, st: _Active, cmd: wpb.StepCommand, i: int, t, fill: bool, inputs, x_in) -> None:
        """UNet: U runs the outer ring on x_i around the core's output of step i-1 (fresh on fill);
        C runs the core on the outer ring's step-i input."""
        if st.role == Role.U:
            core_in, state = self._timed(st.split.stage1_pre, x_in, t, inputs)
            if fill or not cmd.last_in_window:
                self._send(st, i, FrameKind.STAGE_ACTIVATIONS, core_in)
            core_out = self._boundary(st, i if fill else i - 1, FrameKind.STAGE_RETURN)
            raw = self._timed(st.split.stage1_post, core_out, state)
            eps = self._window_prediction(st, raw, i)
            self._send(st, i, FrameKind.GUIDED_PREDICTION, {"prediction": eps})
        else:
            # On the last window step the core's output would only feed a step that is not
            # pipelined, so the core skips it (unless that step is also the fill).
            if fill or not cmd.last_in_window:
                core_in = self._recv(st, i, FrameKind.STAGE_ACTIVATIONS)
                core_out = self._timed(st.split.stage2, core_in, x_in, t, inputs)
                self._send(st, i, FrameKind.STAGE_RETURN, core_out)
            eps = self._recv(st, i, FrameKind.GUIDED_PREDICTION)["prediction"]
        self._update(st, eps, t)


def _measure_difference(st: _Active, step: int, e_u: torch.Tensor, e_c: torch.Tensor) -> None:
    """Keep step ``step``'s e_c - e_u for a policy that re-uses it, and (extrapolated) its trend
    per step since the previous measurement."""
    if st.policy not in DIFFERENCE_POLICIES:
        return
    difference = e_c - e_u
    if st.policy == WindowGuidance.EXTRAPOLATED_DIFFERENCE and st.last_difference is not None:
        if step > st.difference_step:
            st.difference_trend = (difference - st.last_difference) / (step - st.difference_step)
    st.last_difference, st.difference_step = difference, step

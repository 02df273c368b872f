"""The worker's per-request step engine: runs a branch, a stage or the whole CFG batch, as told.

One ``WorkerEngine`` per worker. It takes the control API's own messages
(``hybridiff.internal.v1.SessionRequest``: begin, then one step per denoising step with the
phase the schedule chose, then finish) and answers each with a ``SessionResponse``, in the
cluster and in one process alike. Its seams (docs/design.md section 7):

- ``gpu_worker.session``: one request's state on this worker, opened by Begin;
- ``gpu_worker.checkpoint``: the checkpoint a step reports and a Begin resumes from;
- ``gpu_worker.exchange``: one step's exchange with the peer through the data plane and the
  account of where its time went (``StepDone``'s report), made afresh for each step;
- ``gpu_worker.phases`` and ``gpu_worker.speculative``: what a step of each phase computes and
  exchanges;
- ``gpu_worker.window_guidance``: the window-guidance policies the phases ask.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping

import torch

from gpu_worker import phases, speculative
from gpu_worker.adapters.base import ModelAdapter, StageSplit, encode_image
from gpu_worker.checkpoint import fill_checkpoint, resume_from
from gpu_worker.dataplane import Expect, Mailbox, PeerLink, session_kinds
from gpu_worker.exchange import MAX_SEND_SECONDS, StepExchange, WorkerPlane
from gpu_worker.outgoing import Outgoing
from gpu_worker.session import MAX_PEER_TIMEOUT, Session, check_begin, session_peer_timeout
from gpu_worker.speculative import NextCommand
from gpu_worker.split_balance import prepare_request_shapes
from gpu_worker.transfers import DirectTransfers, StagedTransfers, transfers_for
from gpu_worker.window_guidance import BOTH, window_guidance_for
from hybridiff.errors import BadCommand, WorkerFailed
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import MIME_TYPES, OutputFormat, Phase, Role
from hybridiff.wire import tensor_to_proto

__all__ = ["MAX_PEER_TIMEOUT", "NextCommand", "WorkerEngine", "latents_digest"]

log = logging.getLogger(__name__)


def latents_digest(latents: torch.Tensor) -> str:
    return hashlib.sha256(
        latents.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]


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
        self._active: dict[str, Session] = {}
        self._outgoing = Outgoing(name) if self.transfers.overlaps else None
        self.plane = WorkerPlane(mailbox, self.transfers, self._outgoing, adapter.device, metrics)

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
        if request_id in self._active:
            raise BadCommand("request_id", f"request {request_id!r} is already running on {self.name}")
        check_begin(cmd, self.adapter.size_limits())
        if self._outgoing is not None:
            # Sends an aborted session left are cancelled (not this attempt's): let them end, so
            # that no link is used by two threads and this session's sends queue behind nothing.
            self._outgoing.drain(MAX_SEND_SECONDS)
        peer_timeout = session_peer_timeout(cmd, self.peer_timeout)
        split = None if cmd.solo else self._split(cmd)
        link = None
        if not cmd.solo:
            if self.links is None:
                raise WorkerFailed(f"{self.name} has no data plane for a paired request")
            link = self.links(cmd.peer_data_address)  # BadCommand for an address it may not push to
        st = self._open(request_id, cmd, split, link)
        st.peer_timeout = peer_timeout
        self.mailbox.open(request_id, self._expect(cmd, st))
        self._active[request_id] = st
        return time.perf_counter() - start

    def _open(self, request_id: str, cmd: wpb.BeginCommand, split: StageSplit | None, link) -> Session:
        """The session of ``cmd``: its prompts encoded, its latents drawn or resumed."""
        a, req = self.adapter, cmd.request
        negative = req.negative_prompt if req.HasField("negative_prompt") else None
        guided = req.guidance_scale > 1.0
        num_images = req.num_images or 1
        guidance = window_guidance_for(cmd.window_guidance, req.guidance_scale)
        # Compile on: what the request runs is compiled now on the device thread, never during a
        # step its peer waits on; or, on a serving worker, behind the device thread's work while
        # the request's calls run eager (docs/design.md section 4).
        windowed = split if cmd.HasField("split_cut") else None
        full_cfg = BOTH in guidance.stage_batches
        # a refreshing policy's fill runs the conditional branch through the stages, as a speculative step
        through_stages = cmd.speculative or (guided and guidance.data_parallel_fills)
        prepare_request_shapes(
            a, req.height, req.width, num_images, windowed, cmd.solo, guided, full_cfg, through_stages
        )
        cond = a.encode(req.prompt, negative, guided, req.height, req.width, num_images)
        timeline = a.new_timeline(req.num_steps, req.seed, req.height, req.width)
        if not cmd.HasField("resume"):
            latents = a.initial_latents(timeline, req.height, req.width, num_images)
        else:  # continue where another worker stopped: latents, generator, scheduler, window state
            latents = resume_from(a, cmd.resume, timeline, req, num_images, guidance)
        return Session(
            request_id,
            req,
            Role(cmd.role),
            guidance,
            cmd.solo,
            cond,
            timeline,
            latents,
            split,
            link,
            cmd.peer_data_address,
            nonce=cmd.session_nonce,
            speculative=cmd.speculative,
        )

    @staticmethod
    def _expect(cmd: wpb.BeginCommand, st: Session) -> Expect | None:
        """What the session's mailbox accepts of its peer (None alone)."""
        if cmd.solo:
            return None
        return Expect(
            nonce=cmd.session_nonce,
            peer=cmd.peer_worker_id,
            kinds=session_kinds(cmd.role == Role.U, st.split.topology),
            first_step=cmd.resume.next_step if cmd.HasField("resume") else 0,
            end_step=len(st.timeline.timesteps),
        )

    def _split(self, cmd: wpb.BeginCommand) -> StageSplit:
        try:
            return self.adapter.make_split(cmd.split_cut if cmd.HasField("split_cut") else None)
        except ValueError as exc:  # the split names the valid range of cuts
            raise BadCommand("split_cut", str(exc)) from None

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

    def _take(self, request_id: str) -> Session:
        st = self._active.pop(request_id, None)
        self.mailbox.close(request_id)
        if st is None:
            raise BadCommand("request_id", f"request {request_id!r} is not running on {self.name}")
        return st

    def active(self, request_id: str) -> Session:
        try:
            return self._active[request_id]
        except KeyError:
            raise BadCommand("request_id", f"request {request_id!r} is not running on {self.name}") from None

    # --- one step -------------------------------------------------------------------
    def exchange(self, st: Session, trace_context: Mapping[str, str] = ()) -> StepExchange:
        """A fresh exchange for one step of ``st``; its frames carry ``trace_context``."""
        rid = st.request_id
        return StepExchange(self.plane, st, trace_context, lambda: self._active.get(rid) is not st)

    @torch.no_grad()
    def step(
        self,
        request_id: str,
        cmd: wpb.StepCommand,
        trace_context: Mapping[str, str] = (),
        next_command: NextCommand | None = None,
    ) -> wpb.StepDone:
        st = self.active(request_id)
        phase = self._check_step(st, cmd, next_command)
        start = time.perf_counter()
        command_wait = start - st.last_end if st.last_end is not None else 0.0
        x = self.exchange(st, trace_context)
        if self._outgoing is not None:
            self._outgoing.discard()  # what a failed step left on the sending thread
        if cmd.speculative:
            d, phase = speculative.speculative(self.adapter, st, x, cmd, next_command, self.name)
        else:
            run = {
                Phase.SINGLE: phases.single,
                Phase.DATA_PARALLEL: phases.data_parallel,
                Phase.PIPELINE_FILL: phases.window,
                Phase.PIPELINE: phases.window,
            }[phase]
            d = run(self.adapter, st, x, cmd)
        x.flush()
        done = wpb.StepDone(
            step=cmd.step,
            phase=phase,
            report=x.costs.finish().report(phase, time.perf_counter() - start, command_wait),
        )
        if d is not None:
            done.rel_mae = d
        if self.metrics is not None:
            self.metrics.observe_step(phase.name.lower(), done.report)
        if cmd.report_latents:
            fill_checkpoint(done.checkpoint, st, cmd.step + 1)
        return done

    def _check_step(self, st: Session, cmd: wpb.StepCommand, next_command: NextCommand | None) -> Phase:
        """The step's phase; ``BadCommand`` for a step this session cannot run."""
        if not 0 <= cmd.step < len(st.timeline.timesteps):
            raise BadCommand("step", f"step {cmd.step} outside 0..{len(st.timeline.timesteps) - 1}")
        try:
            phase = Phase(cmd.phase)
        except ValueError:
            raise BadCommand("phase", f"unknown phase {cmd.phase}") from None
        if cmd.speculative:
            speculative.check_speculative(st, cmd, next_command, self.name)
        return phase

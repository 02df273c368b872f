"""Messages between the coordinator and a worker, declared once (DESIGN section 2).

In one process they travel as these dataclasses; between processes the worker control API
(proto/hybridiff/api/v1/worker.proto) carries the same fields. Each names its request and
step and carries the trace context of the span that sent it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from hybridiff.phases import Phase, WindowGuidance
from hybridiff.request import GenerationSpec


class Role(str, Enum):
    """U runs the unconditional branch and stage 1; C the conditional branch and stage 2."""

    U = "U"
    C = "C"


@dataclass(frozen=True)
class BeginCommand:
    spec: GenerationSpec
    role: Role
    window_guidance: WindowGuidance
    split_cut: int | None = None
    solo: bool = False  # the worker runs the request alone (SINGLE)
    peer_address: str = ""  # the peer's data-plane address (paired requests over ZeroMQ)
    resume: "Checkpoint | None" = None  # continue another worker's request from this checkpoint
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepCommand:
    request_id: str
    step: int
    phase: Phase
    last_in_window: bool = False
    trace_context: dict[str, str] = field(default_factory=dict)
    report_latents: bool = False


@dataclass
class StepReport:
    request_id: str
    worker: str
    step: int
    phase: Phase
    rel_mae: float | None
    bytes_sent: int
    compute_seconds: float
    wall_seconds: float
    checkpoint: "Checkpoint | None" = None  # the latents after this step, when asked for


@dataclass
class FinishReport:
    request_id: str
    worker: str
    latents_digest: str
    latents: torch.Tensor
    image_png: bytes | None
    decode_seconds: float


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a request at ``next_step`` on another worker: the latents
    after step ``next_step - 1`` (float32) and the sampling generator's state."""

    next_step: int
    latents: torch.Tensor
    generator_state: bytes


# --- the same messages on the worker control API (proto/hybridiff/api/v1/worker.proto) ---------

def _wpb():
    from hybridiff.api.v1 import worker_pb2

    return worker_pb2


_ROLE_TO_PB = {Role.U: 1, Role.C: 2}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}


def spec_to_proto(spec: GenerationSpec):
    wpb = _wpb()
    msg = wpb.ResolvedRequest(
        request_id=spec.request_id, prompt=spec.prompt, width=spec.width, height=spec.height,
        num_steps=spec.num_steps, guidance_scale=spec.guidance_scale, seed=spec.seed, mode=spec.mode,
        l_slope=spec.l_slope, eps_slope=spec.eps_slope, k=spec.k, tau_cap=spec.tau_cap,
        window_guidance=spec.window_guidance, output_format=spec.output_format, model=spec.model,
    )
    if spec.negative_prompt is not None:
        msg.negative_prompt = spec.negative_prompt
    return msg


def spec_from_proto(msg) -> GenerationSpec:
    return GenerationSpec(
        request_id=msg.request_id, prompt=msg.prompt,
        negative_prompt=msg.negative_prompt if msg.HasField("negative_prompt") else None,
        width=msg.width, height=msg.height, num_steps=msg.num_steps, guidance_scale=msg.guidance_scale,
        seed=msg.seed, mode=msg.mode, l_slope=msg.l_slope, eps_slope=msg.eps_slope, k=msg.k, tau_cap=msg.tau_cap,
        window_guidance=msg.window_guidance, output_format=msg.output_format, model=msg.model,
    )


def begin_to_proto(cmd: BeginCommand):
    wpb = _wpb()
    begin = wpb.BeginCommand(request=spec_to_proto(cmd.spec), role=_ROLE_TO_PB[cmd.role],
                             window_guidance=int(cmd.window_guidance), solo=cmd.solo,
                             peer_data_address=cmd.peer_address)
    if cmd.split_cut is not None:
        begin.split_cut = cmd.split_cut
    if cmd.resume is not None:
        latents = cmd.resume.latents.float().contiguous()
        begin.resume_step = cmd.resume.next_step
        begin.resume_latents = latents.numpy().astype("<f4").tobytes()
        begin.resume_latent_shape.extend(latents.shape)
        begin.resume_generator_state = cmd.resume.generator_state
    return wpb.WorkerCommand(request_id=cmd.spec.request_id, trace_context=cmd.trace_context, begin=begin)


def begin_from_proto(msg) -> BeginCommand:
    b = msg.begin
    if b.role not in _ROLE_FROM_PB:
        from hybridiff.errors import InvalidArgument

        raise InvalidArgument("role", f"unknown role {b.role}")
    return BeginCommand(
        spec=spec_from_proto(b.request), role=_ROLE_FROM_PB[b.role], window_guidance=WindowGuidance(b.window_guidance),
        split_cut=b.split_cut if b.HasField("split_cut") else None, solo=b.solo,
        trace_context=dict(msg.trace_context), peer_address=b.peer_data_address,
        resume=_checkpoint_from(b.resume_step, b.resume_latents, b.resume_latent_shape, b.resume_generator_state)
        if b.resume_latents else None,
    )


def _checkpoint_from(next_step: int, latents: bytes, shape, generator_state: bytes) -> Checkpoint:
    import numpy as np

    n = 1
    for d in shape:
        n *= d
    if len(latents) != 4 * n:
        from hybridiff.errors import InvalidArgument

        raise InvalidArgument("resume_latents", f"{len(latents)} bytes do not hold shape {list(shape)} in float32")
    tensor = torch.from_numpy(np.frombuffer(latents, dtype="<f4").copy()).reshape(tuple(shape))
    return Checkpoint(next_step, tensor, bytes(generator_state))


def step_to_proto(cmd: StepCommand):
    wpb = _wpb()
    return wpb.WorkerCommand(request_id=cmd.request_id, trace_context=cmd.trace_context,
                             step=wpb.StepCommand(step=cmd.step, phase=int(cmd.phase), last_in_window=cmd.last_in_window,
                                                  report_latents=cmd.report_latents))


def step_from_proto(msg) -> StepCommand:
    s = msg.step
    return StepCommand(request_id=msg.request_id, step=s.step, phase=Phase(s.phase), last_in_window=s.last_in_window,
                       trace_context=dict(msg.trace_context), report_latents=s.report_latents)


def step_report_to_proto(r: StepReport):
    wpb = _wpb()
    done = wpb.StepDone(step=r.step, phase=int(r.phase), bytes_sent=r.bytes_sent,
                        compute_seconds=r.compute_seconds, wall_seconds=r.wall_seconds)
    if r.rel_mae is not None:
        done.rel_mae = r.rel_mae
    if r.checkpoint is not None:
        latents = r.checkpoint.latents.float().contiguous()
        done.latents = latents.numpy().astype("<f4").tobytes()
        done.latent_shape.extend(latents.shape)
        done.generator_state = r.checkpoint.generator_state
    return wpb.WorkerEvent(request_id=r.request_id, worker_id=r.worker, step=done)


def step_report_from_proto(ev) -> StepReport:
    s = ev.step
    checkpoint = (_checkpoint_from(s.step + 1, s.latents, s.latent_shape, s.generator_state) if s.latents else None)
    return StepReport(ev.request_id, ev.worker_id, s.step, Phase(s.phase), s.rel_mae if s.HasField("rel_mae") else None,
                      s.bytes_sent, s.compute_seconds, s.wall_seconds, checkpoint)


def finish_report_to_proto(r: FinishReport):
    wpb = _wpb()
    latents = r.latents.contiguous()
    done = wpb.FinishDone(latents_digest=r.latents_digest, latents=latents.numpy().astype("<f4").tobytes(),
                          latent_shape=list(latents.shape), image_png=r.image_png or b"", decode_seconds=r.decode_seconds)
    return wpb.WorkerEvent(request_id=r.request_id, worker_id=r.worker, finish=done)


def finish_report_from_proto(ev) -> FinishReport:
    import numpy as np

    f = ev.finish
    latents = torch.from_numpy(np.frombuffer(f.latents, dtype="<f4").copy()).reshape(tuple(f.latent_shape))
    return FinishReport(ev.request_id, ev.worker_id, f.latents_digest, latents, f.image_png or None, f.decode_seconds)

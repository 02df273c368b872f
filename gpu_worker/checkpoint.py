"""A session's checkpoint: what a step reports so that another worker can go on from it exactly,
and the reading of one a Begin resumes from (docs/design.md section 5)."""

from __future__ import annotations

import torch

from gpu_worker.adapters.base import ModelAdapter, RequestTimeline
from gpu_worker.session import Session
from gpu_worker.window_guidance import WindowGuidancePolicy
from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.wire import FrameError, tensor_from_proto, tensor_to_proto


def fill_checkpoint(checkpoint: wpb.Checkpoint, st: Session, next_step: int) -> None:
    """Everything another worker needs to go on at ``next_step`` as this one would: the latents,
    the generator, the scheduler's state (the history of a multistep scheduler) and the window
    policy's (e.g. the last measured e_c - e_u)."""
    checkpoint.next_step = next_step
    checkpoint.latents.CopyFrom(tensor_to_proto(st.latents.detach().float().cpu(), "latents"))
    checkpoint.generator_state = st.timeline.generator.get_state().numpy().tobytes()
    checkpoint.scheduler.CopyFrom(st.timeline.capture_scheduler())
    st.guidance.write_checkpoint(checkpoint)


def resume_from(
    adapter: ModelAdapter,
    checkpoint: wpb.Checkpoint,
    timeline: RequestTimeline,
    req: wpb.WorkerRequest,
    num_images: int,
    guidance: WindowGuidancePolicy,
) -> torch.Tensor:
    """The checkpoint's latents; sets the timeline's generator and scheduler, history included,
    as they were after step ``next_step - 1``, and the window policy's memory, so that the steps
    from there compute what the unbroken run would."""
    if checkpoint.next_step > len(timeline.timesteps):
        raise BadCommand("resume.next_step", f"{checkpoint.next_step} is past the last step")
    s = adapter.vae_scale_factor
    shape = (num_images, adapter.denoiser.config.in_channels, req.height // s, req.width // s)

    def read(name: str) -> torch.Tensor:
        return _checkpoint_tensor(adapter, checkpoint, name)

    latents = read("latents")
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
    timeline.restore_scheduler(checkpoint.scheduler, adapter.device, shape, checkpoint.next_step)
    guidance.read_checkpoint(checkpoint, read, latents)
    return latents


def _checkpoint_tensor(adapter: ModelAdapter, checkpoint: wpb.Checkpoint, name: str) -> torch.Tensor:
    try:
        tensor = tensor_from_proto(getattr(checkpoint, name))
    except FrameError as exc:
        raise BadCommand(f"resume.{name}", str(exc)) from None
    if not tensor.is_floating_point():
        raise BadCommand(f"resume.{name}", f"{tensor.dtype} is not a floating-point type")
    tensor = tensor.to(dtype=adapter.dtype)  # checked as the steps will read it
    if not bool(torch.isfinite(tensor).all()):
        raise BadCommand(f"resume.{name}", "values that are not finite (in the worker's dtype)")
    return tensor.to(device=adapter.device)

"""One request's state on a worker (a *session*, from Begin to Finish) and the checks of the Begin
that opens it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gpu_worker.adapters.base import Conditioning, RequestTimeline, StageSplit
from gpu_worker.dataplane import PeerLink
from gpu_worker.window_guidance import WindowGuidancePolicy
from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import Role, WindowGuidance
from hybridiff.request import MAX_GUIDANCE, MAX_STEPS, SizeLimits, side_problem

MIN_NONCE_BYTES = 16  # the coordinator draws 16 random bytes per attempt
MAX_NONCE_BYTES = 64
MAX_PEER_TIMEOUT = 600.0  # seconds: a coordinator's peer timeout is never trusted beyond this


@dataclass
class Session:
    """One running request on this worker."""

    request_id: str
    request: wpb.WorkerRequest
    role: Role
    guidance: WindowGuidancePolicy  # the window policy and what it remembers between steps
    solo: bool
    cond: Conditioning
    timeline: RequestTimeline
    latents: torch.Tensor
    split: StageSplit | None
    link: PeerLink | None
    peer: str
    stale: dict[str, torch.Tensor] | None = None  # the boundary tensors a pipeline step re-uses
    stale_step: int = -1  # the step they are of
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


def check_begin(cmd: wpb.BeginCommand, limits: SizeLimits) -> None:
    """``BadCommand`` for what a worker of these ``limits`` would not run, whoever sent it: sizes,
    steps, images or guidance outside its limits, an unknown role or policy, a pair without a peer
    identity or a session nonce."""
    req = cmd.request
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


def session_peer_timeout(cmd: wpb.BeginCommand, default: float) -> float:
    """The coordinator's peer timeout for this session (0: ``default``, the worker's own), at most
    ``MAX_PEER_TIMEOUT``."""
    value = cmd.peer_timeout_seconds
    if not math.isfinite(value) or value < 0:
        raise BadCommand("peer_timeout_seconds", f"{value} is not a duration")
    return min(value, MAX_PEER_TIMEOUT) if value > 0 else default

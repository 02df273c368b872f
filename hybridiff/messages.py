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
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepCommand:
    request_id: str
    step: int
    phase: Phase
    last_in_window: bool = False
    trace_context: dict[str, str] = field(default_factory=dict)


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


@dataclass
class FinishReport:
    request_id: str
    worker: str
    latents_digest: str
    latents: torch.Tensor
    image_png: bytes | None
    decode_seconds: float

"""The window-guidance policies: how a pipelined window step forms its guided prediction when its
stages run fewer branches than the CFG batch (docs/design.md section 8).

One object per policy and session, made at Begin by ``window_guidance_for``. The phases ask it
only what is declared on ``WindowGuidancePolicy``:

- ``branches(step)``: the batch the window's stages run at ``step`` (``COND`` or ``BOTH``), and
  ``stage_batches``: every such batch, compiled ahead;
- ``prediction(raw, step)``: the step's guided prediction from what the stages return;
- ``fill_prediction(e_u, e_c, step)``: a fill's prediction where both branches were computed (a
  speculative step resolved into the fill, or a refreshing policy's fill);
- ``data_parallel_fills``: whether every window fill computes both branches, data parallel, and
  measures e_c - e_u again (the refreshing policies: the window's first step and every
  ``HybridParams.refresh_every``-th after it are fills, docs/design.md section 7);
- ``remember(e_u, e_c, step)``: a step that computed both branches outside the window (what the
  policy keeps between steps is its own attributes);
- ``write_checkpoint`` / ``read_checkpoint``: what of that a checkpoint carries, so that a resumed
  request goes on as the unbroken one would.

A new policy is a new subclass registered in ``POLICIES``; the phases need no change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import WindowGuidance
from hybridiff.wire import tensor_to_proto

Branches = tuple[str, ...]  # the branches of a batch, in batch order
COND: Branches = ("cond",)
BOTH: Branches = ("uncond", "cond")  # the CFG batch [uncond, cond]

# A checkpoint's tensor field by name, checked as the steps will read it (BadCommand otherwise).
ReadTensor = Callable[[str], torch.Tensor]


def rel_mae(e_u: torch.Tensor, e_c: torch.Tensor) -> float:
    """``mean|e_c - e_u| / (mean|e_u| + 1e-12)`` (docs/design.md section 1), in float32."""
    e_u, e_c = e_u.float(), e_c.float()
    return float(((e_c - e_u).abs().mean() / (e_u.abs().mean() + 1e-12)).item())


def guide(e_u: torch.Tensor, e_c: torch.Tensor, scale: float) -> torch.Tensor:
    """The CFG combination, written exactly as the diffusers pipelines write it."""
    return e_u + scale * (e_c - e_u)


def batch_of(branches: Branches, e_u: torch.Tensor, e_c: torch.Tensor) -> torch.Tensor:
    """The prediction of the batch ``branches`` from the two branches' predictions."""
    by_branch = {"uncond": e_u, "cond": e_c}
    if len(branches) == 1:
        return by_branch[branches[0]]
    return torch.cat([by_branch[b] for b in branches])


class WindowGuidancePolicy(ABC):
    """One session's window policy and what it remembers between steps. Unguided requests
    (``guidance_scale <= 1``) run the conditional branch alone and take it as it is."""

    kind: ClassVar[WindowGuidance]
    # Every fill of the window computes both branches data parallel (the conditional one through
    # the stages, for the stale activations) and takes the exact CFG update.
    data_parallel_fills: ClassVar[bool] = False

    def __init__(self, guidance_scale: float) -> None:
        self.scale = guidance_scale

    @property
    def guided(self) -> bool:
        return self.scale > 1.0

    @property
    def stage_batches(self) -> frozenset[Branches]:
        """Every batch the window's stages may run in this session."""
        return frozenset({COND})

    def branches(self, step: int) -> Branches:
        """The batch the window's stages run at ``step``."""
        return COND

    @abstractmethod
    def prediction(self, raw: torch.Tensor, step: int) -> torch.Tensor:
        """The guided prediction of window step ``step`` from its stages' output ``raw`` (the
        batch ``branches(step)``)."""

    def fill_prediction(self, e_u: torch.Tensor, e_c: torch.Tensor, step: int) -> torch.Tensor:
        """The prediction of fill step ``step`` from both branches' predictions: the window's
        batch taken as its stages would have returned it."""
        return self.prediction(batch_of(self.branches(step), e_u, e_c), step)

    def remember(self, e_u: torch.Tensor, e_c: torch.Tensor, step: int) -> None:
        """Step ``step`` computed both branches outside the window (a guided phase-1 step)."""

    def write_checkpoint(self, checkpoint: wpb.Checkpoint) -> None:
        """Adds what this policy remembers to ``checkpoint``."""

    def read_checkpoint(self, checkpoint: wpb.Checkpoint, read: ReadTensor, like: torch.Tensor) -> None:
        """Takes back what ``write_checkpoint`` wrote; ``like``: the checkpoint's latents. A
        ``last_difference`` is checked whatever the policy (a worker refuses a malformed one)."""
        if checkpoint.HasField("last_difference"):
            _read_difference(checkpoint, read, like)


def _read_difference(checkpoint: wpb.Checkpoint, read: ReadTensor, like: torch.Tensor) -> torch.Tensor:
    difference = read("last_difference")
    if difference.shape[:1] + difference.shape[2:] != like.shape[:1] + like.shape[2:]:
        raise BadCommand("resume.last_difference", f"shape {list(difference.shape)}: not a prediction's")
    if checkpoint.last_difference_step >= checkpoint.next_step:
        step = checkpoint.last_difference_step
        raise BadCommand("resume.last_difference_step", f"{step} is not a past step")
    return difference


class Conditional(WindowGuidancePolicy):
    """The window runs the conditional branch alone and takes it unguided (AsyncDiff's window)."""

    kind = WindowGuidance.CONDITIONAL

    def prediction(self, raw: torch.Tensor, step: int) -> torch.Tensor:
        return raw


class LastDifference(WindowGuidancePolicy):
    """The window runs the conditional branch and adds the last e_c - e_u measured before it:
    ``e_c + (s - 1) d`` = ``e_u + s (e_c - e_u)`` with the last measured difference."""

    kind = WindowGuidance.LAST_DIFFERENCE

    def __init__(self, guidance_scale: float) -> None:
        super().__init__(guidance_scale)
        self.last_difference: torch.Tensor | None = None
        self.difference_step = -1  # the step that measured last_difference

    def prediction(self, raw: torch.Tensor, step: int) -> torch.Tensor:
        if not self.guided or self.last_difference is None:
            return raw  # no phase-1 step has measured e_c - e_u yet (cannot happen in HYBRID)
        return raw + (self.scale - 1.0) * self.difference_at(step)

    def difference_at(self, step: int) -> torch.Tensor:
        """The e_c - e_u window step ``step`` adds: the last measured one."""
        return self.last_difference

    def remember(self, e_u: torch.Tensor, e_c: torch.Tensor, step: int) -> None:
        self.last_difference, self.difference_step = e_c - e_u, step

    def write_checkpoint(self, checkpoint: wpb.Checkpoint) -> None:
        if self.last_difference is not None:
            checkpoint.last_difference.CopyFrom(tensor_to_proto(self.last_difference, "last_difference"))
            checkpoint.last_difference_step = self.difference_step

    def read_checkpoint(self, checkpoint: wpb.Checkpoint, read: ReadTensor, like: torch.Tensor) -> None:
        if checkpoint.HasField("last_difference"):
            self.last_difference = _read_difference(checkpoint, read, like)
            self.difference_step = checkpoint.last_difference_step


class RefreshedDifference(LastDifference):
    """LAST_DIFFERENCE, the difference measured again by every window fill: the window's first
    step and every ``refresh_every``-th after it run both branches data parallel (exact CFG), the
    pipelined steps between re-use what the last fill measured."""

    kind = WindowGuidance.REFRESHED_DIFFERENCE
    data_parallel_fills = True

    def fill_prediction(self, e_u: torch.Tensor, e_c: torch.Tensor, step: int) -> torch.Tensor:
        if not self.guided:
            return e_c
        self.remember(e_u, e_c, step)
        return guide(e_u, e_c, self.scale)


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


class ExtrapolatedDifference(RefreshedDifference):
    """REFRESHED_DIFFERENCE, the difference carried from its last measurement along the trend
    (per step) between its last two measurements, damped."""

    kind = WindowGuidance.EXTRAPOLATED_DIFFERENCE

    def __init__(self, guidance_scale: float) -> None:
        super().__init__(guidance_scale)
        # Per step, between the last two measurements; a checkpoint does not carry it: a pair
        # resumed in the window starts with a fill, which measures the difference again.
        self.trend: torch.Tensor | None = None

    def difference_at(self, step: int) -> torch.Tensor:
        return carried_difference(self.last_difference, self.trend, step - self.difference_step)

    def remember(self, e_u: torch.Tensor, e_c: torch.Tensor, step: int) -> None:
        difference = e_c - e_u
        if self.last_difference is not None and step > self.difference_step:
            self.trend = (difference - self.last_difference) / (step - self.difference_step)
        self.last_difference, self.difference_step = difference, step


class FullCfg(WindowGuidancePolicy):
    """The window's stages run the whole CFG batch, each worker half of it: exact guidance."""

    kind = WindowGuidance.FULL_CFG

    @property
    def stage_batches(self) -> frozenset[Branches]:
        return frozenset({BOTH if self.guided else COND})

    def branches(self, step: int) -> Branches:
        return BOTH if self.guided else COND

    def prediction(self, raw: torch.Tensor, step: int) -> torch.Tensor:
        if not self.guided:
            return raw
        e_u, e_c = raw.chunk(2)
        return guide(e_u, e_c, self.scale)


POLICIES: dict[WindowGuidance, type[WindowGuidancePolicy]] = {
    p.kind: p for p in (Conditional, LastDifference, FullCfg, RefreshedDifference, ExtrapolatedDifference)
}


def window_guidance_for(kind: WindowGuidance, guidance_scale: float) -> WindowGuidancePolicy:
    """A fresh policy object of ``kind`` for one session."""
    return POLICIES[WindowGuidance(kind)](guidance_scale)

"""The phases of a step on one worker, each exchanging with its peer exactly what it needs
(docs/design.md sections 7 and 9):

- SINGLE: nothing (one worker, the CFG batch of 2).
- DATA_PARALLEL: one branch prediction each way; both compute the same guided update.
- PIPELINE_FILL / PIPELINE: stage activations one way, the stage return (nested split) or the
  guided prediction the other way; the stale activations of the previous step make both
  stages run at once (AsyncDiff), the fill step is a synchronous full forward. Under a refreshing
  policy a fill is instead a data-parallel step whose conditional branch runs through the stages
  (``refreshed_fill``).

Each phase takes the model, the session, the step's exchange and the step's command, updates the
session's latents and answers the step's rel-MAE (None where it measured none). What depends on
the window-guidance policy it asks the session's policy object (``gpu_worker.window_guidance``).
"""

from __future__ import annotations

import torch

from gpu_worker.adapters.base import ModelAdapter, Topology
from gpu_worker.exchange import StepExchange
from gpu_worker.session import Session
from gpu_worker.split_balance import through_stages
from gpu_worker.window_guidance import COND, guide, rel_mae
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import Phase, Role
from hybridiff.wire import FrameKind

# The branches' predictions of a step and what of them a pipeline step would re-use, by branch.
BranchPredictions = tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, torch.Tensor]]]


def update(a: ModelAdapter, st: Session, eps: torch.Tensor, t) -> None:
    st.latents = a.scheduler_step(st.timeline, eps, t, st.latents)


def single(a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand) -> float | None:
    t = st.timeline.timesteps[cmd.step]
    x_in = a.model_input(st.timeline, st.latents, t)
    d = None
    if st.guided:
        e_u, e_c = x.timed(a.forward, x_in, t, st.cond.for_branches("both")).chunk(2)
        d = rel_mae(e_u, e_c)
        # An elastic request that grows into a pair inside the window needs it too.
        st.guidance.remember(e_u, e_c, cmd.step)
        eps = guide(e_u, e_c, st.guidance_scale)
    else:
        eps = x.timed(a.forward, x_in, t, st.cond.cond)
    update(a, st, eps, t)
    return d


def data_parallel(a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand) -> float:
    t = st.timeline.timesteps[cmd.step]
    x_in = a.model_input(st.timeline, st.latents, t)
    e_u, e_c, _ = branch_predictions(a, st, x, cmd, x_in, t)
    return guided_update(a, st, cmd, e_u, e_c, t)


def branch_predictions(
    a: ModelAdapter,
    st: Session,
    x: StepExchange,
    cmd: wpb.StepCommand,
    x_in,
    t,
    through_stages_for: tuple[str, ...] = (),
) -> BranchPredictions:
    """e_u and e_c of the step: one computed here and one from the peer, or alone both here.
    A branch named in ``through_stages_for`` runs stage by stage; what the next pipeline step
    would re-use of it is kept (by branch)."""
    if st.solo:
        # A lone survivor of a pair runs the two branches one after the other at batch 1:
        # the same arithmetic as the pair, so the image does not change.
        e_u = x.timed(a.forward, x_in, t, st.cond.for_branches("uncond"))
        e_c = x.timed(a.forward, x_in, t, st.cond.for_branches("cond"))
        return e_u, e_c, {}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    branch = "uncond" if st.role == Role.U else "cond"
    inputs = st.cond.for_branches(branch)
    if branch in through_stages_for:
        mine, kept[branch], _, _ = x.timed(through_stages, st.split, x_in, t, inputs)
    else:
        mine = x.timed(a.forward, x_in, t, inputs)
    x.send(cmd.step, FrameKind.BRANCH_PREDICTION, {"prediction": mine})
    other = x.receive(cmd.step, FrameKind.BRANCH_PREDICTION)["prediction"]
    e_u, e_c = (mine, other) if st.role == Role.U else (other, mine)
    return e_u, e_c, kept


def guided_update(
    a: ModelAdapter, st: Session, cmd: wpb.StepCommand, e_u: torch.Tensor, e_c: torch.Tensor, t
) -> float:
    """The CFG update of a phase-1 step; its rel-MAE."""
    st.guidance.remember(e_u, e_c, cmd.step)
    update(a, st, guide(e_u, e_c, st.guidance_scale), t)
    return rel_mae(e_u, e_c)


# --- the pipeline window --------------------------------------------------------------------------
def fill_update(
    a: ModelAdapter,
    st: Session,
    x: StepExchange,
    cmd: wpb.StepCommand,
    predictions: BranchPredictions,
    last_in_window: bool,
    t,
) -> None:
    """The update of a fill step that computed both branches (the window's branches through the
    stages): a speculative step resolved into the fill, or a refreshing policy's fill. Its stale
    activations are left where the next pipeline step reads them, as after a synchronous fill."""
    e_u, e_c, kept = predictions
    if not st.solo and not last_in_window:
        keep_fill_activations(st, x, cmd, kept, st.guidance.branches(cmd.step) == COND)
    update(a, st, st.guidance.fill_prediction(e_u, e_c, cmd.step), t)


def keep_fill_activations(
    st: Session,
    x: StepExchange,
    cmd: wpb.StepCommand,
    kept: dict[str, dict[str, torch.Tensor]],
    cond_only: bool,
) -> None:
    """Leave the fill's stale activations where the next pipeline step reads them: with C
    (sequential: stage 2 runs there) or U (nested: the outer ring). The window's batch is the
    conditional branch, or [uncond, cond], whose halves the two workers hold."""
    i = cmd.step
    holder = Role.C if st.split.topology == Topology.SEQUENTIAL else Role.U
    kind = FrameKind.STAGE_ACTIVATIONS if holder == Role.C else FrameKind.STAGE_RETURN
    if cond_only:
        if st.role == Role.C and holder == Role.C:
            st.stale, st.stale_step = kept["cond"], i
        elif st.role == Role.C:
            x.send(i, kind, kept["cond"])  # U takes it at the next step
        return
    mine = kept["uncond" if st.role == Role.U else "cond"]
    if st.role != holder:
        x.send(i, kind, mine)
        return
    theirs = x.receive(i, kind)
    u, c = (mine, theirs) if st.role == Role.U else (theirs, mine)
    st.stale, st.stale_step = {k: torch.cat([u[k], c[k]]) for k in c}, i


def refreshed_fill(a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand) -> None:
    """A fill of a refreshing policy's window (its first step, every m-th after it): U runs the
    unconditional branch, C the conditional one through the stages; they exchange predictions,
    the update is exact CFG and measures e_c - e_u again, and the conditional branch's stage
    activations are the next pipelined step's stale input. About one batch-1 forward, like a
    synchronous fill (docs/design.md section 7)."""
    t = st.timeline.timesteps[cmd.step]
    x_in = a.model_input(st.timeline, st.latents, t)
    predictions = branch_predictions(a, st, x, cmd, x_in, t, COND)
    fill_update(a, st, x, cmd, predictions, cmd.last_in_window, t)


def window_inputs(st: Session, step: int):
    """The conditioning of the batch the window's stages run at ``step``."""
    branches = st.guidance.branches(step)
    return st.cond.cond if branches == COND else st.cond.for_branches("both")


def window(a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand) -> None:
    if cmd.phase == Phase.PIPELINE_FILL and st.guided and st.guidance.data_parallel_fills:
        return refreshed_fill(a, st, x, cmd)
    i = cmd.step
    t = st.timeline.timesteps[i]
    inputs = window_inputs(st, i)
    x_in = a.model_input(st.timeline, st.latents, t)
    if st.solo:
        # Alone, a window step is a full forward of the window's branch(es): a fill every step.
        raw = x.timed(a.forward, x_in, t, inputs)
        update(a, st, st.guidance.prediction(raw, i), t)
        return None
    run = window_sequential if st.split.topology == Topology.SEQUENTIAL else window_nested
    run(a, st, x, cmd, t, inputs, x_in)
    return None


def boundary(st: Session, x: StepExchange, step: int, kind: int) -> dict[str, torch.Tensor]:
    """The peer's boundary tensors of ``step``; kept, because the step after a fill step re-uses
    the fill step's tensors as its stale input."""
    if st.stale_step != step:
        st.stale, st.stale_step = x.receive(step, kind), step
    return st.stale


def window_sequential(
    a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand, t, inputs, x_in
) -> None:
    """DiT: U runs stage 1 on x_i; C runs stage 2 on stage 1's output of step i-1 (fresh on fill)."""
    i, fill = cmd.step, cmd.phase == Phase.PIPELINE_FILL
    if st.role == Role.U:
        if fill or not cmd.last_in_window:
            stage1_out = x.timed(st.split.stage1, x_in, t, inputs)
            x.send(i, FrameKind.STAGE_ACTIVATIONS, stage1_out)
        eps = x.receive(i, FrameKind.GUIDED_PREDICTION)["prediction"]
    else:
        stage2_in = boundary(st, x, i if fill else i - 1, FrameKind.STAGE_ACTIVATIONS)
        raw = x.timed(st.split.stage2, stage2_in, x_in, t, inputs)
        eps = st.guidance.prediction(raw, i)
        x.send(i, FrameKind.GUIDED_PREDICTION, {"prediction": eps})
    update(a, st, eps, t)


def window_nested(
    a: ModelAdapter, st: Session, x: StepExchange, cmd: wpb.StepCommand, t, inputs, x_in
) -> None:
    """UNet: U runs the outer ring on x_i around the core's output of step i-1 (fresh on fill);
    C runs the core on the outer ring's step-i input."""
    i, fill = cmd.step, cmd.phase == Phase.PIPELINE_FILL
    if st.role == Role.U:
        core_in, state = x.timed(st.split.stage1_pre, x_in, t, inputs)
        if fill or not cmd.last_in_window:
            x.send(i, FrameKind.STAGE_ACTIVATIONS, core_in)
        core_out = boundary(st, x, i if fill else i - 1, FrameKind.STAGE_RETURN)
        raw = x.timed(st.split.stage1_post, core_out, state)
        eps = st.guidance.prediction(raw, i)
        x.send(i, FrameKind.GUIDED_PREDICTION, {"prediction": eps})
    else:
        # On the last window step the core's output would only feed a step that is not
        # pipelined, so the core skips it (unless that step is also the fill).
        if fill or not cmd.last_in_window:
            core_in = x.receive(i, FrameKind.STAGE_ACTIVATIONS)
            core_out = x.timed(st.split.stage2, core_in, x_in, t, inputs)
            x.send(i, FrameKind.STAGE_RETURN, core_out)
        eps = x.receive(i, FrameKind.GUIDED_PREDICTION)["prediction"]
    update(a, st, eps, t)

"""A speculative step: HYBRID's steps between L and tau1, while the coordinator's monitor has not
yet decided whether the window opens there (docs/design.md section 8).

It runs as data parallel, with the branches the window's stages run computed through the stages:
their output is then also what the window's fill step computes. After the exchange the worker
takes the step's ``ResolveCommand`` from its session (sent while it computed) and finishes the
step as DATA_PARALLEL or as the PIPELINE_FILL, so no worker idles on the coordinator's round trip
and both switch at the same step.
"""

from __future__ import annotations

from collections.abc import Callable

from gpu_worker.adapters.base import ModelAdapter
from gpu_worker.exchange import StepExchange
from gpu_worker.phases import branch_predictions, fill_update, guided_update
from gpu_worker.session import Session
from hybridiff.errors import BadCommand, Cancelled, SessionIdle
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import Phase

# The session's next control message within a timeout, None when none came (the service reads
# it from the Session stream, the in-process pair from its queue): a speculative step's
# ResolveCommand.
NextCommand = Callable[[float], "wpb.SessionRequest | None"]


def check_speculative(
    st: Session, cmd: wpb.StepCommand, next_command: NextCommand | None, worker: str
) -> None:
    if not st.speculative:
        raise BadCommand("speculative", "a speculative step in a session not begun as speculative")
    if cmd.phase != Phase.DATA_PARALLEL or not st.guided:
        raise BadCommand("speculative", "a speculative step is a guided DATA_PARALLEL step")
    if not st.solo and st.split is None:
        raise BadCommand("speculative", "a speculative step of a pair needs the session's stage cut")
    if next_command is None:
        raise BadCommand("speculative", f"{worker} has no way to receive a step's resolution")


def speculative(
    a: ModelAdapter,
    st: Session,
    x: StepExchange,
    cmd: wpb.StepCommand,
    next_command: NextCommand,
    worker: str,
) -> tuple[float | None, Phase]:
    """The data-parallel exchange, then the step as its resolution says: DATA_PARALLEL, or the
    PIPELINE_FILL opening the window. The window's branches ran through the stages, so the fill's
    prediction and its stale activations are at hand: the next pipeline step's stage keeps (or is
    sent) them, as after a synchronous fill (docs/design.md section 7)."""
    i = cmd.step
    t = st.timeline.timesteps[i]
    x_in = a.model_input(st.timeline, st.latents, t)
    branches = st.guidance.branches(i)  # the branches a fill's stale activations are made of
    e_u, e_c, kept = branch_predictions(a, st, x, cmd, x_in, t, branches)
    resolution = _resolution(st, i, next_command, x, worker)
    if resolution.phase == Phase.DATA_PARALLEL:
        return guided_update(a, st, cmd, e_u, e_c, t), Phase.DATA_PARALLEL
    fill_update(a, st, x, cmd, (e_u, e_c, kept), resolution.last_in_window, t)
    return None, Phase.PIPELINE_FILL


def _resolution(
    st: Session, step: int, next_command: NextCommand, x: StepExchange, worker: str
) -> wpb.ResolveCommand:
    """The coordinator's ResolveCommand of speculative ``step``, waited for at most the session's
    peer timeout (sent while this step computed, it is normally there already)."""
    cmd = x.timed_wait(lambda: next_command(st.peer_timeout))
    if cmd is None:
        if not x.mailbox.is_open(st.request_id):
            raise Cancelled(f"{worker}: request {st.request_id} was aborted in speculative step {step}")
        raise SessionIdle(f"{worker}: no resolution of speculative step {step} within {st.peer_timeout:.1f}s")
    which = cmd.WhichOneof("command")
    if which != "resolve" or cmd.request_id != st.request_id or cmd.resolve.step != step:
        got = f"{which} step {cmd.resolve.step}" if which == "resolve" else which
        raise BadCommand("resolve", f"expected the resolution of step {step}, got {got}")
    if cmd.resolve.phase not in (Phase.DATA_PARALLEL, Phase.PIPELINE_FILL):
        raise BadCommand("resolve.phase", f"a speculative step cannot become phase {cmd.resolve.phase}")
    return cmd.resolve

"""What a request that lost a worker may do next (coordinator.driver._needs_pair) and what its
client is told (coordinator.runner.as_typed_error): pure rules, no workers."""

from types import SimpleNamespace

import pytest

from coordinator.driver import _RequestRun
from coordinator.remote import WorkerFault
from coordinator.runner import as_typed_error
from coordinator.schedule import StepSchedule
from hybridiff.errors import Unavailable, WorkerFailed
from hybridiff.protocol import Mode
from hybridiff.request import HybridParams

SDXL = HybridParams(l_slope=12, eps_slope=4e-4, k=5, tau_cap=15)


def _needs_pair(schedule: StepSchedule, next_step: int, elastic=None) -> bool:
    run = _RequestRun.__new__(_RequestRun)  # only the fields the rule reads
    run.schedule, run.elastic = schedule, elastic
    run.checkpoint = SimpleNamespace(next_step=next_step)
    return run._needs_pair()


def _observe_until_decided(schedule: StepSchedule, steps: int) -> None:
    for step in range(steps):
        schedule.observe(step, 0.5)  # a flat curve: slope 0 decides tau1 at the first chance


def test_a_window_ahead_needs_a_pair_and_one_behind_does_not():
    hybrid = StepSchedule(Mode.HYBRID, 30, SDXL, guidance=True)
    assert _needs_pair(hybrid, 3)  # tau1 not decided yet, and it can still open a window
    _observe_until_decided(hybrid, 14)
    first, last = hybrid.window()
    assert _needs_pair(hybrid, last) and not _needs_pair(hybrid, last + 1)
    pipeline = StepSchedule(Mode.PIPELINE, 10, SDXL, guidance=True)
    assert _needs_pair(pipeline, 5) and not _needs_pair(pipeline, 10)


def test_no_pair_is_needed_where_no_window_can_open():
    assert not _needs_pair(StepSchedule(Mode.HYBRID, 10, SDXL, guidance=True), 2)  # never decides tau1
    assert not _needs_pair(StepSchedule(Mode.CFG_PARALLEL, 30, SDXL, guidance=True), 2)
    assert not _needs_pair(StepSchedule(Mode.HYBRID, 30, SDXL, guidance=True), 2, elastic=object())
    late = StepSchedule(Mode.HYBRID, 15, SDXL, guidance=True)  # tau1 from the cap, past the last step
    for step in range(15):
        late.observe(step, 0.1 * step)  # a rising curve never settles: the cap decides
    assert late.window() is None and not _needs_pair(late, 15)


@pytest.mark.parametrize(
    "cause,expected",
    [(Unavailable("worker w gone"), Unavailable), (RuntimeError("a bug"), WorkerFailed)],
)
def test_a_worker_fault_reaches_the_client_as_its_typed_error(cause, expected):
    error = as_typed_error(WorkerFault(cause, "w"))
    assert type(error) is expected and (error is cause) == (expected is Unavailable)

"""The driver's waits (coordinator.driver): a cancel or a passed deadline is noticed
while it waits for a step, and waits are measured in step costs, not fixed 120 s / 600 s."""

import time
from concurrent.futures import Future

import pytest
from cluster_helpers import make_input

from coordinator.driver import StepWaits, _results, drive_request
from hybridiff.errors import Cancelled, DeadlineExceeded
from hybridiff.protocol import Mode


class _Hung:
    """A worker whose commands are never answered (alive, not answering)."""

    def __init__(self, name: str) -> None:
        self.name, self.data_address, self.identity = name, "", name
        self.sent: list = []
        self.aborted = 0

    def send(self, cmd) -> Future:
        self.sent.append(cmd)
        return Future()

    def abort(self, request_id: str) -> None:
        self.aborted += 1


def _raises_after(seconds: float, error: Exception):
    start = time.monotonic()

    def check_alive() -> None:
        if time.monotonic() - start >= seconds:
            raise error

    return check_alive


@pytest.mark.parametrize("error", [Cancelled("gone"), DeadlineExceeded("late")], ids=["cancel", "deadline"])
def test_results_notice_a_cancel_while_waiting(error):
    hung = [_Hung("u"), _Hung("c")]
    start = time.monotonic()
    with pytest.raises(type(error)):
        _results([Future(), Future()], hung, 30.0, "step 3", _raises_after(0.3, error))
    assert time.monotonic() - start < 2.0  # not the 30 s of the step's wait


@pytest.mark.parametrize("error", [Cancelled("gone"), DeadlineExceeded("late")], ids=["cancel", "deadline"])
def test_a_cancel_in_a_hung_step_aborts_both_workers_at_once(engines, error):
    spec = engines["sdxl"].resolve(make_input(prompt="a cat", num_steps=8, mode="cfg-parallel"))
    hung = [_Hung("u"), _Hung("c")]
    # Begin is never answered either: the cancel is noticed in whatever the driver waits for.
    start = time.monotonic()
    with pytest.raises(type(error)):
        drive_request(spec, Mode.CFG_PARALLEL, hung, check_alive=_raises_after(0.3, error), step_timeout=60.0)
    assert time.monotonic() - start < 2.0
    assert all(h.aborted for h in hung)


def test_waits_are_measured_in_step_costs():
    waits = StepWaits(cap=600.0)
    assert waits.peer(None) == 0.0  # nothing measured: the worker's own default
    assert waits.step(None) == 600.0
    assert waits.peer(0.01) == waits.peer_floor  # a tiny step: the floor
    assert waits.peer(2.0) == 20.0  # ten steps
    assert waits.step(2.0) == 3 * 20.0 + 2.0  # longer than a speculative step's three peer waits
    assert StepWaits(cap=30.0).peer(100.0) == 30.0 and StepWaits(cap=30.0).step(100.0) == 30.0


class _Recording:
    """An in-process worker whose commands are kept."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.name, self.data_address, self.identity = worker.name, worker.data_address, worker.identity
        self.begins: list = []

    def send(self, cmd):
        if cmd.WhichOneof("command") == "begin":
            self.begins.append(cmd.begin)
        return self.worker.send(cmd)

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)


def test_begin_carries_the_peer_wait_of_the_expected_step(engines):
    eng = engines["sdxl"]
    spec = eng.resolve(make_input(prompt="a dog", num_steps=4, mode="cfg-parallel"))
    workers = [_Recording(w) for w in eng.workers]
    drive_request(spec, Mode.CFG_PARALLEL, workers, step_cost=1.5)
    assert [b.peer_timeout_seconds for b in workers[0].begins] == [15.0]
    workers = [_Recording(w) for w in eng.workers]
    drive_request(spec, Mode.CFG_PARALLEL, workers)  # the model's first request: the worker's default
    assert [b.peer_timeout_seconds for b in workers[1].begins] == [0.0]

"""Which worker the driver blames when a paired step fails (coordinator.driver._results): the
worker that failed by itself, never its peer that only waited for it."""

from concurrent.futures import Future

import pytest

from coordinator.driver import WorkerStepFailed, _results
from coordinator.remote import as_seen_by_the_client
from hybridiff.errors import BadCommand, PeerTimeout, Unavailable, WorkerFailed


class _Handle:
    def __init__(self, name: str) -> None:
        self.name = name
        self.data_address = ""
        self.identity = name


U, C = _Handle("u"), _Handle("c")
DEAD = Unavailable("worker u: Stream removed (Socket closed)")
NO_MESSAGE = PeerTimeout("c: no message kind 1 for step 5 from the peer within 120.0s")
NOT_TAKEN = PeerTimeout("c: peer tcp://127.0.0.1:4000 did not take data-plane frames in time")


def _future(outcome=None) -> Future:
    fut: Future = Future()
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    elif outcome is not None:
        fut.set_result(outcome)
    return fut


def _blamed(u_outcome, c_outcome, timeout: float = 5.0) -> WorkerStepFailed:
    with pytest.raises(WorkerStepFailed) as failure:
        _results([_future(u_outcome), _future(c_outcome)], [U, C], timeout, "step 5")
    return failure.value


def test_all_results_when_both_answer():
    assert _results([_future(1), _future(2)], [U, C], 1.0, "step 0") == [1, 2]


def test_a_worker_that_failed_by_itself_is_blamed():
    failure = _blamed(DEAD, None, timeout=0.1)
    assert failure.worker is U and failure.cause is DEAD


@pytest.mark.parametrize("wait", [NO_MESSAGE, NOT_TAKEN], ids=["no-message", "frames-not-taken"])
def test_a_worker_that_waited_in_vain_blames_its_peer(wait):
    failure = _blamed(None, wait, timeout=0.1)
    assert failure.worker is U and failure.cause is wait


@pytest.mark.parametrize("wait", [NO_MESSAGE, NOT_TAKEN], ids=["no-message", "frames-not-taken"])
def test_when_both_failed_the_peer_wait_does_not_hide_the_real_failure(wait):
    # The waiting worker comes first in the list: still the failed one is blamed, for its own cause.
    failure = _blamed(wait, DEAD)
    assert failure.worker is C and failure.cause is DEAD
    failure = _blamed(DEAD, wait)
    assert failure.worker is U and failure.cause is DEAD


def test_both_failing_by_themselves_blames_the_first():
    boom = WorkerFailed("worker c: RuntimeError")
    failure = _blamed(DEAD, boom)
    assert failure.worker is U and failure.cause is DEAD


def test_no_answer_in_time_blames_the_silent_worker():
    failure = _blamed(1.0, None, timeout=0.05)
    assert failure.worker is C and "no answer within" in str(failure.cause)


def test_blame_goes_by_the_error_type_not_its_text():
    # A peer wait with any wording (it came back from the worker as ErrorInfo reason PEER_TIMEOUT).
    failure = _blamed(None, PeerTimeout("anything at all", peer="tcp://u:1"), timeout=0.1)
    assert failure.worker is U
    # A failure whose text reads like a peer wait is still the worker's own.
    own = WorkerFailed("c: no message kind 1 for step 5 from the peer within 120.0s")
    assert _blamed(None, own, timeout=0.1).worker is C


def test_a_refused_command_reaches_the_client_as_an_internal_error():
    cause = BadCommand("resume.next_step", "9 is past the last step")
    seen = as_seen_by_the_client(C.name, cause)
    assert isinstance(seen, WorkerFailed) and seen.code.name == "INTERNAL"
    assert "worker c refused a command (BAD_COMMAND)" in str(seen)
    assert as_seen_by_the_client(C.name, DEAD) is DEAD

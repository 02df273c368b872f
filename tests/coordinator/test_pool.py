"""The worker pool and pair allocator (coordinator.pool), against fake workers: real gRPC servers
on 127.0.0.1 implementing WorkerControlService, dialled through the pool's channel factory."""

import threading
import time

import grpc
import pytest
from cluster_helpers import wait_until
from fake_worker import FakeWorker

from coordinator.pool import (
    ABORTING,
    BUSY,
    DRAINING,
    ELSEWHERE,
    IDLE,
    INCOMPATIBLE,
    JOINING,
    STATES,
    UNHEALTHY,
    HealthPolicy,
    WorkerPool,
)
from hybridiff.errors import DeadlineExceeded, InvalidArgument, ModelNotFound, QueueFull, Unavailable
from hybridiff.protocol import WORKER_PROTOCOL_VERSION

WAIT = 5.0  # the most any condition below may take to come true
PROBE_INTERVAL = 0.02
# Quarantines short enough for tests: 2 good probes, at least 0.2 s after a first failure.
HEALTH = HealthPolicy(
    probe_timeout=0.5, readmit_probes=2, quarantine_base=0.2, quarantine_max=0.8, abort_confirm=1.0
)


class ChannelFactory:
    """The pool's ``channel_factory``: real channels, recording what was dialled."""

    def __init__(self) -> None:
        self.dialled: list[str] = []
        self.channels: list[grpc.Channel] = []

    def __call__(self, address: str) -> grpc.Channel:
        self.dialled.append(address)
        channel = grpc.insecure_channel(address)
        self.channels.append(channel)
        return channel


def wait_for(predicate, timeout: float = WAIT) -> None:
    wait_until(predicate, timeout, poll=0.005)


@pytest.fixture
def factory():
    made = ChannelFactory()
    yield made
    for channel in made.channels:
        channel.close()


@pytest.fixture
def fakes():
    made: list[FakeWorker] = []

    def start(worker_id: str, model: str = "sdxl", **kw) -> FakeWorker:
        fake = FakeWorker(worker_id, model, **kw)
        made.append(fake)
        return fake

    yield start
    for fake in made:
        fake.server.stop(0)


@pytest.fixture
def pool(factory):
    made = WorkerPool(factory, queue_capacity=4, probe_interval=PROBE_INTERVAL, health=HEALTH)
    yield made
    made.close()


def states(pool: WorkerPool) -> dict[str, str]:
    return {e.worker_id: e.state for e in pool.snapshot()}


def join(pool: WorkerPool, *workers: FakeWorker) -> None:
    for w in workers:
        pool.worker_ready(w.worker_id, w.address)
    wait_for(lambda: all(states(pool).get(w.worker_id) == IDLE for w in workers))


def ids(entries) -> list[str]:
    return [e.worker_id for e in entries]


class Waiter(threading.Thread):
    """``acquire`` in a thread of its own: what it got, or what it raised."""

    def __init__(self, pool: WorkerPool, name: str, want: int = 2, timeout: float = WAIT, **kw) -> None:
        super().__init__(daemon=True)
        self.pool, self.request_id, self.want, self.timeout, self.kw = pool, name, want, timeout, kw
        self.got: list | None = None
        self.error: Exception | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.got = self.pool.acquire(
                "sdxl", self.want, self.kw.get("accept_one", False), self.request_id, self.timeout
            )
        except Exception as exc:  # handed to the test
            self.error = exc
        finally:
            self.done.set()


def enqueue(pool: WorkerPool, name: str, **kw) -> Waiter:
    """Start a waiter and return once it stands in the admission queue."""
    depth = pool.queue_depth
    waiter = Waiter(pool, name, **kw)
    waiter.start()
    wait_for(lambda: pool.queue_depth == depth + 1 or waiter.done.is_set())
    assert not waiter.done.is_set(), (waiter.got, waiter.error)
    return waiter


# --- discovery and joining ---------------------------------------------------------------------
def test_a_worker_joins_once_its_info_answers(request, factory, fakes):
    w1 = fakes("w1", healthy=False)  # still loading its model
    changes = []
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, on_change=lambda p: changes.append(p.counts()))
    request.addfinalizer(pool.close)
    pool.worker_ready("w1", w1.address)
    assert factory.dialled == [w1.address]
    wait_for(lambda: w1.info_calls >= 2)  # probed again and again while it refuses
    assert states(pool) == {"w1": JOINING}
    with pytest.raises(Unavailable):
        pool.model_info("sdxl")  # a joining worker serves nothing yet

    w1.healthy.set()
    wait_for(lambda: states(pool) == {"w1": IDLE})
    entry = pool.snapshot()[0]
    assert entry.address == w1.address and entry.model == "sdxl"
    assert entry.info.data_address == "tcp://127.0.0.1:6001" and entry.info.limits.max_side == 1024
    assert changes[-1][IDLE] == 1

    calls = w1.info_calls
    time.sleep(PROBE_INTERVAL * 3)
    assert w1.info_calls == calls  # an idle worker is not probed any more

    pool.worker_ready("w1", w1.address)  # discovery repeats itself: nothing changes
    assert factory.dialled == [w1.address] and states(pool) == {"w1": IDLE}


def test_a_worker_reported_at_a_new_address_is_dialled_there(pool, factory, fakes):
    old, new = fakes("w1", healthy=False), fakes("w1")
    pool.worker_ready("w1", old.address)
    wait_for(lambda: old.info_calls >= 1)
    pool.worker_ready("w1", new.address)  # restarted elsewhere before it ever answered
    wait_for(lambda: states(pool) == {"w1": IDLE})
    assert factory.dialled == [old.address, new.address]
    assert pool.snapshot()[0].address == new.address

    # The old address is not probed any more.
    time.sleep(PROBE_INTERVAL * 3)
    calls = old.info_calls
    time.sleep(PROBE_INTERVAL * 5)
    assert old.info_calls == calls


def test_worker_gone_while_joining_stops_its_probe(pool, fakes):
    w1 = fakes("w1", healthy=False)
    pool.worker_ready("w1", w1.address)
    wait_for(lambda: w1.info_calls >= 2)
    pool.worker_gone("w1")
    assert states(pool) == {}
    time.sleep(PROBE_INTERVAL * 3)
    calls = w1.info_calls
    time.sleep(PROBE_INTERVAL * 5)
    assert w1.info_calls == calls
    w1.healthy.set()  # answering now does not bring it back
    time.sleep(PROBE_INTERVAL * 3)
    assert states(pool) == {}


def test_worker_gone_when_idle_removes_it(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    pool.worker_gone("w1")
    assert states(pool) == {"w2": IDLE}
    pool.worker_gone("w1")  # twice, or unknown: harmless
    pool.worker_gone("nobody")
    assert pool.counts() == {**dict.fromkeys(STATES, 0), IDLE: 1}


# --- model_info --------------------------------------------------------------------------------
def test_model_info_without_workers_is_unavailable(pool):
    with pytest.raises(Unavailable):
        pool.model_info("sdxl")
    with pytest.raises(Unavailable):
        pool.model_info("")


def test_model_info_of_the_only_model(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    for name in ("", "sdxl"):
        info = pool.model_info(name)
        assert info.model_name == "sdxl" and info.limits.multiple == 8
    with pytest.raises(ModelNotFound, match="sd9.*served: sdxl"):
        pool.model_info("sd9")


def test_model_info_with_several_models_needs_a_name(pool, fakes):
    join(pool, fakes("w1", "sdxl"), fakes("w2", "sd3"))
    with pytest.raises(InvalidArgument) as failure:
        pool.model_info("")
    assert failure.value.field == "model"
    assert "sd3" in failure.value.description and "sdxl" in failure.value.description
    assert pool.model_info("sd3").model_name == "sd3"
    assert pool.model_info("sdxl").model_name == "sdxl"
    with pytest.raises(ModelNotFound):
        pool.model_info("flux")


# --- acquire -----------------------------------------------------------------------------------
def test_acquire_gives_a_pair_of_idle_workers(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"), fakes("w3", "sd3"))
    pair = pool.acquire("sdxl", 2, False, "r1", timeout=1)
    assert sorted(ids(pair)) == ["w1", "w2"]  # never the worker of another model
    assert all(e.state == BUSY and e.request_id == "r1" for e in pair)
    assert pool.counts()[BUSY] == 2 and pool.queue_depth == 0

    pool.release(pair)
    assert states(pool) == {"w1": IDLE, "w2": IDLE, "w3": IDLE}
    assert all(e.request_id == "" for e in pair)


def test_a_worker_is_never_in_two_requests(pool, fakes):
    join(pool, *(fakes(f"w{i}") for i in range(1, 5)))
    holding: dict[str, str] = {}
    overlaps: list[str] = []
    lock = threading.Lock()

    def request(n: int) -> None:
        for round_ in range(5):
            request_id = f"r{n}.{round_}"
            pair = pool.acquire("sdxl", 2, False, request_id, timeout=WAIT)
            with lock:
                for e in pair:
                    if e.worker_id in holding:
                        overlaps.append(f"{e.worker_id}: {holding[e.worker_id]} and {request_id}")
                    holding[e.worker_id] = request_id
            time.sleep(0.002)
            with lock:
                for e in pair:
                    del holding[e.worker_id]
            pool.release(pair)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == []
    assert pool.counts()[IDLE] == 4 and pool.queue_depth == 0


def test_waiters_are_served_in_arrival_order(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    held = pool.acquire("sdxl", 2, False, "r0", timeout=1)
    first = enqueue(pool, "first")
    second = enqueue(pool, "second", want=1)
    assert pool.queue_depth == 2

    # One worker frees: the second waiter could use it, but the first stands ahead of it.
    pool.release(held[:1])
    assert not second.done.wait(0.1) and not first.done.is_set()

    pool.release(held[1:])
    assert first.done.wait(WAIT) and first.error is None
    assert sorted(ids(first.got)) == ["w1", "w2"]
    assert not second.done.is_set()

    pool.release(first.got[:1])
    assert second.done.wait(WAIT) and second.error is None
    assert ids(second.got) == ids(first.got[:1])
    assert pool.queue_depth == 0


def test_accept_one_takes_a_lone_idle_worker(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    busy = pool.acquire("sdxl", 1, False, "r0", timeout=1)
    start = time.monotonic()
    lone = pool.acquire("sdxl", 2, True, "r1", timeout=WAIT)
    assert time.monotonic() - start < 1  # at once, not after waiting for a second worker
    assert len(lone) == 1 and lone[0] is not busy[0]
    assert lone[0].request_id == "r1"


def test_without_accept_one_a_pair_request_waits_for_two(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    pool.acquire("sdxl", 1, False, "r0", timeout=1)
    with pytest.raises(DeadlineExceeded):
        pool.acquire("sdxl", 2, False, "r1", timeout=0.1)
    assert sorted(states(pool).values()) == [BUSY, IDLE]


def test_a_pair_is_unavailable_when_only_one_worker_serves_the_model(pool, fakes):
    join(pool, fakes("w1"))
    with pytest.raises(Unavailable, match="2 workers needed"):
        pool.acquire("sdxl", 2, False, "r1", timeout=WAIT)
    with pytest.raises(Unavailable):
        pool.acquire("sd3", 1, False, "r2", timeout=WAIT)  # nobody serves it
    assert pool.queue_depth == 0


def test_queue_full_at_once(factory, fakes):
    pool = WorkerPool(factory, queue_capacity=1, probe_interval=PROBE_INTERVAL)
    try:
        join(pool, fakes("w1"), fakes("w2"))
        pool.acquire("sdxl", 2, False, "r0", timeout=1)
        waiter = enqueue(pool, "r1")
        start = time.monotonic()
        with pytest.raises(QueueFull) as failure:
            pool.acquire("sdxl", 2, False, "r2", timeout=WAIT)
        assert time.monotonic() - start < 1
        assert failure.value.retry_after == 1.0
        assert pool.queue_depth == 1  # the refused request did not take a place
    finally:
        pool.close()
    assert waiter.done.wait(WAIT) and isinstance(waiter.error, Unavailable)


def test_deadline_exceeded_when_nothing_frees_in_time(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    pool.acquire("sdxl", 2, False, "r0", timeout=1)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        pool.acquire("sdxl", 2, False, "r1", timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 1.5
    assert pool.queue_depth == 0


def test_check_alive_ends_a_wait(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    pool.acquire("sdxl", 2, False, "r0", timeout=1)
    gone = threading.Event()

    def check_alive() -> None:
        if gone.is_set():
            raise ConnectionAbortedError("the client went away")

    threading.Timer(0.05, gone.set).start()
    with pytest.raises(ConnectionAbortedError):
        pool.acquire("sdxl", 2, False, "r1", timeout=WAIT, check_alive=check_alive)
    assert pool.queue_depth == 0


def test_close_makes_acquire_unavailable(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    pool.acquire("sdxl", 2, False, "r0", timeout=1)
    waiter = enqueue(pool, "r1")
    start = time.monotonic()
    pool.close()
    assert waiter.done.wait(WAIT) and isinstance(waiter.error, Unavailable)
    assert time.monotonic() - start < 1
    with pytest.raises(Unavailable):
        pool.acquire("sdxl", 1, False, "r2", timeout=WAIT)


# --- release, failures and departures ----------------------------------------------------------
def test_a_failed_worker_is_unhealthy_until_its_probe_answers(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    pair = pool.acquire("sdxl", 2, False, "r0", timeout=1)
    w1.healthy.clear()  # it crashed: health and Info refuse
    calls = w1.health_calls
    pool.release([e for e in pair if e.worker_id == "w1"], failed=True)
    pool.release([e for e in pair if e.worker_id == "w2"])
    assert states(pool) == {"w1": UNHEALTHY, "w2": IDLE}

    wait_for(lambda: w1.health_calls >= calls + 2)  # probed
    assert states(pool)["w1"] == UNHEALTHY
    # An unhealthy worker is not handed out.
    assert ids(pool.acquire("sdxl", 2, True, "r1", timeout=1)) == ["w2"]

    w1.healthy.set()
    wait_for(lambda: states(pool)["w1"] == IDLE)
    assert ids(pool.take_idle("sdxl", 2, "r2")) == ["w1"]


def test_a_worker_gone_while_busy_drains_and_leaves_at_release(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    pair = pool.acquire("sdxl", 2, False, "r0", timeout=1)
    pool.worker_gone("w1")
    assert states(pool) == {"w1": DRAINING, "w2": BUSY}
    assert pool.counts()[DRAINING] == 1

    pool.release(pair)
    assert states(pool) == {"w2": IDLE}
    # The drained worker is never handed out again.
    assert ids(pool.acquire("sdxl", 2, True, "r1", timeout=1)) == ["w2"]


def test_a_worker_busy_with_another_coordinator_is_held_aside_not_quarantined(pool, fakes):
    """A Begin refused as WORKER_BUSY (another coordinator's session holds the worker): the
    worker is ``elsewhere`` until its Info names no request, then idle; never quarantined."""
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r0", timeout=1)
    w2.active_request_id = "theirs"
    lease.replace_failed("w2", {"w1"}, want=2, need=1, busy=True)
    assert states(pool) == {"w1": BUSY, "w2": ELSEWHERE}
    assert pool.counts()[ELSEWHERE] == 1 and pool.quarantines == 0 and pool.busy_elsewhere == 1
    assert ids(lease.entries) == ["w1"]
    calls = w2.info_calls
    wait_for(lambda: w2.info_calls >= calls + 2)  # read again, soon
    assert states(pool)["w2"] == ELSEWHERE  # still theirs: not handed out
    w2.active_request_id = ""
    wait_for(lambda: states(pool)["w2"] == IDLE)
    assert pool.quarantines == 0
    lease.release()


def test_a_quarantined_worker_found_serving_another_coordinator_is_readmitted_elsewhere(pool, fakes):
    """Running a request other than the one that failed on it, a quarantined worker is healthy
    (another coordinator drives it); running the failed one, it is not."""
    w1 = fakes("w1")
    join(pool, w1)
    held = pool.acquire("sdxl", 1, False, "mine", timeout=1)
    w1.active_request_id = "mine"
    pool.release(held, failed=True)
    calls = w1.info_calls
    wait_for(lambda: w1.info_calls >= calls + HEALTH.readmit_probes + 1)
    assert states(pool)["w1"] == UNHEALTHY  # still unwinding the request that failed
    w1.active_request_id = "theirs"
    wait_for(lambda: states(pool)["w1"] == ELSEWHERE)
    w1.active_request_id = ""
    wait_for(lambda: states(pool)["w1"] == IDLE)


def test_the_last_worker_of_a_model_leaving_ends_the_wait(pool, fakes):
    join(pool, fakes("w1"))
    held = pool.acquire("sdxl", 1, False, "r0", timeout=1)
    waiter = enqueue(pool, "r1", want=1)
    pool.worker_gone("w1")
    assert waiter.done.wait(WAIT) and isinstance(waiter.error, Unavailable)
    pool.release(held)
    assert states(pool) == {}


# --- Lease -------------------------------------------------------------------------------------
def test_lease_replace_failed_swaps_in_an_idle_worker(pool, fakes):
    w1, w2, w3 = fakes("w1"), fakes("w2"), fakes("w3")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    join(pool, w3)  # free only after the lease was taken

    w1.healthy.clear()
    entries = lease.replace_failed("w1", keep={"w2"}, want=2)
    assert entries is lease.entries and ids(entries) == ["w2", "w3"]
    assert states(pool) == {"w1": UNHEALTHY, "w2": BUSY, "w3": BUSY}
    assert {e.request_id for e in entries} == {"r1"}
    assert len(lease) == 2


def test_lease_replace_failed_goes_on_with_the_survivor_alone(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w2.healthy.clear()
    assert ids(lease.replace_failed("w2", keep={"w1"}, want=2)) == ["w1"]
    assert states(pool) == {"w1": BUSY, "w2": UNHEALTHY}


def _both_busy_one_failing(pool, fakes):
    """Two workers, each leased by a SINGLE request (r0, r1); r1's worker has failed. The leases
    of r0 and r1, and the failed worker's id."""
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    other = pool.lease("sdxl", 1, False, "r0", timeout=1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    failed_id = ids(lease.entries)[0]
    {"w1": w1, "w2": w2}[failed_id].healthy.clear()
    return other, lease, failed_id


def _resume_in_background(lease, failed_id: str) -> tuple[threading.Thread, list]:
    """``lease.replace_failed`` of a SINGLE request on a thread; what it resumed on, once done."""
    resumed: list = []
    recovery = threading.Thread(
        target=lambda: resumed.append(
            ids(lease.replace_failed(failed_id, keep=set(), want=1, need=1, timeout=WAIT))
        ),
        daemon=True,
    )
    recovery.start()
    return recovery, resumed


def test_a_request_that_lost_its_only_worker_waits_for_the_next_free_one(pool, fakes):
    """Every worker busy: the failed request goes back to the head of the queue and resumes on the
    first worker another request frees, ahead of a request that arrived before the failure."""
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    other = pool.lease("sdxl", 1, False, "r0", timeout=1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    failed_id = ids(lease.entries)[0]
    waiter: list = []
    new_request = threading.Thread(
        target=lambda: waiter.append(ids(pool.acquire("sdxl", 1, False, "r2", timeout=WAIT))), daemon=True
    )
    new_request.start()
    wait_for(lambda: pool.queue_depth == 1)  # r2 queued before the failure
    {"w1": w1, "w2": w2}[failed_id].healthy.clear()
    recovery, resumed = _resume_in_background(lease, failed_id)
    wait_for(lambda: pool.queue_depth == 2)
    assert not resumed
    survivor = ids(other.entries)[0]
    other.release()  # the only healthy worker frees: the resuming request takes it, not r2
    recovery.join(WAIT)
    assert resumed == [[survivor]] and not waiter
    lease.release()
    new_request.join(WAIT)
    assert waiter == [[survivor]]


def test_a_pair_that_needs_a_partner_waits_holding_nothing(pool, fakes):
    """A survivor that cannot finish alone (a pipeline window ahead) is given back and the
    request waits at the head for a pair: no request holds a worker while it waits for another."""
    w1, w2, w3 = fakes("w1"), fakes("w2"), fakes("w3")
    join(pool, w1, w2, w3)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    other = pool.lease("sdxl", 1, False, "r0", timeout=1)
    failed_id, survivor = ids(lease.entries)  # the third worker is busy with r0
    {"w1": w1, "w2": w2, "w3": w3}[failed_id].healthy.clear()
    resumed: list = []
    recovery = threading.Thread(
        target=lambda: resumed.append(
            ids(lease.replace_failed(failed_id, keep={survivor}, want=2, need=2, timeout=WAIT))
        ),
        daemon=True,
    )
    recovery.start()
    wait_for(lambda: states(pool)[survivor] == IDLE and pool.queue_depth == 1)
    assert not resumed
    other.release()
    recovery.join(WAIT)
    third = next(w for w in ("w1", "w2", "w3") if w not in (failed_id, survivor))
    assert len(resumed) == 1 and sorted(resumed[0]) == sorted([survivor, third])
    lease.release()


def test_a_resuming_request_gives_up_when_no_worker_frees_in_time(pool, fakes):
    other, lease, failed_id = _both_busy_one_failing(pool, fakes)
    with pytest.raises(Unavailable, match="no other worker freed"):
        lease.replace_failed(failed_id, keep=set(), want=1, need=1, timeout=0.3)
    assert pool.queue_depth == 0
    other.release()


def test_a_survivor_no_pair_can_form_with_again_goes_on_alone(pool, fakes):
    """The only other worker is quarantined: waiting for a pair would hold the model's queue
    until the deadline, so the survivor goes on at once."""
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    failed_id, survivor = ids(lease.entries)
    {"w1": w1, "w2": w2}[failed_id].healthy.clear()
    start = time.monotonic()
    assert ids(lease.replace_failed(failed_id, keep={survivor}, want=2, need=2, timeout=WAIT)) == [survivor]
    assert time.monotonic() - start < 1 and pool.queue_depth == 0


def test_the_clients_deadline_during_the_resuming_wait_stays_a_deadline(pool, fakes):
    other, lease, failed_id = _both_busy_one_failing(pool, fakes)
    ends = time.monotonic() + 0.3

    def check_alive() -> None:
        if time.monotonic() > ends:
            raise DeadlineExceeded("the client's deadline passed")

    with pytest.raises(DeadlineExceeded, match="client"):
        lease.replace_failed(failed_id, keep=set(), want=1, need=1, timeout=WAIT, check_alive=check_alive)
    assert pool.queue_depth == 0
    other.release()


def test_a_request_waiting_to_resume_still_resumes_during_a_drain(pool, fakes):
    """A drain stops new requests, not running ones: one waiting to resume gets the next worker."""
    other, lease, failed_id = _both_busy_one_failing(pool, fakes)
    recovery, resumed = _resume_in_background(lease, failed_id)
    wait_for(lambda: pool.queue_depth == 1)
    pool.close()
    survivor = ids(other.entries)[0]
    other.release()
    recovery.join(WAIT)
    assert resumed == [[survivor]]
    lease.release()


def test_lease_replace_failed_is_unavailable_when_no_worker_is_left(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    other = pool.acquire("sdxl", 1, False, "r0", timeout=1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    failed_id = ids(lease.entries)[0]
    {"w1": w1, "w2": w2}[failed_id].healthy.clear()
    with pytest.raises(Unavailable, match=failed_id):
        lease.replace_failed(failed_id, keep=set(), want=1)
    assert lease.entries == [] and len(lease) == 0
    assert states(pool)[failed_id] == UNHEALTHY
    assert states(pool)[other[0].worker_id] == BUSY  # another request's worker is not taken

    lease.release()  # what the service's finally does: nothing left to give back
    assert states(pool)[failed_id] == UNHEALTHY


def test_lease_release_gives_each_worker_back_exactly_once(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"))
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    lease.release()
    assert lease.entries == []
    assert states(pool) == {"w1": IDLE, "w2": IDLE}

    # The workers now serve another request: a second release of the old lease must not free them.
    again = pool.acquire("sdxl", 2, False, "r2", timeout=1)
    lease.release()
    assert states(pool) == {"w1": BUSY, "w2": BUSY}
    assert {e.request_id for e in again} == {"r2"}


def test_lease_release_failed_makes_its_workers_unhealthy(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w1.healthy.clear()
    w2.healthy.clear()
    lease.release(failed=True)
    assert states(pool) == {"w1": UNHEALTHY, "w2": UNHEALTHY}
    w1.healthy.set()
    w2.healthy.set()
    wait_for(lambda: states(pool) == {"w1": IDLE, "w2": IDLE})


# --- quarantine: probed with health, re-admitted once it proves itself --------------------------
def fail(pool: WorkerPool, worker_id: str, request_id: str = "r0") -> None:
    """Acquire ``worker_id`` alone (every other idle worker busy meanwhile) and fail its request."""
    held = [e for e in pool.snapshot() if e.state == IDLE and e.worker_id != worker_id]
    for e in held:
        e.held = BUSY
    try:
        (entry,) = pool.take_idle("sdxl", 1, request_id)
        assert entry.worker_id == worker_id
    finally:
        pool.release(held)
    pool.release([entry], failed=True)


def stays(pool: WorkerPool, worker_id: str, state: str, fake: FakeWorker, probes: int = 8) -> None:
    """``worker_id`` is still in ``state`` after ``probes`` more health probes (several times the
    longest quarantine of ``HEALTH`` under load: probes come every PROBE_INTERVAL)."""
    calls = fake.health_calls
    start = time.monotonic()
    while fake.health_calls < calls + probes or time.monotonic() < start + HEALTH.quarantine_max * 2:
        assert states(pool)[worker_id] == state
        assert time.monotonic() < start + WAIT * 2, f"{fake.health_calls - calls} health probes"
        time.sleep(0.01)
    assert states(pool)[worker_id] == state


def test_a_failed_worker_whose_health_is_not_serving_stays_quarantined(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    w1.serving.clear()  # its watchdog fired: health NOT_SERVING, but Info still answers
    fail(pool, "w1")
    assert states(pool) == {"w1": UNHEALTHY, "w2": IDLE}
    stays(pool, "w1", UNHEALTHY, w1)
    assert ids(pool.acquire("sdxl", 2, True, "r1", timeout=1)) == ["w2"]  # never handed out

    w1.serving.set()
    wait_for(lambda: states(pool)["w1"] == IDLE)
    assert ids(pool.take_idle("sdxl", 2, "r2")) == ["w1"]


def test_a_stopped_worker_whose_probes_time_out_stays_quarantined(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    w1.frozen.set()  # SIGSTOP: it answers nothing
    fail(pool, "w1")
    stays(pool, "w1", UNHEALTHY, w1, probes=3)  # each probe runs into its timeout
    w1.frozen.clear()
    wait_for(lambda: states(pool)["w1"] == IDLE)


def test_a_worker_still_running_a_request_is_not_readmitted(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    w1.active_request_id = "r0"  # health SERVING, but it still runs the failed request
    fail(pool, "w1")
    stays(pool, "w1", UNHEALTHY, w1)
    w1.active_request_id = ""
    wait_for(lambda: states(pool)["w1"] == IDLE)


def test_readmission_takes_good_probes_in_a_row_and_the_minimum_quarantine(factory, fakes):
    policy = HealthPolicy(probe_timeout=0.5, readmit_probes=3, quarantine_base=0.5, quarantine_max=4)
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=policy)
    try:
        w1, w2 = fakes("w1"), fakes("w2")
        join(pool, w1, w2)
        # Healthy at once: re-admitted after the minimum quarantine, not at the first good probe.
        start, calls = time.monotonic(), w1.health_calls
        fail(pool, "w1")
        wait_for(lambda: states(pool)["w1"] == IDLE)
        assert time.monotonic() - start >= 0.5
        assert w1.health_calls - calls >= 3

        # Flapping health: a bad probe starts the count again. Two good probes in a row, then a
        # bad one, for longer than the second (1 s) quarantine: it stays out all along.
        w1.health_script = [True, True, False] * int(1.5 / PROBE_INTERVAL)
        fail(pool, "w1")
        wait_for(lambda: not w1.health_script or states(pool)["w1"] != UNHEALTHY, timeout=WAIT * 4)
        assert states(pool)["w1"] == UNHEALTHY and not w1.health_script
        calls = w1.health_calls
        wait_for(lambda: states(pool)["w1"] == IDLE)  # three good ones in a row
        assert w1.health_calls - calls >= 3
    finally:
        pool.close()


def test_the_quarantine_doubles_with_failures_in_a_row_up_to_a_cap(factory, fakes):
    policy = HealthPolicy(
        probe_timeout=0.5, readmit_probes=1, quarantine_base=0.2, quarantine_max=0.8, healthy_stretch=60
    )
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=policy)
    try:
        w1, w2 = fakes("w1"), fakes("w2")
        join(pool, w1, w2)
        (entry,) = [e for e in pool.snapshot() if e.worker_id == "w1"]
        for n, seconds in enumerate((0.2, 0.4, 0.8, 0.8), start=1):
            start = time.monotonic()
            fail(pool, "w1", f"r{n}")
            assert entry.failures == n
            assert entry.quarantined_until - start == pytest.approx(seconds, abs=0.05)
            wait_for(lambda: states(pool)["w1"] == IDLE)
            assert time.monotonic() - start >= seconds
        assert pool.quarantines == 4
    finally:
        pool.close()


def test_the_backoff_resets_after_a_healthy_stretch(factory, fakes):
    policy = HealthPolicy(
        probe_timeout=0.5, readmit_probes=1, quarantine_base=0.1, quarantine_max=10, healthy_stretch=0.3
    )
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=policy)
    try:
        w1, w2 = fakes("w1"), fakes("w2")
        join(pool, w1, w2)
        (entry,) = [e for e in pool.snapshot() if e.worker_id == "w1"]
        fail(pool, "w1", "r1")
        wait_for(lambda: states(pool)["w1"] == IDLE)
        fail(pool, "w1", "r2")  # at once: a failure in a row
        assert entry.failures == 2
        wait_for(lambda: states(pool)["w1"] == IDLE)
        readmitted = time.monotonic()
        while time.monotonic() - readmitted < 0.4:  # a healthy stretch
            time.sleep(0.02)
        fail(pool, "w1", "r3")
        assert entry.failures == 1
        assert entry.quarantined_until - time.monotonic() <= 0.1
    finally:
        pool.close()


def test_quarantines_are_counted_in_the_metrics(factory, fakes):
    from coordinator.metrics import CoordinatorMetrics

    metrics = CoordinatorMetrics()
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=HEALTH, on_change=metrics.observe_pool)
    try:
        w1, w2 = fakes("w1"), fakes("w2")
        join(pool, w1, w2)
        w1.serving.clear()
        pair = pool.acquire("sdxl", 2, False, "r1", timeout=1)
        pool.release(pair, failed=True)
        value = metrics.registry.get_sample_value
        assert value("hybridiff_worker_quarantines_total") == 2
        assert value("hybridiff_workers", {"state": UNHEALTHY}) == 2
        wait_for(lambda: value("hybridiff_workers", {"state": IDLE}) == 1)  # w2 came back
        assert value("hybridiff_workers", {"state": UNHEALTHY}) == 1
    finally:
        pool.close()


# --- the idle watch: a stopped idle worker is quarantined before a request draws it -------------
IDLE_WATCH = HealthPolicy(
    probe_timeout=0.5,
    readmit_probes=2,
    quarantine_base=0.2,
    quarantine_max=0.8,
    idle_check=0.05,
    idle_check_timeout=0.3,
)


@pytest.fixture
def watched(factory):
    made = WorkerPool(factory, queue_capacity=4, probe_interval=PROBE_INTERVAL, health=IDLE_WATCH)
    yield made
    made.close()


def test_a_stopped_idle_worker_is_quarantined_without_any_request(watched, fakes):
    w1, w2, w3 = fakes("w1"), fakes("w2"), fakes("w3")
    join(watched, w1, w2, w3)
    wait_for(lambda: min(w.health_calls for w in (w1, w2, w3)) >= 2)  # every idle worker, checked
    assert sum(t.name == "probe-idle" for t in threading.enumerate()) == 1  # one thread for all
    infos = w1.info_calls
    w1.frozen.set()  # SIGSTOP: it answers nothing
    wait_for(lambda: states(watched)["w1"] == UNHEALTHY, timeout=IDLE_WATCH.idle_check_timeout + 2)
    assert states(watched) == {"w1": UNHEALTHY, "w2": IDLE, "w3": IDLE} and watched.quarantines == 1
    assert w1.info_calls == infos  # found by a health Check, not by reading its Info
    start = time.monotonic()
    assert ids(watched.acquire("sdxl", 1, False, "r1", timeout=1)) == ["w2"]  # not drawn
    assert time.monotonic() - start < 0.2
    w1.frozen.clear()  # SIGCONT: the quarantine's probes re-admit it
    wait_for(lambda: states(watched)["w1"] == IDLE)


def test_an_idle_worker_whose_health_turns_not_serving_is_quarantined(watched, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(watched, w1, w2)
    w1.serving.clear()  # its watchdog fired, or it drains
    wait_for(lambda: states(watched)["w1"] == UNHEALTHY)
    assert ids(watched.acquire("sdxl", 2, True, "r1", timeout=1)) == ["w2"]
    w1.serving.set()
    wait_for(lambda: states(watched)["w1"] == IDLE)


def test_health_checks_refused_for_want_of_open_slots_quarantine_no_worker(watched, fakes):
    # Without a client CA the coordinator's Check shares the open slots an attacker may hold
    # (bodiless calls): refused, the worker still answers; Info proves it in a quarantine's probes.
    w1, w2 = fakes("w1"), fakes("w2")
    join(watched, w1, w2)
    w1.slots_held.set()
    calls = w1.health_calls
    wait_for(lambda: w1.health_calls >= calls + 5)  # five rounds of the idle watch, all refused
    assert states(watched) == {"w1": IDLE, "w2": IDLE} and watched.quarantines == 0
    w2.frozen.set()  # a stopped worker is still found
    wait_for(lambda: states(watched)["w2"] == UNHEALTHY, timeout=IDLE_WATCH.idle_check_timeout + 2)
    w2.slots_held.set()
    w2.frozen.clear()  # back, its Check slots held: re-admitted on its Info
    wait_for(lambda: states(watched)["w2"] == IDLE)
    assert states(watched)["w1"] == IDLE


def test_a_worker_drawn_while_its_idle_check_is_in_flight_is_not_quarantined_by_it(factory, fakes):
    # A Check long enough to outlast the draw and the release, however loaded the machine.
    policy = HealthPolicy(probe_timeout=0.5, idle_check=0.05, idle_check_timeout=3.0)
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=policy)
    try:
        w1, w2 = fakes("w1"), fakes("w2")
        join(pool, w1, w2)
        w1.frozen.set()
        calls = w1.health_calls
        wait_for(lambda: w1.health_calls > calls)  # a Check is in flight, held by the stopped worker
        with w1._lock:
            w1.health_script = [False]  # ... and it will answer NOT_SERVING
        pool.release(pool.acquire("sdxl", 2, False, "r1", timeout=1))  # a request ran meanwhile
        assert states(pool) == {"w1": IDLE, "w2": IDLE}
        w1.frozen.clear()  # the old Check answers now, about the worker before its request
        wait_for(lambda: w1.health_calls >= calls + 2)  # the watch went on to its next round
        assert states(pool)["w1"] == IDLE and pool.quarantines == 0
    finally:
        pool.close()


def test_no_idle_watch_when_it_is_off(factory, fakes):
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=HealthPolicy(idle_check=0))
    try:
        w1 = fakes("w1")
        join(pool, w1)
        time.sleep(0.2)
        assert w1.health_calls == 0 and states(pool) == {"w1": IDLE}
    finally:
        pool.close()


# --- honest release: an aborted worker is free once it says it stopped --------------------------
def test_an_aborted_worker_is_idle_only_once_it_confirms_the_abort(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w1.active_request_id = "r1"  # still finishing the aborted step
    lease.release(aborted=True)
    wait_for(lambda: states(pool)["w2"] == IDLE)  # w2 said it stopped
    assert states(pool)["w1"] == ABORTING
    entry = next(e for e in pool.snapshot() if e.worker_id == "w1")
    assert entry.request_id == "r1"  # ClusterStatus shows what it still runs
    waiter = enqueue(pool, "r2")  # a pair: it must not get w1 yet
    assert not waiter.done.wait(0.3)
    w1.active_request_id = ""
    assert waiter.done.wait(WAIT) and waiter.error is None
    assert sorted(ids(waiter.got)) == ["w1", "w2"]


def test_an_aborted_worker_already_on_its_next_request_counts_as_confirmed(pool, fakes):
    w1 = fakes("w1")
    join(pool, w1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    w1.active_request_id = "r0"  # another id than the aborted one: r1 is over on the worker
    lease.release(aborted=True)
    wait_for(lambda: states(pool)["w1"] == IDLE)


def test_an_aborted_worker_that_never_confirms_is_quarantined_after_the_bounded_wait(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w1.active_request_id = "r1"  # stuck in the aborted step
    w2.frozen.set()  # stopped: answers nothing
    start = time.monotonic()
    lease.release(aborted=True)
    wait_for(lambda: states(pool) == {"w1": UNHEALTHY, "w2": UNHEALTHY})
    assert time.monotonic() - start >= HEALTH.abort_confirm
    assert pool.quarantines == 2
    stays(pool, "w1", UNHEALTHY, w1)  # still stuck: still quarantined
    w1.active_request_id = ""
    w2.frozen.clear()
    wait_for(lambda: states(pool) == {"w1": IDLE, "w2": IDLE})


def test_a_finished_request_frees_its_workers_at_once(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w1.frozen.set()  # not asked: a finished session needs no confirmation
    lease.release()
    assert states(pool) == {"w1": IDLE, "w2": IDLE}
    w1.frozen.clear()


def test_replace_failed_releases_the_workers_it_drops_as_aborted(pool, fakes):
    w1, w2, w3 = fakes("w1"), fakes("w2"), fakes("w3")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w2.active_request_id = "r1"
    with pytest.raises(Unavailable):  # w2 is neither failed nor kept: it may still run its step ...
        lease.replace_failed("w1", keep=set(), want=1)
    # ... and is not taken again until it says it stopped.
    assert states(pool)["w1"] == UNHEALTHY
    assert states(pool)["w2"] == ABORTING and lease.entries == []
    join(pool, w3)
    assert ids(pool.take_idle("sdxl", 2, "r2")) == ["w3"]
    w2.active_request_id = ""
    wait_for(lambda: states(pool)["w2"] == IDLE)


def test_an_elastic_give_back_frees_the_worker_once_its_session_ended(pool, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    w2.active_request_id = "r1"  # the driver aborts its session right after the shrink
    lease.give_back("w2")
    assert ids(lease.entries) == ["w1"] and states(pool)["w2"] == ABORTING
    w2.active_request_id = ""
    wait_for(lambda: states(pool)["w2"] == IDLE)


def test_close_ends_every_probe(factory, fakes):
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=HEALTH)
    w1, w2, w3 = fakes("w1"), fakes("w2"), fakes("w3", version=1)
    join(pool, w1, w2)
    pool.worker_ready("w3", w3.address)
    wait_for(lambda: states(pool).get("w3") == INCOMPATIBLE)  # re-read now and then
    w1.frozen.set()  # its probe is stuck in a call
    pair = pool.acquire("sdxl", 2, False, "r1", timeout=1)
    w2.active_request_id = "r1"
    pool.release([pair[0]], failed=True)
    pool.release([pair[1]], aborted=True)
    wait_for(lambda: w1.health_calls > 0)
    pool.close()  # returns once no probe is left calling a worker
    assert not [t for t in threading.enumerate() if t.name.startswith("probe-")]
    w1.frozen.clear()


# --- discovery flaps ----------------------------------------------------------------------------
def test_a_readiness_flap_while_busy_does_not_book_the_worker_twice(pool, factory, fakes):
    w1, w2 = fakes("w1"), fakes("w2")
    join(pool, w1, w2)
    pair = pool.acquire("sdxl", 2, False, "r1", timeout=1)
    pool.worker_gone("w1")
    assert states(pool)["w1"] == DRAINING
    pool.worker_ready("w1", w1.address)  # ready again, still running r1
    assert factory.dialled == [w1.address, w2.address]  # the same worker, not a new one
    assert len(pool.snapshot()) == 2 and states(pool) == {"w1": BUSY, "w2": BUSY}
    time.sleep(PROBE_INTERVAL * 5)  # no probe may make it idle meanwhile
    with pytest.raises(DeadlineExceeded):
        pool.acquire("sdxl", 1, False, "r2", timeout=0.3)
    assert pool.counts()[BUSY] == 2

    pool.release(pair)  # it stayed in the pool: idle now, not removed
    assert states(pool) == {"w1": IDLE, "w2": IDLE}
    assert sorted(ids(pool.acquire("sdxl", 2, False, "r3", timeout=1))) == ["w1", "w2"]


def test_a_readiness_flap_while_aborting_keeps_waiting_for_the_confirmation(pool, factory, fakes):
    w1 = fakes("w1")
    join(pool, w1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    w1.active_request_id = "r1"
    lease.release(aborted=True)
    pool.worker_gone("w1")
    assert states(pool) == {"w1": DRAINING}
    pool.worker_ready("w1", w1.address)
    assert states(pool) == {"w1": ABORTING} and factory.dialled == [w1.address]
    with pytest.raises(DeadlineExceeded):
        pool.acquire("sdxl", 1, False, "r2", timeout=0.2)
    w1.active_request_id = ""
    wait_for(lambda: states(pool) == {"w1": IDLE})


def test_a_worker_gone_while_aborting_leaves_once_it_confirms(pool, fakes):
    w1 = fakes("w1")
    join(pool, w1)
    lease = pool.lease("sdxl", 1, False, "r1", timeout=1)
    w1.active_request_id = "r1"
    lease.release(aborted=True)
    pool.worker_gone("w1")
    assert states(pool) == {"w1": DRAINING} and pool.demand() == 1
    w1.active_request_id = ""
    wait_for(lambda: states(pool) == {})


# --- one admission queue per model --------------------------------------------------------------
def acquire_in_thread(pool: WorkerPool, model: str, want: int, name: str) -> Waiter:
    waiter = Waiter(pool, name, want=want)
    waiter.run = lambda: _acquire_model(waiter, model)  # the Waiter, for another model
    depth = pool.queue_depth
    waiter.start()
    wait_for(lambda: pool.queue_depth == depth + 1 or waiter.done.is_set())
    return waiter


def _acquire_model(waiter: Waiter, model: str) -> None:
    try:
        waiter.got = waiter.pool.acquire(model, waiter.want, False, waiter.request_id, waiter.timeout)
    except Exception as exc:  # handed to the test
        waiter.error = exc
    finally:
        waiter.done.set()


def test_a_blocked_model_does_not_hold_up_another_models_requests(pool, fakes):
    join(pool, fakes("w1", "sdxl"), fakes("w2", "sdxl"), fakes("w3", "sd3"))
    held = pool.acquire("sdxl", 2, False, "a0", timeout=1)
    head = enqueue(pool, "a1")  # sdxl's head waits for a pair
    assert pool.view("sdxl").waiting == 1 and pool.view("sd3").waiting == 0

    start = time.monotonic()
    got = pool.acquire("sd3", 1, False, "b1", timeout=2)  # not behind sdxl's head
    assert ids(got) == ["w3"] and time.monotonic() - start < 1
    assert not head.done.is_set()
    assert pool.demand() == 2 + 2 + 1  # busy (sdxl pair, sd3) plus the pair sdxl's head wants

    other = acquire_in_thread(pool, "sd3", 1, "b2")  # sd3's own queue: b2 waits for w3
    assert pool.view("sd3") == pool.view("sd3").__class__(idle=0, waiting=1, waiting_takes_one=True)
    assert pool.queue_depth == 2
    pool.release(got)
    assert other.done.wait(WAIT) and ids(other.got) == ["w3"]
    assert not head.done.is_set()  # sdxl's head still waits for its pair
    pool.release(held)
    assert head.done.wait(WAIT) and sorted(ids(head.got)) == ["w1", "w2"]


def test_the_queue_capacity_bounds_all_models_together(pool, fakes):
    join(pool, fakes("w1", "sdxl"), fakes("w3", "sd3"))
    pool.acquire("sdxl", 1, False, "a0", timeout=1)
    pool.acquire("sd3", 1, False, "b0", timeout=1)
    waiters = [enqueue(pool, f"a{n}", want=1) for n in range(1, 4)]
    waiters.append(acquire_in_thread(pool, "sd3", 1, "b1"))
    assert pool.queue_depth == 4 == pool.queue_capacity
    with pytest.raises(QueueFull):
        pool.acquire("sd3", 1, False, "b2", timeout=1)
    pool.close()
    for w in waiters:
        assert w.done.wait(WAIT) and isinstance(w.error, Unavailable)
    assert pool.queue_depth == 0


# --- pairing checks compatibility ---------------------------------------------------------------
def test_a_worker_of_another_protocol_version_is_refused_at_join(pool, fakes, caplog):
    w1, w2, old = fakes("w1"), fakes("w2"), fakes("w3", version=WORKER_PROTOCOL_VERSION - 1)
    with caplog.at_level("ERROR", logger="coordinator.pool"):
        for w in (w1, w2, old):
            pool.worker_ready(w.worker_id, w.address)
        wait_for(lambda: states(pool) == {"w1": IDLE, "w2": IDLE, "w3": INCOMPATIBLE})
    assert "w3 refused" in caplog.text and f"version {WORKER_PROTOCOL_VERSION - 1}" in caplog.text
    assert pool.counts()[INCOMPATIBLE] == 1
    pair = pool.acquire("sdxl", 2, False, "r1", timeout=1)
    assert sorted(ids(pair)) == ["w1", "w2"]
    with pytest.raises(DeadlineExceeded):  # never w3
        pool.acquire("sdxl", 1, False, "r2", timeout=0.3)
    pool.release(pair, failed=True)
    assert pool.take_idle("sdxl", 1, "r3") == []  # not as a replacement either


def test_an_incompatible_worker_is_admitted_once_it_is_updated(factory, fakes):
    policy = HealthPolicy(probe_timeout=0.5, incompatible_recheck=0.05)
    pool = WorkerPool(factory, probe_interval=PROBE_INTERVAL, health=policy)
    try:
        w1 = fakes("w1", version=WORKER_PROTOCOL_VERSION + 1)
        pool.worker_ready("w1", w1.address)
        wait_for(lambda: states(pool) == {"w1": INCOMPATIBLE})
        w1.version = WORKER_PROTOCOL_VERSION  # restarted in place by a rolling update
        wait_for(lambda: states(pool) == {"w1": IDLE})
    finally:
        pool.close()


def test_a_model_only_incompatible_workers_serve_is_unavailable(pool, fakes):
    join(pool, fakes("w1"))
    pool.worker_ready("w2", fakes("w2", "sd3", version=99).address)
    wait_for(lambda: states(pool).get("w2") == INCOMPATIBLE)
    with pytest.raises(ModelNotFound):
        pool.model_info("sd3")
    assert pool.model_info("").model_name == "sdxl"  # the only model served
    with pytest.raises(Unavailable):
        pool.acquire("sd3", 1, False, "r1", timeout=1)


@pytest.mark.parametrize(
    "differs",
    [{"digest": "d2"}, {"dtype": "float16"}, {"device": "cpu"}],
    ids=["weights", "dtype", "device-kind"],
)
def test_workers_that_disagree_are_never_paired(pool, fakes, differs, caplog):
    w1, odd = fakes("w1", device="cuda:0"), fakes("w2", **{"device": "cuda:0", **differs})
    join(pool, w1)
    with caplog.at_level("WARNING", logger="coordinator.pool"):
        join(pool, odd)
    assert "w2 differs from the other workers of sdxl" in caplog.text
    with pytest.raises(Unavailable, match="2 workers needed"):
        pool.acquire("sdxl", 2, False, "r1", timeout=1)
    lone = pool.acquire("sdxl", 2, True, "r2", timeout=1)  # AUTO: one, not a mismatched pair
    assert len(lone) == 1
    pool.release(lone)

    w3 = fakes("w3", device="cuda:1")  # another GPU, the same kind: compatible with w1
    join(pool, w3)
    assert sorted(ids(pool.acquire("sdxl", 2, False, "r3", timeout=1))) == ["w1", "w3"]


def test_a_replacement_or_a_grown_worker_is_compatible_with_the_one_kept(pool, fakes):
    join(pool, fakes("w1", digest="a"), fakes("w2", digest="a"), fakes("w3", digest="b"))
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    assert sorted(ids(lease.entries)) == ["w1", "w2"]
    join(pool, fakes("w4", digest="a"))
    # w3 sorts first but holds other weights: w4 replaces w2 beside w1.
    assert ids(lease.replace_failed("w2", keep={"w1"}, want=2)) == ["w1", "w4"]

    single = pool.lease("sdxl", 1, False, "r2", timeout=1)
    assert ids(single.entries) == ["w3"]
    join(pool, fakes("w5", digest="a"))
    assert single.take_one() is None  # w5 is idle, but not w3's kind
    lease.give_back("w4")
    wait_for(lambda: states(pool)["w4"] == IDLE)  # once it confirmed its session ended
    assert single.take_one() is None


# --- draining -----------------------------------------------------------------------------------
def test_after_close_a_queued_request_starts_nothing(pool, fakes):
    join(pool, fakes("w1"), fakes("w2"), fakes("w3", "sd3"))
    held = pool.acquire("sdxl", 2, False, "r0", timeout=1)
    waiters = [enqueue(pool, "r1"), enqueue(pool, "r2", want=1)]
    pool.close()
    pool.release(held)  # workers free up at the moment the drain starts: nobody queued takes them
    for w in waiters:
        assert w.done.wait(WAIT) and isinstance(w.error, Unavailable) and w.got is None
    assert states(pool) == {"w1": IDLE, "w2": IDLE, "w3": IDLE}
    with pytest.raises(Unavailable, match="draining"):
        pool.acquire("sd3", 1, False, "r3", timeout=1)

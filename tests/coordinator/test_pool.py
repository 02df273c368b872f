"""The worker pool and pair allocator (coordinator.pool), against fake workers: real gRPC servers
on 127.0.0.1 implementing WorkerControlService, dialled through the pool's channel factory."""

import threading
import time
from concurrent import futures

import grpc
import pytest

from coordinator.pool import BUSY, DRAINING, IDLE, JOINING, UNHEALTHY, WorkerPool
from hybridiff.errors import DeadlineExceeded, InvalidArgument, ModelNotFound, QueueFull, Unavailable
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

WAIT = 5.0  # the most any condition below may take to come true
PROBE_INTERVAL = 0.02


class FakeWorker(worker_pb2_grpc.WorkerControlServiceServicer):
    """A worker that answers Info (or refuses while ``healthy`` is clear, as one still loading its
    model or just failed) and MeasureSplit with a fixed cut, counting the calls."""

    def __init__(self, worker_id: str, model: str, cut: int = 3, healthy: bool = True) -> None:
        self.worker_id, self.model, self.cut = worker_id, model, cut
        self.healthy = threading.Event()
        if healthy:
            self.healthy.set()
        self.info_calls = 0
        self.split_calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        worker_pb2_grpc.add_WorkerControlServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def Info(self, request, context):
        with self._lock:
            self.info_calls += 1
        if not self.healthy.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} is loading")
        return worker_pb2.InfoResponse(
            worker_id=self.worker_id,
            model_name=self.model,
            arch="sdxl",
            data_address=f"tcp://127.0.0.1:{6000 + int(self.worker_id[1:])}",
            limits=worker_pb2.SizeLimits(
                multiple=8, min_side=64, max_side=1024, default_side=512, max_images=4
            ),
            default_steps=20,
            device="cpu",
        )

    def MeasureSplit(self, request, context):
        with self._lock:
            self.split_calls.append((request.width, request.height))
        return worker_pb2.MeasureSplitResponse(cut=self.cut, stage1_seconds=0.5, stage2_seconds=0.5)


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
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


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
    made = WorkerPool(factory, queue_capacity=4, probe_interval=PROBE_INTERVAL)
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
    assert pool.counts() == {JOINING: 0, IDLE: 1, BUSY: 0, DRAINING: 0, UNHEALTHY: 0}


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
    w1.healthy.clear()  # it crashed: Info refuses
    calls = w1.info_calls
    pool.release([e for e in pair if e.worker_id == "w1"], failed=True)
    pool.release([e for e in pair if e.worker_id == "w2"])
    assert states(pool) == {"w1": UNHEALTHY, "w2": IDLE}

    wait_for(lambda: w1.info_calls >= calls + 2)  # probed
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


def test_lease_split_cut_asks_the_worker(pool, fakes):
    w1, w2 = fakes("w1", cut=5), fakes("w2", cut=5)
    join(pool, w1, w2)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=1)
    assert lease.split_cut(height=768, width=1024, timeout=5) == 5
    first = {"w1": w1, "w2": w2}[lease.entries[0].worker_id]
    assert first.split_calls == [(1024, 768)]  # width, height as the worker expects them
    assert w1.split_calls + w2.split_calls == [(1024, 768)]  # one worker measures, once

"""``WorkerPool.shutdown`` (the end of a coordinator's drain): every worker channel is closed and
every probe joined within the timeout, also a probe stuck in a call to a worker that answers
nothing (a stopped process), whose call would otherwise run to its deadline."""

import threading
import time

import grpc
import pytest
from cluster_helpers import wait_until
from fake_worker import FakeWorker

from coordinator.pool import HealthPolicy, WorkerPool
from hybridiff.errors import Unavailable
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

# A probe's call to a stopped worker would wait this long: far more than any shutdown may take.
SLOW_PROBE = HealthPolicy(probe_timeout=60.0, readmit_probes=1, quarantine_base=0.1, quarantine_max=0.1)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    wait_until(predicate, timeout, poll=0.005)


@pytest.fixture
def workers():
    made = [FakeWorker(f"w{i}") for i in range(3)]
    yield made
    for w in made:
        w.stop()


def _probes() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("probe-") and t.is_alive()]


def test_shutdown_closes_every_channel_and_ends_a_probe_stuck_in_a_call(workers):
    channels: list[grpc.Channel] = []

    def factory(address: str) -> grpc.Channel:
        channels.append(grpc.insecure_channel(address))
        return channels[-1]

    pool = WorkerPool(factory, probe_interval=0.02, health=SLOW_PROBE)
    w0, w1, w2 = workers
    for w in workers:
        pool.worker_ready(w.worker_id, w.address)
    _wait_for(lambda: pool.counts()["idle"] == 3)
    lease = pool.lease("sdxl", 2, False, "r1", timeout=5)  # w0 and w1
    pool.worker_ready("w1", w2.address)  # w1 replaced while busy: its lease still holds the old one
    w0.frozen.set()
    before = len(w0.calls)
    w0_entry = next(e for e in lease.entries if e.worker_id == "w0")
    pool.release([w0_entry], failed=True)  # quarantined: its probe calls w0 and hangs there
    _wait_for(lambda: len(w0.calls) > before)

    start = time.monotonic()
    assert pool.shutdown(timeout=5.0) is True
    assert time.monotonic() - start < 5.0  # not the stuck call's 60 s
    assert _probes() == []
    for channel in channels:  # the replaced busy worker's channel too
        with pytest.raises(ValueError):  # grpc: "Cannot invoke RPC on closed channel!"
            worker_pb2_grpc.WorkerControlServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=1)
    with pytest.raises(Unavailable):  # and the pool is closed, as by close()
        pool.acquire("sdxl", 1, True, "r2", timeout=1)


def test_shutdown_reports_a_probe_it_could_not_end_in_time(workers, monkeypatch):
    pool = WorkerPool(grpc.insecure_channel, probe_interval=0.02, health=SLOW_PROBE)
    pool.worker_ready("w0", workers[0].address)
    _wait_for(lambda: pool.counts()["idle"] == 1)
    stuck = threading.Event()
    # A probe that ignores its closed channel (as a call into a wedged library would).
    monkeypatch.setattr(pool, "_run_probe", lambda probe, *args: stuck.wait(30))
    with pool._cond:
        pool._spawn(pool.snapshot()[0], lambda *a: None)
    start = time.monotonic()
    assert pool.shutdown(timeout=0.3) is False
    assert time.monotonic() - start < 2.0  # bounded by the timeout, not by the probe
    stuck.set()

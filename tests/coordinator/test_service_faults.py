"""Failures the service maps (coordinator.service): a worker's ``MeasureSplit`` that
fails, refuses or hangs. The client gets a proper status (never UNKNOWN with internal text), the
request is counted under that status, the workers are released as failed (the pool probes them),
and a cancel or a deadline is noticed while the call is in flight.

A real coordinator (in process, real gRPC) over two fake workers: real gRPC servers that answer
``Info`` and health like a worker, and fail ``MeasureSplit`` as told."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest
from cluster_helpers import poll_until
from fake_worker import FakeWorker

from hybridiff.errors import status_details
from hybridiff.internal.v1 import worker_pb2
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc


def _fake(name: str, measure: str) -> FakeWorker:
    """A worker of model "fake" that ``MeasureSplit``s as told."""
    return FakeWorker(
        name,
        "fake",
        measure=measure,
        limits=worker_pb2.SizeLimits(multiple=8, min_side=64, max_side=512, default_side=64, max_images=1),
        default_steps=4,
        hybrid_defaults=pb.HybridParams(l_slope=10, eps_slope=0.1, k=2, tau_cap=3),
        weights_digest="same-weights",
    )


@pytest.fixture
def cluster(request):
    from coordinator.discovery import StaticDiscovery
    from coordinator.server import Coordinator

    fakes = [_fake(f"fake{i}", request.param) for i in range(2)]
    coord = Coordinator(
        StaticDiscovery([f.address for f in fakes]), host="127.0.0.1", port=0, metrics_port=None, grace=0
    ).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{coord.port}")
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
    deadline = time.monotonic() + 30
    while coord.pool.counts()["idle"] < 2:
        assert time.monotonic() < deadline, coord.pool.counts()
        time.sleep(0.05)
    yield coord, stub, fakes
    channel.close()
    coord.drain_and_stop()
    for f in fakes:
        f.stop()


def _counted(coord, code: str) -> float:
    return coord.metrics.registry.get_sample_value(
        "hybridiff_requests_total", {"mode": "hybrid", "code": code, "api": "grpc"}
    )


def _hybrid() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="a red circle", mode=pb.MODE_HYBRID, num_inference_steps=4)


def _call(stub, method: str, timeout: float = 30):
    if method == "Generate":
        return stub.Generate(_hybrid(), timeout=timeout)
    return list(stub.GenerateStream(pb.GenerateStreamRequest(request=_hybrid()), timeout=timeout))


@pytest.mark.parametrize("cluster", ["crash", "refuse"], indirect=True)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_measure_split_failure_is_internal_counted_and_probed(cluster, method):
    coord, stub, fakes = cluster
    with pytest.raises(grpc.RpcError) as err:
        _call(stub, method)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert status_details(err.value)["ErrorInfo"].reason == "WORKER_FAILED"
    measured = next(f for f in fakes if f.measured_at() is not None)
    assert measured.address in err.value.details() and "MeasureSplit" in err.value.details()
    assert "secret internal detail" not in err.value.details()
    assert "Exception calling application" not in err.value.details()
    assert "Traceback" not in err.value.details()
    assert poll_until(lambda: _counted(coord, "INTERNAL") == 1, 5, poll=0.02)
    assert _counted(coord, "OK") is None and _counted(coord, "UNKNOWN") is None
    # released as failed: the pool probes both workers again before they serve
    failed_at = measured.measured_at()
    assert poll_until(lambda: all(f.probed_after(failed_at) for f in fakes), 10, poll=0.02)


@pytest.mark.parametrize("cluster", ["hang"], indirect=True)
def test_a_cancel_during_measure_split_is_noticed_at_once(cluster):
    coord, stub, fakes = cluster
    call = stub.GenerateStream(pb.GenerateStreamRequest(request=_hybrid()), timeout=60)  # sent at once
    assert poll_until(lambda: any(f.measured_at() for f in fakes), 10, poll=0.02)
    call.cancel()
    cancelled_at = time.monotonic()
    assert poll_until(lambda: _counted(coord, "CANCELLED") == 1, 2, poll=0.02)
    measured = next(f for f in fakes if f.measured_at() is not None)
    assert measured.cancelled.wait(2)  # the worker's call was cancelled too
    assert time.monotonic() - cancelled_at < 3


@pytest.mark.parametrize("cluster", ["hang"], indirect=True)
def test_a_deadline_during_measure_split_is_noticed_at_once(cluster):
    coord, stub, fakes = cluster
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_hybrid(), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert poll_until(lambda: _counted(coord, "DEADLINE_EXCEEDED") == 1, 2, poll=0.02)
    measured = next(f for f in fakes if f.measured_at() is not None)
    assert measured.cancelled.wait(2)


@pytest.mark.parametrize("cluster", ["cut"], indirect=True)
def test_every_pair_of_a_model_splits_at_the_first_measured_cut(cluster):
    """Identical requests give identical images whichever pair runs them: the cut is measured
    once per model and size, not once per pair (two workers' timings pick different cuts)."""
    coord, _, fakes = cluster
    spec = SimpleNamespace(model="fake", height=64, width=128)
    cuts = []
    for first in (0, 1):
        lease = coord.pool.lease("fake", 2, False, f"r{first}", timeout=10)
        lease.entries.sort(key=lambda e: e.info.worker_id != f"fake{first}")  # fake<first> measures
        cuts.append(coord.runner._split_cut(lease, spec, SimpleNamespace(check_alive=lambda: None)))
        lease.release()
    assert cuts == [2, 2]
    assert sum(name == "MeasureSplit" for f in fakes for name, _ in f.calls) == 1
    assert [size for f in fakes for size in f.sizes] == [(128, 64)]  # width, height as the worker expects

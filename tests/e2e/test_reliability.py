"""Reliability (docs/design.md section 5) through a running cluster: bad input never crashes or leaks a
trace, deadlines and cancellation free the pair, a full queue answers at once."""

from __future__ import annotations

import math
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cluster_helpers import make_input, proc_status_bytes, send
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridiff.client import DiffusionClient
from hybridiff.errors import HybridiffError
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_launch.local_cluster import LocalCluster

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _req(**fields) -> pb.GenerateRequest:
    hybrid = fields.pop("hybrid", {})
    req = pb.GenerateRequest(prompt=fields.pop("prompt", "a red circle"), **fields)
    for k, v in hybrid.items():
        setattr(req.hybrid, k, v)
    return req


BAD_REQUESTS = [
    (dict(prompt=""), INVALID, "prompt"),
    (dict(prompt="   "), INVALID, "prompt"),
    (dict(prompt="x" * 5000), INVALID, "prompt"),
    (dict(negative_prompt="x" * 5000), INVALID, "negative_prompt"),
    (dict(width=60), INVALID, "width"),
    (dict(width=0), INVALID, "width"),
    (dict(width=-8), INVALID, "width"),
    (dict(width=4096), INVALID, "width"),
    (dict(height=7), INVALID, "height"),
    (dict(height=8), INVALID, "height"),
    (dict(num_inference_steps=0), INVALID, "num_inference_steps"),
    (dict(num_inference_steps=-1), INVALID, "num_inference_steps"),
    (dict(num_inference_steps=100_000), INVALID, "num_inference_steps"),
    (dict(guidance_scale=-1.0), INVALID, "guidance_scale"),
    (dict(guidance_scale=math.nan), INVALID, "guidance_scale"),
    (dict(guidance_scale=math.inf), INVALID, "guidance_scale"),
    (dict(guidance_scale=1000.0), INVALID, "guidance_scale"),
    (dict(hybrid={"l_slope": 0}), INVALID, "hybrid.l_slope"),
    (dict(hybrid={"l_slope": -5}), INVALID, "hybrid.l_slope"),
    (dict(hybrid={"eps_slope": 0.0}), INVALID, "hybrid.eps_slope"),
    (dict(hybrid={"eps_slope": math.nan}), INVALID, "hybrid.eps_slope"),
    (dict(hybrid={"eps_slope": 2.0}), INVALID, "hybrid.eps_slope"),
    (dict(hybrid={"k": -1}), INVALID, "hybrid.k"),
    (dict(hybrid={"k": 5000}), INVALID, "hybrid.k"),
    (dict(hybrid={"tau_cap": 0}), INVALID, "hybrid.tau_cap"),
    (dict(mode=99), INVALID, "mode"),
    (dict(window_guidance=42), INVALID, "window_guidance"),
    (dict(output_format=7), INVALID, "output_format"),
    (dict(request_id="bad\x00id"), INVALID, "request_id"),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
]


@pytest.fixture(scope="module")
def stub(sdxl_cluster):
    channel = grpc.insecure_channel(sdxl_cluster.address)
    yield diffusion_pb2_grpc.DiffusionServiceStub(channel)
    channel.close()


def _all_idle(stub, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        if all(w.state == "idle" for w in status.workers) and status.queue_depth == 0:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "fields,code,field", BAD_REQUESTS, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD_REQUESTS)]
)
def test_bad_request_table(stub, fields, code, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_req(**fields), timeout=30)
    assert err.value.code() == code
    assert field in err.value.details() and "Traceback" not in err.value.details()


def test_the_table_is_big_enough():
    assert len(BAD_REQUESTS) >= 25


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(max_size=50),
    negative=st.text(max_size=20),
    width=st.one_of(st.none(), st.integers(-100, 300)),
    height=st.one_of(st.none(), st.integers(-100, 300)),
    steps=st.one_of(st.none(), st.integers(-3, 3)),
    guidance=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    mode=st.integers(-2, 8),
    seed=st.integers(0, 2**64 - 1),
    l_slope=st.one_of(st.none(), st.integers(-10, 2000)),
    eps=st.one_of(st.none(), st.floats()),
    k=st.one_of(st.none(), st.integers(-10, 2000)),
    tau_cap=st.one_of(st.none(), st.integers(-10, 2000)),
)
def test_random_requests_always_get_a_proper_answer(
    stub, prompt, negative, width, height, steps, guidance, mode, seed, l_slope, eps, k, tau_cap
):
    fields = dict(prompt=prompt, negative_prompt=negative, mode=mode, seed=seed)
    for name, value in (
        ("width", width),
        ("height", height),
        ("num_inference_steps", steps),
        ("guidance_scale", guidance),
    ):
        if value is not None:
            fields[name] = value
    hybrid = {
        k_: v
        for k_, v in (("l_slope", l_slope), ("eps_slope", eps), ("k", k), ("tau_cap", tau_cap))
        if v is not None
    }
    try:
        resp = stub.Generate(_req(hybrid=hybrid, **fields), timeout=60)
        assert resp.images[0].data
    except grpc.RpcError as err:
        assert err.code() in (INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            err.details()
        )
        assert "Traceback" not in (err.details() or "")


def test_still_serving_after_the_fuzzing(stub):
    assert stub.Generate(_req(num_inference_steps=3), timeout=60).images[0].data.startswith(b"\x89PNG")
    assert _all_idle(stub, 5)


def test_deadline_stops_the_work_and_frees_the_pair(stub, sdxl_cluster):
    step_time = _step_time(stub)
    before = _requests(sdxl_cluster, "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_req(num_inference_steps=400, mode=pb.MODE_HYBRID), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_counted_once_then_freed(stub, sdxl_cluster, "DEADLINE_EXCEEDED", before, step_time)


def test_client_cancel_stops_the_work_and_frees_the_pair(stub, sdxl_cluster):
    step_time = _step_time(stub)
    before = _requests(sdxl_cluster, "CANCELLED")
    call = stub.GenerateStream(
        pb.GenerateStreamRequest(request=_req(num_inference_steps=400, mode=pb.MODE_CFG_PARALLEL)),
        timeout=120,
    )
    seen = 0
    for event in call:
        seen += event.HasField("progress")
        if seen == 3:
            call.cancel()
            break
    _assert_counted_once_then_freed(stub, sdxl_cluster, "CANCELLED", before, step_time)


def _assert_counted_once_then_freed(stub, cluster, code: str, before: float, step_time: float) -> None:
    """The request ended with ``code``: counted exactly once, and its pair idle again soon after.
    The outcome is counted as soon as the coordinator notices the end (within one alive-check
    slice), before it releases the workers (coordinator.service._Outcome): so the pair being idle
    again implies the count, and the bound on the count only waits for the coordinator to notice."""
    deadline = time.monotonic() + 30  # a loaded machine: the condition, not the bound, ends the wait
    while _requests(cluster, code) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _requests(cluster, code) == before + 1
    assert _all_idle(stub, within=max(1.0, 5 * step_time))
    assert _requests(cluster, code) == before + 1  # once, however the request unwound


def _requests(cluster, code: str) -> float:
    """hybridiff_requests_total with ``code``, all modes together."""
    total = 0.0
    for line in _metrics(cluster).splitlines():
        if line.startswith("hybridiff_requests_total{") and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _step_time(stub) -> float:
    resp = stub.Generate(_req(num_inference_steps=4, mode=pb.MODE_CFG_PARALLEL), timeout=60)
    return max(s.wall_seconds for s in resp.stats.steps)


def _metrics(cluster) -> str:
    return (
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read().decode()
    )


@pytest.mark.slow  # a load on a small queue (~12 s)
def test_load_small_queue_every_request_succeeds_or_is_refused(model_dirs, tmp_path):
    # Two workers for eight callers: the queue of two overflows (four workers running pairs side by
    # side: test_cluster.py, test_four_workers_eight_concurrent_mixed_requests).
    with LocalCluster(model_dirs["sdxl"], workers=2, queue_size=2, log_dir=tmp_path / "logs") as cluster:
        clients = [DiffusionClient(cluster.address) for _ in range(8)]
        modes = ["hybrid", "cfg-parallel", "single", "auto"]

        def one(i: int) -> str:
            raw = make_input(prompt="a star", num_steps=6, seed=i, mode=modes[i % 4], tau_cap=3, k=2)
            try:
                send(clients[i % 8], raw, timeout=120)
                return "OK"
            except HybridiffError as err:
                return err.code.name

        rss = []
        for _ in range(2):
            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(one, range(24)))
            assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
            assert outcomes.count("OK") >= 3  # at least the first to run and the two it queued
            with grpc.insecure_channel(cluster.address) as ch:
                assert _all_idle(diffusion_pb2_grpc.DiffusionServiceStub(ch), 10)
            rss.append(sum(proc_status_bytes(p.pid, "VmRSS") for p in cluster.procs) // 1024)
        # memory does not grow across rounds (allow 15% for allocator noise)
        assert rss[1] <= rss[0] * 1.15, rss
        for c in clients:
            c.close()

"""The coordinator under faults it must notice by itself, through real processes:
a cancel or a deadline while a step hangs (a worker SIGSTOPped), a partition between the two
workers' data planes (a TCP forwarder blackholed), SIGTERM with requests queued, and a clean
exit after a drain, 20 runs out of 20."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from cluster_helpers import (
    TcpForwarder,
    await_ready_file,
    free_port,
    make_input,
    poll_until,
    send,
    worker_states,
)

from coordinator.driver import StepWaits
from hybridiff.client import DiffusionClient
from hybridiff.errors import HybridiffError
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_launch.local_cluster import LocalCluster


def _metric(cluster, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read()
    found = re.findall(rf'hybridiff_requests_total{{[^}}]*code="{code}"[^}}]*}} ([0-9.e+]+)', text.decode())
    return sum(float(v) for v in found)


def _long_request(steps: int = 400) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        request=pb.GenerateRequest(prompt="a slow star", num_inference_steps=steps, mode=pb.MODE_CFG_PARALLEL)
    )


@pytest.fixture(scope="module")
def pair(model_dirs, tmp_path_factory):
    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path_factory.mktemp("logs")) as cluster:
        client = DiffusionClient(cluster.address)
        send(client, make_input(prompt="warm", num_steps=4, mode="cfg-parallel"), timeout=120)  # step costs
        client.close()
        yield cluster


@pytest.fixture
def stub(pair):
    with grpc.insecure_channel(pair.address) as channel:
        yield diffusion_pb2_grpc.DiffusionServiceStub(channel)


def _stopped_mid_step(cluster, call):
    """Read ``call`` until its first progress event, then SIGSTOP worker 1: the step in flight
    can never complete. The stopped process."""
    for event in call:
        if event.HasField("progress"):
            break
    proc = cluster.procs[1]
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def _resume(cluster, proc) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    # the pool probes the stopped worker back in (it quarantined it: it never confirmed the abort)
    assert poll_until(
        lambda: set(worker_states(cluster, timeout=5).values()) == {"idle"}, within=120, poll=0.2
    ), worker_states(cluster, timeout=5)


@pytest.mark.slow  # a hung step and a bounded abort wait (~25 s)
def test_a_cancel_while_a_step_hangs_is_noticed_at_once_and_the_pair_is_not_handed_on(pair, stub):
    before = _metric(pair, "CANCELLED")
    call = stub.GenerateStream(_long_request(), timeout=120)
    proc = _stopped_mid_step(pair, call)
    try:
        time.sleep(0.5)  # the driver is waiting in the step that cannot complete
        call.cancel()
        # Noticed while waiting: not when the live worker's peer wait (5 s at least) or the
        # channel's keepalive (5-10 s) ends the step.
        assert poll_until(lambda: _metric(pair, "CANCELLED") > before, within=2.0)
        live, stopped = pair.worker_addresses
        assert poll_until(lambda: worker_states(pair, timeout=5)[live] == "idle", within=3.0), worker_states(
            pair, timeout=5
        )
        # The stopped worker cannot confirm the abort: it is handed to no request meanwhile, so
        # the next one runs on the live worker and is not held up.
        assert worker_states(pair, timeout=5)[stopped] != "idle"
        client = DiffusionClient(pair.address)
        try:
            resp = send(client, make_input(prompt="next", num_steps=3, mode="single"), timeout=30)
        finally:
            client.close()
        assert resp.stats.workers == [live]
        # It never confirms the abort: after the pool's bounded wait for it, it is
        # quarantined, never freed.
        seen = []
        assert poll_until(
            lambda: seen.append(worker_states(pair, timeout=5)[stopped]) or seen[-1] == "unhealthy", within=30
        )
        assert "idle" not in seen, seen
    finally:
        _resume(pair, proc)


def test_a_deadline_while_a_step_hangs_is_noticed_at_once(pair, stub):
    for timeout in (2.5, 5.0, 10.0):  # a loaded machine may start the steps late: a longer deadline
        before = _metric(pair, "DEADLINE_EXCEEDED")
        start = time.monotonic()
        call = stub.GenerateStream(_long_request(), timeout=timeout)
        proc = _stopped_mid_step(pair, call)
        try:
            if time.monotonic() - start > timeout - 0.5:
                continue  # the deadline would pass before the step hangs: not this test's case
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Noticed at the deadline: not when the live worker's peer wait (5 s at least) or the
            # channel's keepalive (5-10 s) ends the step.
            assert poll_until(lambda: _metric(pair, "DEADLINE_EXCEEDED") > before, within=1.5)
            return
        finally:
            _resume(pair, proc)
    pytest.fail("the request never ran a step well before its deadline")


@pytest.mark.slow  # a partition and its peer timeouts (~16 s)
def test_a_partition_between_the_workers_resumes_within_a_few_step_costs(model_dirs, tmp_path):
    data_port = free_port()
    forwarder = TcpForwarder(("127.0.0.1", data_port)).start()
    # worker 0's peer pushes to it through the forwarder: blackholing it partitions the pair
    behind = {0: ["--data-port", str(data_port), "--advertise-data-address", forwarder.address]}
    try:
        with LocalCluster(
            model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs", worker_args=behind
        ) as cluster:
            client = DiffusionClient(cluster.address)
            raw = make_input(prompt="a blue circle", num_steps=24, seed=5, mode="cfg-parallel")
            start = time.monotonic()
            fault_free = send(client, raw, timeout=120)  # it also measures the model's step cost
            fault_free_seconds = time.monotonic() - start
            step_cost = max(s.compute_seconds for s in fault_free.stats.steps[1:])

            def on_progress(p) -> None:
                if p.step == 5:
                    forwarder.blackhole()

            start = time.monotonic()
            resp = send(client, raw, timeout=300, on_progress=on_progress)
            elapsed = time.monotonic() - start
            client.close()
    finally:
        forwarder.close()
    assert any("resumed at step" in n for n in resp.stats.notes), resp.stats.notes
    assert len(resp.stats.steps) == 24
    assert resp.images[0].data == fault_free.images[0].data  # the survivor finished it alone
    # The stall is the workers' peer wait, in step costs (at least a 5 s floor), not 120 s.
    peer_wait = StepWaits().peer(step_cost)
    assert peer_wait < 30
    assert elapsed < fault_free_seconds + 2 * peer_wait + 15, (elapsed, peer_wait, resp.stats.notes)


def _coordinator(workers: list[str], run_dir, n: int, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    ready = run_dir / f"coordinator{n}.json"
    log = open(run_dir / f"coordinator{n}.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hybridiff_launch.cli",
            "-v",
            "coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        + ["--metrics-port", "0", "--workers", ",".join(workers), "--ready-file", str(ready)],
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc, await_ready_file(proc, ready, 60, run_dir / f"coordinator{n}.log")["port"]


@pytest.mark.slow  # long by nature: .ci/run runs the slow tests after the README's command
def test_the_coordinator_exits_0_after_a_drain_20_times(model_dirs, otlp, tmp_path):
    # Spans exported over OTLP/gRPC: the exporter's thread and channel are alive too.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs") as cluster:
        codes = []
        for n in range(20):
            proc, port = _coordinator(cluster.worker_addresses, tmp_path, n, env)
            try:
                client = DiffusionClient(f"127.0.0.1:{port}")
                raw = make_input(prompt="a star", num_steps=2, mode="cfg-parallel", request_id=f"drain-{n}")
                assert poll_until(lambda: _served(client, raw), within=60)  # channels, sessions, spans
                client.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                codes.append(proc.wait(timeout=60))
            log = (tmp_path / f"coordinator{n}.log").read_text()
            assert codes[-1] == 0, log[-3000:]
            assert "request done" in log  # its log was flushed before it ended
    assert codes == [0] * 20
    # and so were its spans
    exported = {
        s["attributes"].get("hybridiff.request_id")
        for s in otlp.snapshot()
        if s["name"] == "hybridiff.generate"
    }
    assert {f"drain-{n}" for n in range(20)} <= exported


def _served(client, raw) -> bool:
    try:
        send(client, raw, timeout=30)
        return True
    except HybridiffError:  # the workers are not joined yet
        return False

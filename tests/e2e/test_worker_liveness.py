"""A worker frees itself from abandoned control sessions, sees its own stalls and says who it is
(docs/design.md section 5), as real worker processes: an idle session is ended within the idle timeout, a
SIGSTOPped client is dropped by gRPC keepalive, a command stuck past the watchdog's bound turns
health and liveness NOT_SERVING for good, and Info carries the weights digest and the running
request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cluster_helpers import (
    TEST_ENV,
    SessionStream,
    await_ready_file,
    solo_begin,
    solo_session,
    spawn_worker,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.service import LIVENESS_SERVICE, SERVICE_NAME
from hybridiff.errors import status_details
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import WORKER_PROTOCOL_VERSION, Phase

IDLE = 2.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Worker:
    def __init__(self, model_dir: Path, run_dir: Path, name: str, *flags: str) -> None:
        self.name = name
        self.ready = run_dir / f"{name}.json"
        self.log = run_dir / f"{name}.log"
        self.proc = spawn_worker(
            model_dir,
            "--worker-id",
            name,
            "--ready-file",
            str(self.ready),
            *flags,
            log=self.log,
            verbose=True,
        )

    def wait_ready(self, deadline: float) -> Worker:
        ready = await_ready_file(self.proc, self.ready, deadline - time.monotonic(), self.log)
        self.address, self.data_address, self.metrics_port = (
            ready["control"],
            ready["data"],
            ready["metrics_port"],
        )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerControlServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return self

    def info(self) -> worker_pb2.InfoResponse:
        return self.stub.Info(worker_pb2.InfoRequest(), timeout=10)

    def status(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def workers(model_dirs, tmp_path_factory):
    """quick: a small idle timeout; patient: a long one (only keepalive frees it fast); other: other
    weights of the same architecture and a tiny watchdog bound."""
    from hybridiff_launch.tiny_model import write_tiny_model

    run_dir = tmp_path_factory.mktemp("liveness")
    other_dir = write_tiny_model("sdxl", run_dir / "seed1", seed=1)
    made = {
        "quick": Worker(model_dirs["sdxl"], run_dir, "quick", "--session-idle-timeout", str(IDLE)),
        "patient": Worker(model_dirs["sdxl"], run_dir, "patient", "--session-idle-timeout", "300"),
        "other": Worker(other_dir, run_dir, "other", "--watchdog-seconds", "1"),
    }
    deadline = time.monotonic() + 300
    try:
        yield {name: w.wait_ready(deadline) for name, w in made.items()}
    finally:
        for w in made.values():
            w.stop()


def test_info_says_who_the_worker_is(workers):
    quick, patient, other = (workers[n].info() for n in ("quick", "patient", "other"))
    assert quick.weights_digest.startswith("sha256:")
    assert quick.weights_digest == patient.weights_digest  # two processes, one model directory
    assert other.weights_digest != quick.weights_digest  # same architecture, other weights
    assert quick.active_request_id == "" and quick.protocol_version == WORKER_PROTOCOL_VERSION


def test_an_idle_control_session_is_ended_and_the_worker_is_free_again(workers):
    w = workers["quick"]
    stream = SessionStream(w.stub)
    stream.send(solo_begin("idle-1"))
    assert next(stream.call).WhichOneof("event") == "begin"
    started = time.monotonic()
    assert w.info().active_request_id == "idle-1"  # while the session runs
    with pytest.raises(grpc.RpcError) as err:
        next(stream.call)  # nothing more is sent
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert status_details(err.value)["ErrorInfo"].reason == "SESSION_IDLE"
    wait_until(lambda: w.info().active_request_id == "", 10, "the idle request cleared")
    assert time.monotonic() - started < IDLE + 10
    assert solo_session(w.stub, "idle-2", timeout=120) == ["begin", "step", "step", "finish"]
    assert w.info().active_request_id == ""
    assert w.metric("hybridiff_worker_requests_total") is not None
    stream.close()


CLIENT = textwrap.dedent(
    """
    import queue, sys, time
    import grpc
    from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
    outbox = queue.Queue()
    call = worker_pb2_grpc.WorkerControlServiceStub(grpc.insecure_channel(sys.argv[1])).Session(
        iter(outbox.get, None)
    )
    outbox.put(worker_pb2.SessionRequest.FromString(bytes.fromhex(sys.argv[2])))
    print(next(call).WhichOneof("event"), flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.slow  # a keepalive timeout (~10 s)
def test_a_sigstopped_client_is_dropped_by_keepalive(workers):
    """The worker's idle timeout is 300 s here: only gRPC keepalive (ping every 5 s, 5 s to
    answer) can free it within the bound."""
    w = workers["patient"]
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, w.address, solo_begin("stopped-1").SerializeToString().hex()],
        env=TEST_ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "begin"
        assert w.info().active_request_id == "stopped-1"
        os.kill(client.pid, signal.SIGSTOP)
        freed = wait_until(
            lambda: w.info().active_request_id == "", 60, "keepalive dropped the stopped client"
        )
        assert freed < 30, freed  # keepalive time + timeout is 10 s; without the ping timeout, 65 s
        assert solo_session(w.stub, "stopped-2", timeout=120)[-1] == "finish"
    finally:
        client.kill()
        client.wait()


def test_a_command_stuck_past_the_watchdog_turns_health_and_liveness_off_for_good(workers):
    w, peer = workers["other"], workers["quick"]
    for service in ("", SERVICE_NAME, LIVENESS_SERVICE):
        assert w.status(service) == SERVING, service
    assert w.metric("hybridiff_worker_stalled") == 0
    # A paired request whose peer never sends: the step waits for the peer's prediction far
    # longer than this worker's 1 s watchdog bound.
    stream = SessionStream(w.stub)
    stream.send(
        solo_begin(
            "stuck-1",
            solo=False,
            peer_data_address=peer.data_address,
            peer_worker_id="quick",
            session_nonce=os.urandom(16),
            peer_timeout_seconds=0,  # the worker's default, 120 s: its --watchdog-seconds applies
        )
    )
    assert next(stream.call).WhichOneof("event") == "begin"
    stream.send(
        worker_pb2.SessionRequest(
            request_id="stuck-1", step=worker_pb2.StepCommand(step=0, phase=Phase.DATA_PARALLEL)
        )
    )
    wait_until(lambda: w.status(LIVENESS_SERVICE) == NOT_SERVING, 30, "liveness turned off")
    assert w.status("") == NOT_SERVING and w.status(SERVICE_NAME) == NOT_SERVING
    assert w.metric("hybridiff_worker_stalled") == 1
    assert w.info().active_request_id == "stuck-1"  # Info still answers, and says what is stuck

    stream.call.cancel()  # the coordinator gives up: the command ends, the worker stays off
    wait_until(lambda: w.info().active_request_id == "", 30, "the stuck request aborted")
    for service in ("", SERVICE_NAME, LIVENESS_SERVICE):
        assert w.status(service) == NOT_SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        solo_session(w.stub, "after-stall", timeout=120)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "made no progress" in w.log.read_text()
    stream.close()

"""Nobody freezes the coordinator or a worker by holding streams open (as a hostile review
found: 41 health Watch streams took every thread of the coordinator's public port; 8 Watch
streams on a worker's health port, or 8 silent control Sessions, took every thread of a worker).

Real processes and sockets: a worker process (plaintext control port and a health port) and an
in-process coordinator in front of it. Each test holds the streams open while it checks that
health Check answers, Info tells the truth and a real request still runs."""

from __future__ import annotations

import queue
import subprocess
import threading
import time

import grpc
import pytest
from cluster_helpers import await_ready_file, solo_session, spawn_worker
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpu_worker.service import BEGIN_SECONDS, OPENING
from hybridiff import serving
from hybridiff.errors import status_details
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

WATCH_STREAMS = 41  # one more than the coordinator's threads before the fix
SESSIONS = 8  # the worker's threads
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def worker(model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("exhaustion")
    ready, log = run / "worker.json", run / "worker.log"
    proc = spawn_worker(
        model_dirs["sdxl"],
        "--health-port",
        "0",
        "--worker-id",
        "wx",
        "--ready-file",
        str(ready),
        log=log,
        verbose=True,
    )
    try:
        info = await_ready_file(proc, ready, 120, log)
        yield {"control": info["control"], "health": f"127.0.0.1:{info['health_port']}", "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _coordinator(workers: list[str], **kwargs):
    from coordinator.discovery import StaticDiscovery
    from coordinator.server import Coordinator

    return Coordinator(
        StaticDiscovery(workers), host="127.0.0.1", port=0, metrics_port=None, grace=0, **kwargs
    ).start()


def _check(address: str, service: str = "", timeout: float = 5) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


class Held:
    """Streams held open, each on a channel (a connection) of its own, each read by a thread:
    ``outcomes`` gets "open" once a stream's first response came, else its status code."""

    def __init__(self) -> None:
        self.outcomes: queue.Queue = queue.Queue()
        self.channels: list[grpc.Channel] = []
        self.calls: list = []

    def open(self, address: str, start) -> None:
        channel = grpc.insecure_channel(address)
        call = start(channel)
        self.channels.append(channel)
        self.calls.append(call)
        threading.Thread(target=self._read, args=(call,), daemon=True).start()

    def _read(self, call) -> None:
        try:
            for _ in call:
                self.outcomes.put("open")
                break
            for _ in call:
                pass
            self.outcomes.put(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            self.outcomes.put(err.code())

    def collect(self, count: int, within: float) -> list:
        deadline = time.monotonic() + within
        return [self.outcomes.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count)]

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def _watch(channel: grpc.Channel, metadata=None):
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), metadata=metadata)


def _reflection_list(channel: grpc.Channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata))
    return [s.name for s in response.list_services_response.service]


def _generate(address: str, token: str | None = None):
    from cluster_helpers import make_input, send

    from hybridiff.client import DiffusionClient

    raw = make_input(prompt="a red square", num_steps=2, seed=1, mode="single", width=64, height=64)
    with DiffusionClient(address, token=token) as client:
        return send(client, raw, timeout=60)


def _wait_serving(address: str, service: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while _check(address, service) != SERVING:
        assert time.monotonic() < deadline, f"{service} not SERVING within {within} s"
        time.sleep(0.1)


def test_with_a_token_watch_and_reflection_are_refused_and_check_answers():
    """Before: Watch and reflection were open to every caller even with a token configured, and
    41 Watch streams took the coordinator's every thread (Check timed out)."""
    coord = _coordinator([], token="s3cret")
    address = f"127.0.0.1:{coord.port}"
    held = Held()
    try:
        for _ in range(WATCH_STREAMS):
            held.open(address, _watch)
        outcomes = held.collect(WATCH_STREAMS, within=30)
        assert outcomes == [grpc.StatusCode.UNAUTHENTICATED] * WATCH_STREAMS
        assert _check(address) == SERVING
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                _reflection_list(channel)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = (("authorization", "Bearer s3cret"),)
            assert "hybridiff.v1.DiffusionService" in _reflection_list(channel, token)
            first = next(_watch(channel, token))  # with the token, Watch works
            assert first.status == SERVING
    finally:
        held.close()
        coord.drain_and_stop()


def test_without_a_token_watch_streams_beyond_the_cap_are_refused_and_requests_run(worker):
    """Before: the 41st Watch stream took the last thread: Check and Generate hung."""
    coord = _coordinator([worker["control"]])
    address = f"127.0.0.1:{coord.port}"
    held = Held()
    try:
        _wait_serving(address, "hybridiff.v1.DiffusionService")
        for _ in range(WATCH_STREAMS):
            held.open(address, _watch)
        outcomes = held.collect(WATCH_STREAMS, within=30)  # every stream answered: open or refused
        assert outcomes.count("open") == serving.LINGERING_STREAMS
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == WATCH_STREAMS - serving.LINGERING_STREAMS
        for _ in range(3):
            assert _check(address, timeout=3) == SERVING
        with grpc.insecure_channel(address) as channel:  # reflection is a lingering stream too
            with pytest.raises(grpc.RpcError) as err:
                _reflection_list(channel)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert status_details(err.value)["ErrorInfo"].reason == "TOO_MANY_CALLS"
        assert len(_generate(address).images) == 1
        held.close()
        with grpc.insecure_channel(address) as channel:  # the slots come back when the streams end

            def watch_opens() -> bool:
                try:
                    return next(_watch(channel)).status == SERVING
                except grpc.RpcError:
                    return False

            deadline = time.monotonic() + 30
            while not watch_opens():
                assert time.monotonic() < deadline, "the Watch slots were not freed"
                time.sleep(0.2)
    finally:
        held.close()
        coord.drain_and_stop()


def test_watch_streams_on_the_workers_ports_leave_its_probes_answering(worker):
    """Before: the health port was the control server: 8 Watch streams there took all its 8
    threads; kubelet's Check timed out (a restart) and so did the coordinator's probe."""
    held = Held()
    try:
        for _ in range(SESSIONS + 4):
            held.open(worker["health"], _watch)
        outcomes = held.collect(SESSIONS + 4, within=30)
        # Check only there: every Watch is refused, by the interceptor (PERMISSION_DENIED) or, when
        # more arrive at once than the port has threads, before it (RESOURCE_EXHAUSTED, never queued).
        refused = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert set(outcomes) <= refused and grpc.StatusCode.PERMISSION_DENIED in outcomes, outcomes
        for _ in range(SESSIONS + 4):
            held.open(worker["control"], _watch)
        outcomes = held.collect(SESSIONS + 4, within=30)
        assert outcomes.count("open") <= 2  # the control port's lingering-stream slots
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= SESSIONS + 2
        for address in (worker["health"], worker["control"]):
            assert _check(address, timeout=3) == SERVING
        with grpc.insecure_channel(worker["control"]) as channel:
            info = worker_pb2_grpc.WorkerControlServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
            assert info.active_request_id == ""
    finally:
        held.close()


def test_silent_sessions_neither_starve_the_worker_nor_pass_it_off_as_free(worker):
    """Before: 8 silent Sessions took the worker's 8 threads (7 parked 10 s for the busy lock, one
    held the worker for the 60 s idle timeout), health and Info timed out, and while the foreign
    session held the worker Info said active_request_id "" (free)."""
    control = worker["control"]
    silent: list[queue.Queue] = []

    def start(channel):
        outbox: queue.Queue = queue.Queue()
        silent.append(outbox)
        return worker_pb2_grpc.WorkerControlServiceStub(channel).Session(iter(outbox.get, None))

    held = Held()
    with grpc.insecure_channel(control) as channel:
        stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
        try:
            for _ in range(SESSIONS):
                held.open(control, start)
            deadline = time.monotonic() + 10
            while (info := stub.Info(worker_pb2.InfoRequest(), timeout=5)).active_request_id != OPENING:
                assert time.monotonic() < deadline, f"no session took the worker: {info.active_request_id!r}"
                time.sleep(0.05)
            held_since = time.monotonic()
            # The holder is ended BEGIN_SECONDS after it took the worker: until shortly before that,
            # every answer must call the worker taken, and health keeps answering on both ports.
            while time.monotonic() < held_since + BEGIN_SECONDS - 1.5:
                assert stub.Info(worker_pb2.InfoRequest(), timeout=3).active_request_id == OPENING
                assert _check(worker["health"], timeout=3) == SERVING
                assert _check(control, timeout=3) == SERVING
                time.sleep(0.1)
            outcomes = held.collect(SESSIONS, within=BEGIN_SECONDS + 20)
            assert outcomes.count(grpc.StatusCode.UNAVAILABLE) == SESSIONS - 1  # WORKER_BUSY
            assert outcomes.count(grpc.StatusCode.ABORTED) == 1  # no Begin in time: SESSION_IDLE
            assert solo_session(stub, "req-after-silence", timeout=60) == ["begin", "step", "step", "finish"]
        finally:
            for outbox in silent:
                outbox.put(None)
            held.close()

"""The worker's control service on a real gRPC server with a real engine (tiny model): an idle or
non-reading session frees the worker, silent sessions hold neither its threads nor (for long) the
worker, Info names the running request (or says a session is opening), the watchdog fires once
per stalled activity, and the weights digest tells models apart."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time

import grpc
import pytest
from cluster_helpers import Served, SessionStream, wait_until
from grpc_health.v1 import health_pb2

from gpu_worker.loader import weights_digest
from gpu_worker.service import BUSY_WAIT_SECONDS, OPENING, Watchdog, WorkerService
from hybridiff import serving
from hybridiff.errors import InvalidArgument, status_details
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import Phase, Role, WindowGuidance

IDLE = 1.5


@pytest.fixture(scope="module")
def served(model_dirs):
    s = Served(model_dirs["sdxl"], session_idle_seconds=IDLE)
    yield s
    s.close()


def begin(request_id: str, steps: int = 4, side: int = 64) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id=request_id,
        begin=worker_pb2.BeginCommand(
            request=worker_pb2.WorkerRequest(
                prompt="a red square", width=side, height=side, num_steps=steps, guidance_scale=2.0, seed=1
            ),
            role=Role.U,
            window_guidance=WindowGuidance.FULL_CFG,
            solo=True,
        ),
    )


def step(request_id: str, i: int, report_latents: bool = False) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id=request_id,
        step=worker_pb2.StepCommand(step=i, phase=Phase.SINGLE, report_latents=report_latents),
    )


def run_to_the_end(stub, request_id: str) -> list[worker_pb2.SessionResponse]:
    cmds = [begin(request_id, steps=2), step(request_id, 0), step(request_id, 1)]
    cmds.append(worker_pb2.SessionRequest(request_id=request_id, finish=worker_pb2.FinishCommand()))
    return list(stub.Session(iter(cmds), timeout=60))


def test_info_names_the_running_request_until_its_cleanup_is_done(served):
    assert served.info().active_request_id == ""
    stream = SessionStream(served.stub)
    stream.send(begin("req-info"))
    assert next(stream.call).WhichOneof("event") == "begin"
    assert served.info().active_request_id == "req-info"
    stream.close()  # the coordinator's stream ends without a finish: the worker aborts the request
    wait_until(lambda: served.info().active_request_id == "", 10, "the active request cleared")
    assert "req-info" not in served.service.engine._active  # "" only after engine.abort
    events = run_to_the_end(served.stub, "req-after")
    assert [e.WhichOneof("event") for e in events] == ["begin", "step", "step", "finish"]
    assert served.info().active_request_id == ""


def test_an_idle_session_is_ended_with_a_typed_status_and_the_worker_is_free(served):
    before = served.outcomes("idle_timeout")
    stream = SessionStream(served.stub)
    stream.send(begin("req-idle"))
    started = time.monotonic()
    assert next(stream.call).WhichOneof("event") == "begin"
    with pytest.raises(grpc.RpcError) as err:
        next(stream.call)  # then nothing is sent: the worker ends the session after IDLE seconds
    waited = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert status_details(err.value)["ErrorInfo"].reason == "SESSION_IDLE"
    assert IDLE <= waited < IDLE + 10
    wait_until(lambda: served.info().active_request_id == "", 10, "the idle request cleared")
    assert served.outcomes("idle_timeout") == before + 1
    assert "req-idle" not in served.service.engine._active
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("session-reader-")],
        10,
        "the session's reader thread ended",
    )
    assert run_to_the_end(served.stub, "req-next")[-1].WhichOneof("event") == "finish"
    stream.close()


def test_a_session_that_never_begins_is_ended_too(served):
    stream = SessionStream(served.stub)  # opened, nothing sent
    with pytest.raises(grpc.RpcError) as err:
        next(stream.call)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert run_to_the_end(served.stub, "req-after-empty")[-1].WhichOneof("event") == "finish"
    stream.close()


def test_silent_sessions_hold_no_threads_and_never_pass_the_worker_off_as_free(served):
    """Eight sessions that send nothing, on a server of eight threads. Before: seven waited 10 s
    each for the busy lock and one held the worker for the idle timeout, so Info and health
    timed out; and while that one held it, Info said active_request_id "": free. Now one holds
    it until its Begin is overdue (Info says it is opening), one may wait BUSY_WAIT_SECONDS, the
    others are refused at once."""
    from grpc_health.v1 import health_pb2_grpc

    served.health.set("", serving.SERVING)
    health = health_pb2_grpc.HealthStub(served.channel)
    busy_before = served.outcomes("busy")
    channels = [grpc.insecure_channel(f"127.0.0.1:{served.port}") for _ in range(8)]
    outcomes: queue.Queue = queue.Queue()

    def hold(channel) -> None:
        stream = SessionStream(worker_pb2_grpc.WorkerControlServiceStub(channel))
        try:
            list(stream.call)
            outcomes.put("ok")
        except grpc.RpcError as err:
            outcomes.put(status_details(err)["ErrorInfo"].reason)
        finally:
            stream.close()

    try:
        for channel in channels:
            threading.Thread(target=hold, args=(channel,), daemon=True).start()
        wait_until(lambda: served.service._busy.locked(), 10, "a silent session took the worker")
        while served.service._busy.locked():  # until its Begin is overdue
            info = served.info()
            if served.service._busy.locked():  # (else it was released while Info answered)
                assert info.active_request_id == OPENING
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.05)
        reasons = [
            outcomes.get(timeout=served.service.begin_seconds + BUSY_WAIT_SECONDS + 10) for _ in channels
        ]
        assert sorted(reasons) == ["SESSION_IDLE"] + ["WORKER_BUSY"] * 7
        assert served.outcomes("busy") == busy_before + 7
        assert served.info().active_request_id == ""
        assert run_to_the_end(served.stub, "req-after-silence")[-1].WhichOneof("event") == "finish"
    finally:
        for channel in channels:
            channel.close()


def test_a_session_waits_briefly_for_the_one_before_it_to_unwind(served):
    """The legitimate wait: the worker is still held when the next session opens; it takes the
    worker once released (one waiter at a time, at most BUSY_WAIT_SECONDS)."""
    served.service._busy.acquire()  # the previous session, unwinding
    threading.Timer(BUSY_WAIT_SECONDS / 4, served.service._busy.release).start()
    assert run_to_the_end(served.stub, "req-waited")[-1].WhichOneof("event") == "finish"


def test_another_coordinators_session_is_refused_at_once_while_one_holds_the_worker(served):
    """Coordinators sharing a worker: while coordinator "a"'s session holds it, a session of "b"
    is refused with WORKER_BUSY at once (no wait meant for "a"'s own next session), and one of
    "a" still waits for the holder to unwind."""
    from hybridiff.protocol import COORDINATOR_METADATA

    outbox: queue.Queue = queue.Queue()
    held = served.stub.Session(iter(outbox.get, None), timeout=60, metadata=[(COORDINATOR_METADATA, "a")])
    outbox.put(begin("req-held-by-a"))
    assert next(held).WhichOneof("event") == "begin"
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(
                served.stub.Session(
                    iter([begin("req-of-b")]), timeout=30, metadata=[(COORDINATOR_METADATA, "b")]
                )
            )
        assert status_details(err.value)["ErrorInfo"].reason == "WORKER_BUSY"
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < BUSY_WAIT_SECONDS / 2
    finally:
        outbox.put(None)
    wait_until(lambda: served.info().active_request_id == "", 10, "the held request cleared")
    assert run_to_the_end(served.stub, "req-after-b")[-1].WhichOneof("event") == "finish"


@pytest.mark.slow  # a stream backed up until the worker cuts it (~16 s)
def test_a_client_that_does_not_read_its_events_is_cut_off(served):
    """Its events fill the stream's flow-control window, so handing the next one over blocks:
    that wait is bounded by the idle timeout as well."""
    before = served.outcomes("idle_timeout")
    steps = 500
    stream = SessionStream(served.stub)
    first = begin("req-deaf", steps=steps, side=128)
    first.begin.request.num_images = 4
    stream.send(first)
    for i in range(steps):
        stream.send(step("req-deaf", i, report_latents=True))  # 16 KiB of latents per event
    wait_until(lambda: served.info().active_request_id == "req-deaf", 30, "the request started")
    wait_until(lambda: served.info().active_request_id == "", 60, "the deaf session ended")
    assert served.outcomes("idle_timeout") == before + 1
    with pytest.raises(grpc.RpcError) as err:
        list(stream.call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    stream.close()


def test_health_keeps_answering_while_a_session_runs(served):
    from grpc_health.v1 import health_pb2_grpc

    served.health.set("", serving.SERVING)
    stream = SessionStream(served.stub)
    stream.send(begin("req-health"))
    next(stream.call)
    health = health_pb2_grpc.HealthStub(served.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    stream.close()
    wait_until(lambda: served.info().active_request_id == "", 10, "the request cleared")


def test_the_watchdog_fires_once_per_overdue_watch_and_never_for_a_quick_one():
    fired: list[str] = []
    dog = Watchdog(poll=0.02).start()
    try:
        with dog.watch("quick", 5.0, lambda w: fired.append(w.what)):
            pass
        with dog.watch("stuck", 0.1, lambda w: fired.append(w.what)) as w:
            wait_until(lambda: fired, 10, "the watchdog fired")
            time.sleep(0.2)  # overdue for longer still: it does not fire again
            assert "test_the_watchdog_fires" in w.stack()  # where the stuck thread is
        assert fired == ["stuck"]
    finally:
        dog.stop()


def test_the_watchdog_bound_covers_the_peer_waits_a_session_asks_for():
    service = WorkerService("w", "m", watchdog_seconds=300)
    try:
        # four peer waits (a speculative step: the prediction, the resolution, a FULL_CFG half, its
        # sends at the end of a staged step) and a send
        for requested, bound in ((0, 300), (50, 300), (200, 860), (1e9, 2460), (float("nan"), 300)):
            assert service.watchdog_bound(worker_pb2.BeginCommand(peer_timeout_seconds=requested)) == bound
    finally:
        service.close()


def test_bounds_must_be_positive():
    with pytest.raises(InvalidArgument):
        WorkerService("w", "m", session_idle_seconds=0)
    with pytest.raises(InvalidArgument):
        WorkerService("w", "m", watchdog_seconds=-1)


def test_the_weights_digest_tells_weights_apart_not_paths(model_dirs, tmp_path):
    from hybridiff_launch.tiny_model import write_tiny_model

    original = model_dirs["sdxl"]
    digest = weights_digest(original)
    assert digest.startswith("sha256:") and digest == weights_digest(original)
    copy = shutil.copytree(original, tmp_path / "copy")  # other path, other file times
    assert weights_digest(copy) == digest
    other_seed = write_tiny_model("sdxl", tmp_path / "seed1", seed=1)  # same architecture and shapes
    assert weights_digest(other_seed) != digest
    assert weights_digest(model_dirs["sd3"]) not in (digest, weights_digest(other_seed))

    # One byte in the middle of the largest tensor's first sampled block, and a config value.
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    spans = [v["data_offsets"] for k, v in json.loads(data[8:header]).items() if k != "__metadata__"]
    begin_at = max(spans, key=lambda o: o[1] - o[0])[0]
    data[header + begin_at + 100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_digest(copy) != digest
    shutil.copy(original / "unet" / "diffusion_pytorch_model.safetensors", weights)
    assert weights_digest(copy) == digest
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "timestep_spacing": "trailing"}))
    assert weights_digest(copy) != digest

"""A resumed request's checkpoint travels to the worker in parts (docs/design.md section 5): the
worker's control service on a real gRPC server built as the worker builds it (the control
port's small receive bound), a real engine over the tiny SDXL model with a multistep scheduler
(UniPC, whose checkpoint carries a history), and the coordinator's own RemoteWorker sending.

The largest checkpoint resumes exactly in many parts; a checkpoint over the worker's bound is
refused before a part is read; parts out of order, repeated, overlapping, beyond the announced
size, a stream cut mid-way or a command between the parts end the session with BAD_COMMAND
and leave the worker free."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cluster_helpers import SessionStream, with_unipc

from coordinator.remote import RemoteWorker
from gpu_worker.dataplane import Mailbox
from gpu_worker.engine import WorkerEngine
from gpu_worker.loader import load_adapter
from gpu_worker.service import WorkerService
from hybridiff import serving
from hybridiff.checkpoint_parts import CheckpointAssembly, checkpoint_bound, in_parts
from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import Phase, Role, WindowGuidance

PART = 4096  # small parts, so that the tiny model's checkpoint takes many


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    """(the service, a channel to its server): the worker's control server as the worker builds it."""
    model = with_unipc(Path(model_dirs["sdxl"]), tmp_path_factory.mktemp("parts") / "unipc")
    adapter = load_adapter(model, "cpu", "float32")
    service = WorkerService("w0", "tiny", session_idle_seconds=10)
    service.attach(WorkerEngine(adapter, "w0", Mailbox("w0"), None), "")
    server = serving.new_server(
        8,
        [],
        max_message_bytes=serving.CONTROL_MESSAGE_BYTES,
        max_receive_bytes=serving.CONTROL_RECEIVE_BYTES,
    )
    worker_pb2_grpc.add_WorkerControlServiceServicer_to_server(service, server)
    port = serving.bind(server, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=serving.message_options(serving.CONTROL_MESSAGE_BYTES)
    )
    yield service, channel
    channel.close()
    server.stop(0).wait()
    service.close()


def _begin(
    request_id: str, side: int = 64, images: int = 1, steps: int = 2, **fields
) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id=request_id,
        begin=worker_pb2.BeginCommand(
            request=worker_pb2.WorkerRequest(
                prompt="a red square",
                width=side,
                height=side,
                num_steps=steps,
                guidance_scale=2.0,
                seed=3,
                num_images=images,
            ),
            role=Role.U,
            window_guidance=WindowGuidance.CONDITIONAL,
            solo=True,
            **fields,
        ),
    )


def _step(request_id: str, i: int, report: bool = False) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id=request_id, step=worker_pb2.StepCommand(step=i, phase=Phase.SINGLE, report_latents=report)
    )


def _finish(request_id: str) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(request_id=request_id, finish=worker_pb2.FinishCommand())


def _part(request_id: str, offset: int, data: bytes) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id=request_id, checkpoint_part=worker_pb2.CheckpointPart(offset=offset, data=data)
    )


def _run(handle: RemoteWorker, commands: list[worker_pb2.SessionRequest]) -> list[worker_pb2.SessionResponse]:
    futures = [handle.send(cmd) for cmd in commands]
    return [f.result(timeout=120) for f in futures]


def _still_serves(channel) -> None:
    stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
    events = list(
        stub.Session(
            iter([_begin("after"), _step("after", 0), _step("after", 1), _finish("after")]), timeout=60
        )
    )
    assert events[-1].WhichOneof("event") == "finish"


def _refusal(channel, commands: list[worker_pb2.SessionRequest], close: bool = False) -> grpc.RpcError:
    stream = SessionStream(worker_pb2_grpc.WorkerControlServiceStub(channel), timeout=30)
    for cmd in commands:
        stream.send(cmd)
    if close:
        stream.close()
    with pytest.raises(grpc.RpcError) as info:
        list(stream.call)
    stream.close()
    return info.value


def test_the_largest_checkpoint_resumes_exactly_in_many_parts(served):
    """Every image at the largest size, UniPC's history: the checkpoint goes in 4 KiB parts through
    the coordinator's RemoteWorker, and the resumed run ends on the unbroken run's very latents."""
    service, channel = served
    limits = service.adapter.size_limits()
    largest = {"side": limits.max_side, "images": limits.max_images, "steps": 6}
    at = 3
    handle = RemoteWorker("w0", channel, "", part_bytes=PART)
    unbroken = _run(
        handle,
        [
            _begin("unbroken", **largest),
            *(_step("unbroken", i, i == at - 1) for i in range(6)),
            _finish("unbroken"),
        ],
    )
    checkpoint = unbroken[at].step.checkpoint
    assert checkpoint.next_step == at and checkpoint.scheduler.fields  # the multistep history travels
    begin = _begin("resumed", **largest)
    begin.begin.resume.CopyFrom(checkpoint)
    parts = in_parts(begin, PART)
    assert len(parts) > 10 and not parts[0].begin.HasField("resume")
    assert parts[0].begin.resume_bytes == checkpoint.ByteSize() <= service.checkpoint_bound
    resumed = _run(handle, [begin, *(_step("resumed", i) for i in range(at, 6)), _finish("resumed")])
    assert [e.WhichOneof("event") for e in resumed] == ["begin", "step", "step", "step", "finish"]
    assert resumed[-1].finish.latents_digest == unbroken[-1].finish.latents_digest


def test_a_checkpoint_over_the_workers_bound_is_refused_before_a_part_is_read(served):
    service, channel = served
    err = _refusal(channel, [_begin("too-large", resume_bytes=service.checkpoint_bound + 1)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "begin.resume_bytes" in err.details() and "exceeds" in err.details()
    _still_serves(channel)


@pytest.mark.parametrize(
    "parts, what",
    [
        ([(0, 1000), (0, 1000)], "expected the one at 1000"),  # a repeated part
        ([(1000, 1000)], "expected the one at 0"),  # a gap
        ([(0, 1000), (900, 100)], "expected the one at 1000"),  # an overlap
        ([(0, 1500), (1500, 1500)], "past the announced 2000"),  # more than announced
        ([(0, 1000), (1000, 0)], "an empty part"),
    ],
    ids=["repeated", "gap", "overlap", "too-many-bytes", "empty"],
)
def test_parts_out_of_order_repeated_or_too_many_end_the_session(served, parts, what):
    _, channel = served
    commands = [_begin("bad-parts", resume_bytes=2000)]
    commands += [_part("bad-parts", offset, b"\0" * size) for offset, size in parts]
    err = _refusal(channel, commands)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert what in err.details()
    _still_serves(channel)


def test_a_stream_that_ends_or_is_cancelled_mid_checkpoint_frees_the_worker(served):
    _, channel = served
    half = [_begin("cut", resume_bytes=2000), _part("cut", 0, b"\0" * 1000)]
    err = _refusal(channel, half, close=True)  # the client ends its stream half-way
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the stream ended after 1000 of 2000 bytes" in err.details()
    stream = SessionStream(worker_pb2_grpc.WorkerControlServiceStub(channel), timeout=30)
    for cmd in half:
        stream.send(cmd)
    stream.call.cancel()  # the coordinator aborts (or its connection drops) half-way
    stream.close()
    _still_serves(channel)


def test_a_command_between_the_parts_or_a_stray_part_is_refused(served):
    _, channel = served
    err = _refusal(
        channel, [_begin("mixed", resume_bytes=2000), _part("mixed", 0, b"\0" * 1000), _step("mixed", 0)]
    )
    assert "step of 'mixed' before the checkpoint was whole" in err.details()
    err = _refusal(channel, [_begin("other", resume_bytes=2000), _part("another-request", 0, b"\0" * 2000)])
    assert "checkpoint_part of 'another-request'" in err.details()
    err = _refusal(channel, [_begin("stray"), _part("stray", 0, b"\0" * 10)])
    assert "no checkpoint is expected" in err.details()
    inline = _begin("both", resume_bytes=2000)
    inline.begin.resume.next_step = 1
    err = _refusal(channel, [inline])
    assert "whole or in parts, not both" in err.details()
    _still_serves(channel)


def test_a_checkpoint_that_does_not_parse_is_refused(served):
    _, channel = served
    err = _refusal(channel, [_begin("garbage", resume_bytes=1000), _part("garbage", 0, b"\xff" * 1000)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not parse" in err.details()
    _still_serves(channel)


def test_a_command_without_a_checkpoint_stays_whole():
    step = _step("r", 1)
    assert in_parts(step) == [step]
    begin = _begin("r")
    assert in_parts(begin) == [begin]


def test_the_begin_sent_ahead_of_the_parts_keeps_every_other_field():
    cmd = _begin("r", split_cut=0, session_nonce=b"n" * 16, peer_timeout_seconds=2.5, speculative=True)
    cmd.trace_context["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    cmd.begin.request.negative_prompt = ""
    cmd.begin.resume.next_step = 2
    first, *parts = in_parts(cmd, PART)
    expected = worker_pb2.SessionRequest()
    expected.CopyFrom(cmd)
    expected.begin.ClearField("resume")
    expected.begin.resume_bytes = cmd.begin.resume.ByteSize()
    assert first == expected and cmd.begin.HasField("resume")  # the command itself is unchanged
    assert first.begin.HasField("split_cut") and first.begin.request.HasField("negative_prompt")
    assert [p.checkpoint_part.data for p in parts] == [cmd.begin.resume.SerializeToString()]


def test_the_bound_is_checked_before_anything_is_buffered():
    with pytest.raises(BadCommand, match="exceeds"):
        CheckpointAssembly(checkpoint_bound(1) + 1, checkpoint_bound(1))

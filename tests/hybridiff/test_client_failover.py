"""The client over several coordinators: a request's id and seed are fixed on the client side, a
request that fails with UNAVAILABLE before its result is sent again on the next target with the
same id and seed, other errors are not retried, and a request every target lost ends in one
line naming each. Fake coordinators on loopback (real gRPC servers)."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent import futures

import grpc
import pytest

from hybridiff import serving
from hybridiff.client import AsyncDiffusionClient, DiffusionClient, parse_targets, pinned
from hybridiff.errors import InvalidArgument, Unavailable
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc


class FakeCoordinator(diffusion_pb2_grpc.DiffusionServiceServicer):
    """Answers GenerateStream with one progress event, then ``fail`` (an error to abort with) or
    a result echoing the request's id and seed; keeps every request it got."""

    def __init__(self, fail=None) -> None:
        self.fail = fail
        self.requests: list[pb.GenerateRequest] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def GenerateStream(self, request, context):
        with self._lock:
            self.requests.append(request.request)
        yield pb.GenerateStreamResponse(progress=pb.StepProgress(step=1, total_steps=4))
        if self.fail is not None:
            serving.abort(context, self.fail)
        yield pb.GenerateStreamResponse(
            result=pb.GenerateResponse(request_id=request.request.request_id, seed=request.request.seed)
        )

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def coordinators():
    made: list[FakeCoordinator] = []

    def start(fail=None) -> FakeCoordinator:
        made.append(FakeCoordinator(fail))
        return made[-1]

    yield start
    for c in made:
        c.stop()


def refused_address() -> str:
    """A loopback port nothing listens on: a connection is refused at once. (A gRPC server
    never started keeps its socket listening, so a connection there hangs in the handshake and
    runs into the connect timeout instead: 5 s a target.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_targets_parse_from_a_list_or_commas():
    assert parse_targets("a:1, b:2,") == ["a:1", "b:2"]
    assert parse_targets(["a:1", "b:2"]) == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        parse_targets([" "])


def test_an_unset_request_id_and_seed_are_fixed_once_and_set_ones_kept():
    fixed = pinned(pb.GenerateRequest(prompt="x"))
    assert fixed.request_id and fixed.HasField("seed")
    assert pinned(fixed) is fixed
    kept = pinned(pb.GenerateRequest(prompt="x", request_id="mine", seed=0))
    assert kept.request_id == "mine" and kept.seed == 0


def test_unavailable_after_progress_is_retried_on_the_next_target_with_the_same_id_and_seed(coordinators):
    dying = coordinators(Unavailable("the coordinator is draining"))
    alive = coordinators()
    with DiffusionClient(f"{dying.address},{alive.address}") as client:
        steps: list[int] = []
        done = client.generate("a red square", on_progress=lambda p: steps.append(p.step))
    first, second = dying.requests[0], alive.requests[0]
    assert first.request_id == second.request_id == done.request_id != ""
    assert first.seed == second.seed == done.seed and first.HasField("seed")
    assert steps == [1, 1]  # the progress of both attempts


def test_a_refused_target_is_skipped_and_other_errors_are_not_retried(coordinators):
    alive = coordinators()
    with DiffusionClient([refused_address(), alive.address]) as client:
        assert client.generate("a red square", seed=3).seed == 3
    refusing = coordinators(InvalidArgument("width", "too wide"))
    other = coordinators()
    with DiffusionClient([refusing.address, other.address]) as client:
        with pytest.raises(InvalidArgument):
            client.generate("a red square")
    assert len(refusing.requests) == 1 and other.requests == []


def test_every_coordinator_lost_is_one_line_naming_each():
    targets = [refused_address(), refused_address()]
    with DiffusionClient(targets, attempts=2) as client:
        with pytest.raises(Unavailable) as err:
            client.generate("a red square", timeout=20)
    message = str(err.value)
    assert "\n" not in message and message.startswith("no coordinator could run the request (2 attempts)")
    assert all(t in message for t in targets)


def test_the_async_client_fails_over_too(coordinators):
    dying = coordinators(Unavailable("the coordinator is draining"))
    alive = coordinators()

    async def run():
        async with AsyncDiffusionClient([dying.address, alive.address]) as client:
            return await client.generate("a red square")

    done = asyncio.run(run())
    assert dying.requests[0].request_id == alive.requests[0].request_id == done.request_id
    assert dying.requests[0].seed == done.seed

"""The client against a coordinator that goes away mid-call: stopped (SIGSTOP), its call fails with
UNAVAILABLE after the keepalive timeout, not at its deadline; killed (SIGKILL), at once; both say
"lost the connection to the coordinator at HOST:PORT" instead of gRPC's "Stream removed". The
coordinator is a fake on loopback in a child process (so it can be stopped and killed): it
answers a GenerateStream with one progress event, then never finishes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from hybridiff import client as client_module
from hybridiff.client import AsyncDiffusionClient, DiffusionClient
from hybridiff.errors import Unavailable

FAKE_COORDINATOR = textwrap.dedent(
    """
    import sys, time
    from concurrent import futures
    import grpc
    from hybridiff import serving
    from hybridiff.v1 import diffusion_pb2 as pb, diffusion_pb2_grpc

    class Hanging(diffusion_pb2_grpc.DiffusionServiceServicer):
        def GenerateStream(self, request, context):
            yield pb.GenerateStreamResponse(progress=pb.StepProgress(step=1, total_steps=50))
            time.sleep(3600)

        def ListModels(self, request, context):
            time.sleep(3600)

    # The coordinator's own keepalive policy (it accepts the clients' pings).
    server = grpc.server(futures.ThreadPoolExecutor(4), options=serving.keepalive_server_options())
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(Hanging(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    """
)

# Short keepalive for the test (the defaults: 10 s + 5 s); the mechanism is the same.
FAST_KEEPALIVE_MS = 1_000


@pytest.fixture
def fake_coordinator():
    proc = subprocess.Popen([sys.executable, "-c", FAKE_COORDINATOR], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def fast_keepalive(monkeypatch):
    fast = ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms")
    options = [(name, FAST_KEEPALIVE_MS if name in fast else v) for name, v in client_module.CHANNEL_OPTIONS]
    monkeypatch.setattr(client_module, "CHANNEL_OPTIONS", options)


def test_the_client_sends_keepalive_pings_that_fail_a_call_within_seconds():
    options = dict(client_module.CHANNEL_OPTIONS)
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.keepalive_time_ms"] + options["grpc.keepalive_timeout_ms"] <= 30_000
    assert options["grpc.http2.ping_timeout_ms"] <= options["grpc.keepalive_timeout_ms"]


def _generate_until_first_step(target: str, on_first_step) -> tuple[Unavailable, float]:
    started = {}

    def progress(p):
        if not started:
            started["at"] = time.monotonic()
            on_first_step()

    with DiffusionClient(target, timeout=120) as client, pytest.raises(Unavailable) as failed:
        client.generate("a red circle", on_progress=progress)
    return failed.value, time.monotonic() - started["at"]


def test_a_stopped_coordinator_fails_the_call_after_the_keepalive_timeout(fake_coordinator, fast_keepalive):
    proc, target = fake_coordinator
    error, took = _generate_until_first_step(target, lambda: os.kill(proc.pid, signal.SIGSTOP))
    assert took < 15, f"the call waited {took:.1f} s for a stopped coordinator (its deadline: 120 s)"
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"lost the connection to the coordinator at {target}" in str(error)


def test_a_killed_coordinator_is_a_lost_connection_not_stream_removed(fake_coordinator):
    proc, target = fake_coordinator
    error, took = _generate_until_first_step(target, proc.kill)
    assert took < 10
    # one target: the client's failover tries it again, and says what each attempt met
    assert f"lost the connection to the coordinator at {target}" in str(error), str(error)


def test_the_async_client_says_the_same(fake_coordinator):
    proc, target = fake_coordinator

    async def run() -> Unavailable:
        async with AsyncDiffusionClient(target, timeout=120) as client:
            with pytest.raises(Unavailable) as failed:
                await client.generate("a red circle", on_progress=lambda p: proc.kill())
            return failed.value

    error = asyncio.run(run())
    assert f"lost the connection to the coordinator at {target}" in str(error)


def test_the_coordinators_own_unavailable_keeps_its_message():
    """An UNAVAILABLE the coordinator sent (with its error details) is not a lost connection."""
    from concurrent import futures

    from hybridiff import errors
    from hybridiff.v1 import diffusion_pb2_grpc

    class Draining(diffusion_pb2_grpc.DiffusionServiceServicer):
        def ListModels(self, request, context):
            context.abort_with_status(errors.to_status(Unavailable("the coordinator is draining")))

    server = grpc.server(futures.ThreadPoolExecutor(2))
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(Draining(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with DiffusionClient(f"127.0.0.1:{port}") as client, pytest.raises(Unavailable) as failed:
            client.list_models(timeout=10)
        assert "draining" in str(failed.value) and "lost the connection" not in str(failed.value)
    finally:
        server.stop(0)

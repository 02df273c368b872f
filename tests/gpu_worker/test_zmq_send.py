"""A data-plane send to a peer that is gone must not outlive its request: the worker's handler
thread would hold the worker busy, and the request resumed on it would be refused."""

import socket
import threading
import time

import pytest
import torch
import zmq

from gpu_worker.dataplane import Mailbox
from gpu_worker.zmq_plane import ZmqLink
from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.wire import FrameKind


@pytest.fixture
def silent_address():
    """A TCP port held by a plain socket that never speaks ZeroMQ: the handshake never completes,
    so (with IMMEDIATE) no send can be taken, and no other process can take the port meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def test_a_send_to_a_gone_peer_ends_when_its_request_is_closed(ctx, silent_address):
    box = Mailbox("worker")
    box.open("r")
    link = ZmqLink(ctx, "worker", silent_address, send_timeout_ms=30_000)
    threading.Timer(0.2, box.close, args=("r",)).start()  # what the Session's cancel callback does
    start = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="closed while sending"):
            link.send(
                "r",
                5,
                FrameKind.BRANCH_PREDICTION,
                {"prediction": torch.ones(4)},
                cancelled=lambda: not box.is_open("r"),
            )
    finally:
        link.close()
    assert time.monotonic() - start < 5.0  # not the 30 s send timeout


def test_a_send_to_a_gone_peer_still_times_out(ctx, silent_address):
    link = ZmqLink(ctx, "worker", silent_address, send_timeout_ms=300)
    start = time.monotonic()
    try:
        with pytest.raises(PeerTimeout, match="did not take data-plane frames in time") as err:
            link.send(
                "r", 5, FrameKind.BRANCH_PREDICTION, {"prediction": torch.ones(4)}, cancelled=lambda: False
            )
    finally:
        link.close()
    assert 0.25 < time.monotonic() - start < 5.0
    assert err.value.metadata["peer"] == silent_address  # the coordinator blames the peer, by this field

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
from hybridiff.errors import BadCommand, Cancelled, PeerTimeout
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


# --- peers the coordinator names, within the pool; a bounded link cache ------------------------


def _links(ctx, **kw):
    from gpu_worker.zmq_plane import ZmqLinks

    return ZmqLinks(ctx, "worker", **kw)


def test_only_peers_within_the_allowed_networks(ctx):
    from gpu_worker.zmq_plane import parse_networks

    links = _links(ctx, networks=parse_networks("127.0.0.0/8, fd00::/8"))
    try:
        assert links("tcp://127.0.0.1:5555").address == "tcp://127.0.0.1:5555"
        # A hostname is resolved before the check, and the link dials what was checked.
        assert links("tcp://localhost:5556").address == "tcp://127.0.0.1:5556"
        for refused in ("tcp://10.1.2.3:5555", "tcp://8.8.8.8:53", "tcp://[::1]:5555"):
            with pytest.raises(BadCommand) as err:
                links(refused)
            assert err.value.field == "peer_data_address" and "outside the allowed" in str(err.value)
        for malformed in ("ipc:///tmp/x", "tcp://127.0.0.1", "tcp://:5555", "tcp://127.0.0.1:0", "tcp://h:x"):
            with pytest.raises(BadCommand):
                links(malformed)
        with pytest.raises(BadCommand, match="cannot resolve"):
            links("tcp://no-such-host.invalid:5555")
        assert len(links) == 2
    finally:
        links.close()


def test_no_networks_means_any_peer(ctx):
    from gpu_worker.zmq_plane import parse_networks

    assert parse_networks("") is None and parse_networks(None) is None
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/8,not-a-network")
    links = _links(ctx)
    try:
        assert links("tcp://10.1.2.3:5555").address == "tcp://10.1.2.3:5555"
    finally:
        links.close()


def test_the_link_cache_is_bounded_and_closes_what_it_evicts(ctx):
    links = _links(ctx, max_links=3)
    try:
        first = [links(f"tcp://127.0.0.1:{6000 + i}") for i in range(3)]
        assert links("tcp://127.0.0.1:6000") is first[0]  # a hit refreshes the entry
        fourth = links("tcp://127.0.0.1:6003")
        assert len(links) == 3
        # The least recently used (6001, not the refreshed 6000) was evicted and closed.
        assert first[1]._socket.closed and not first[0]._socket.closed and not first[2]._socket.closed
        assert links("tcp://127.0.0.1:6001") is not first[1]
        assert len(links) == 3 and first[2]._socket.closed  # 6002 was next in line
        assert not fourth._socket.closed
        for i in range(100):  # many distinct addresses never grow the cache past its bound
            links(f"tcp://127.0.0.1:{7000 + i}")
        assert len(links) == 3
    finally:
        links.close()


def test_a_link_whose_peer_timed_out_is_dropped(ctx, silent_address):
    links = _links(ctx, send_timeout_ms=300)
    try:
        link = links(silent_address)
        with pytest.raises(PeerTimeout):
            link.send("r", 0, FrameKind.BRANCH_PREDICTION, {"p": torch.ones(4)}, cancelled=lambda: False)
        assert len(links) == 0 and link._socket.closed
        with pytest.raises(PeerTimeout, match="closed"):  # never a crash on a closed socket
            link.send("r", 1, FrameKind.BRANCH_PREDICTION, {"p": torch.ones(4)}, cancelled=lambda: False)
        again = links(silent_address)
        assert again is not link and not again._socket.closed and len(links) == 1
    finally:
        links.close()


def test_sockets_heartbeat_and_the_receiver_bounds_its_frames(ctx):
    from gpu_worker.zmq_plane import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, DataPlaneReceiver, ZmqLink
    from hybridiff.wire import MAX_HEADER_BYTES, MAX_TENSORS

    box = Mailbox("worker", max_message_bytes=1 << 20)
    receiver = DataPlaneReceiver(ctx, box, "127.0.0.1", 0).start()
    link = ZmqLink(ctx, "worker", f"tcp://127.0.0.1:{receiver.port}")
    try:
        for sock in (receiver._socket, link._socket):
            assert sock.getsockopt(zmq.HEARTBEAT_IVL) == HEARTBEAT_IVL_MS
            assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == HEARTBEAT_TIMEOUT_MS
        # the message's one frame: prefix, header, padding before each tensor, the tensors
        bound = (1 << 20) + 10 + MAX_HEADER_BYTES + 64 * (MAX_TENSORS + 1)
        assert receiver._socket.getsockopt(zmq.MAXMSGSIZE) == bound
    finally:
        link.close()
        receiver.stop()


def test_frames_pushed_by_a_foreign_socket_that_knows_the_request_id_are_rejected(ctx):
    """Over real ZeroMQ: an intruder knows the request id and the peer's worker id, but not the
    session nonce; nothing it sends is filed, and the peer's real frames still are."""
    import os

    from gpu_worker.dataplane import Expect, session_kinds
    from gpu_worker.zmq_plane import DataPlaneReceiver, ZmqLink
    from hybridiff.wire import encode

    nonce = os.urandom(16)
    box = Mailbox("C")
    box.open("victim", Expect(nonce, "U", session_kinds(False, "nested"), 0, 10))
    receiver = DataPlaneReceiver(ctx, box, "127.0.0.1", 0).start()
    address = f"tcp://127.0.0.1:{receiver.port}"
    intruder = ctx.socket(zmq.PUSH)
    intruder.setsockopt(zmq.LINGER, 2000)
    intruder.connect(address)
    peer = ZmqLink(ctx, "U", address)
    try:
        for kind in (FrameKind.BRANCH_PREDICTION, FrameKind.STAGE_ACTIVATIONS, FrameKind.GUIDED_PREDICTION):
            for session in (b"", os.urandom(16)):
                intruder.send(
                    encode("victim", 0, kind, {"p": torch.full((4,), 666.0)}, sender="U", session=session)
                )
        deadline = time.monotonic() + 30
        while box.rejected < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert box.rejected_by_reason == {"session": 6}
        peer.send("victim", 0, FrameKind.BRANCH_PREDICTION, {"p": torch.ones(4)}, session=nonce)
        got = box.take("victim", FrameKind.BRANCH_PREDICTION, 0, timeout=30)
        assert torch.equal(got.tensors["p"], torch.ones(4)) and got.sender == "U"
        with pytest.raises(PeerTimeout):
            box.take("victim", FrameKind.GUIDED_PREDICTION, 0, timeout=0.1)
    finally:
        intruder.close()
        peer.close()
        receiver.stop()

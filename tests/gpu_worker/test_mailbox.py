"""The worker's data-plane mailbox (gpu_worker.dataplane): messages filed by (request, kind, step)
and taken by the engine, anything malformed or for a request not running rejected, a wait that
ends in PeerTimeout (naming the peer) or Cancelled (the request was closed meanwhile)."""

import threading
import time

import pytest
import torch

from gpu_worker.dataplane import InMemoryLink, Mailbox
from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.internal.v1 import dataplane_pb2 as pb
from hybridiff.wire import FrameKind, encode_frames

PEER = "tcp://10.0.0.2:5555"


def _frames(request_id: str, step: int, kind: int = FrameKind.BRANCH_PREDICTION, value: float = 0.0):
    return encode_frames(request_id, step, kind, {"x": torch.full((2, 3), value)}, sender="peer")


@pytest.fixture
def box():
    mailbox = Mailbox("C")
    mailbox.open("r1")
    return mailbox


def test_messages_are_taken_by_request_kind_and_step(box):
    box.open("r2")
    # Arrival order does not matter: each message is filed under its own key.
    assert box.deliver(_frames("r1", 2, value=2.0))
    assert box.deliver(_frames("r1", 1, value=1.0))
    assert box.deliver(_frames("r1", 1, FrameKind.STAGE_ACTIVATIONS, value=10.0))
    assert box.deliver(_frames("r2", 1, value=-1.0))
    assert box.rejected == 0

    got = box.take("r1", FrameKind.BRANCH_PREDICTION, 1, timeout=1)
    assert (got.request_id, got.kind, got.step, got.sender) == ("r1", FrameKind.BRANCH_PREDICTION, 1, "peer")
    assert torch.equal(got.tensors["x"], torch.full((2, 3), 1.0))
    assert box.take("r1", FrameKind.STAGE_ACTIVATIONS, 1, timeout=1).tensors["x"][0, 0] == 10.0
    assert box.take("r1", FrameKind.BRANCH_PREDICTION, 2, timeout=1).tensors["x"][0, 0] == 2.0
    assert box.take("r2", FrameKind.BRANCH_PREDICTION, 1, timeout=1).tensors["x"][0, 0] == -1.0
    # A message is taken once.
    with pytest.raises(PeerTimeout):
        box.take("r1", FrameKind.BRANCH_PREDICTION, 1, timeout=0.05)


def test_take_waits_for_a_message_delivered_from_another_thread(box):
    timer = threading.Timer(0.05, box.deliver, args=(_frames("r1", 3, value=3.0),))
    timer.start()
    try:
        start = time.monotonic()
        got = box.take("r1", FrameKind.BRANCH_PREDICTION, 3, timeout=5)
        assert got.step == 3 and got.tensors["x"][0, 0] == 3.0
        assert time.monotonic() - start < 2
    finally:
        timer.cancel()


def test_a_message_for_a_request_that_is_not_open_is_rejected(box):
    assert not box.deliver(_frames("other", 1))
    assert box.rejected == 1
    assert not box.is_open("other")
    # Nothing was filed: even once the request opens, the message is not there.
    box.open("other")
    with pytest.raises(PeerTimeout):
        box.take("other", FrameKind.BRANCH_PREDICTION, 1, timeout=0.05)
    # The open request is not disturbed.
    assert box.deliver(_frames("r1", 1))
    assert box.rejected == 1


def _malformed(case: str) -> list:
    good = [bytes(f) for f in _frames("r1", 1)]
    header = pb.TensorFrameHeader.FromString(good[0])
    if case == "garbage_header":
        return [b"\xff\xff\xff not a header", good[1]]
    if case == "missing_buffer":
        return good[:1]
    if case == "extra_buffer":
        return [*good, b"\x00" * 4]
    if case == "short_buffer":
        return [good[0], good[1][:-4]]
    if case == "unknown_kind":
        header.kind = pb.FRAME_KIND_UNSPECIFIED
    elif case == "wrong_version":
        header.version = 99
    elif case == "no_request_id":
        header.request_id = ""
    return [header.SerializeToString(), good[1]]


@pytest.mark.parametrize(
    "case",
    [
        "garbage_header",
        "missing_buffer",
        "extra_buffer",
        "short_buffer",
        "unknown_kind",
        "wrong_version",
        "no_request_id",
    ],
)
def test_malformed_frames_are_rejected(box, case):
    assert not box.deliver(_malformed(case))
    assert not box.deliver([])
    assert box.rejected == 2
    with pytest.raises(PeerTimeout):
        box.take("r1", FrameKind.BRANCH_PREDICTION, 1, timeout=0.05)


def test_take_times_out_naming_the_peer(box):
    start = time.monotonic()
    with pytest.raises(PeerTimeout) as failure:
        box.take("r1", FrameKind.STAGE_RETURN, 4, timeout=0.2, peer=PEER)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 2
    assert failure.value.metadata == {"peer": PEER}
    assert PEER in str(failure.value) and "step 4" in str(failure.value)
    # The request stays open: a later message is still accepted.
    assert box.is_open("r1") and box.deliver(_frames("r1", 4, FrameKind.STAGE_RETURN))


def test_take_without_a_peer_name_still_times_out(box):
    with pytest.raises(PeerTimeout) as failure:
        box.take("r1", FrameKind.BRANCH_PREDICTION, 0, timeout=0.05)
    assert failure.value.metadata == {"peer": ""} and "(unknown)" in str(failure.value)


def test_take_on_a_request_closed_meanwhile_is_cancelled_promptly(box):
    timer = threading.Timer(0.1, box.close, args=("r1",))  # what the Session's cancel callback does
    timer.start()
    try:
        start = time.monotonic()
        with pytest.raises(Cancelled, match="closed while waiting for step 2"):
            box.take("r1", FrameKind.BRANCH_PREDICTION, 2, timeout=30, peer=PEER)
        assert time.monotonic() - start < 2
    finally:
        timer.cancel()


def test_take_on_a_request_that_is_not_open_is_cancelled_at_once(box):
    start = time.monotonic()
    with pytest.raises(Cancelled):
        box.take("never-opened", FrameKind.BRANCH_PREDICTION, 0, timeout=30)
    assert time.monotonic() - start < 1


def test_close_drops_unread_messages_of_that_request_only(box):
    box.open("r2")
    assert box.deliver(_frames("r1", 1))
    assert box.deliver(_frames("r1", 2, FrameKind.STAGE_ACTIVATIONS))
    assert box.deliver(_frames("r2", 1, value=5.0))
    box.close("r1")
    assert not box.is_open("r1")
    assert box.take("r2", FrameKind.BRANCH_PREDICTION, 1, timeout=1).tensors["x"][0, 0] == 5.0
    box.close("r1")  # closing twice is harmless
    box.open("r1")
    for kind, step in ((FrameKind.BRANCH_PREDICTION, 1), (FrameKind.STAGE_ACTIVATIONS, 2)):
        with pytest.raises(PeerTimeout):
            box.take("r1", kind, step, timeout=0.02)


def test_a_stale_frame_does_not_reach_a_later_session_of_the_same_request_id(box):
    assert box.deliver(_frames("r1", 7, value=1.0))  # read by nobody: the request was aborted
    box.close("r1")
    assert not box.deliver(_frames("r1", 8, value=1.0))  # a straggler after the close
    assert box.rejected == 1

    box.open("r1")  # the same request id runs again (e.g. resumed here)
    for step in (7, 8):
        with pytest.raises(PeerTimeout):
            box.take("r1", FrameKind.BRANCH_PREDICTION, step, timeout=0.05)
    assert box.deliver(_frames("r1", 7, value=2.0))
    assert box.take("r1", FrameKind.BRANCH_PREDICTION, 7, timeout=1).tensors["x"][0, 0] == 2.0


def test_in_memory_link_round_trip_with_bf16():
    u_box, c_box = Mailbox("U"), Mailbox("C")
    c_box.open("r")
    link = InMemoryLink("U", c_box)
    tensors = {
        "prediction": torch.randn(1, 4, 8, 8).to(torch.bfloat16),
        "activations": torch.randn(2, 16, dtype=torch.float16).t(),  # not contiguous
        "timestep": torch.tensor([999], dtype=torch.int64),
    }
    sent = {name: t.clone() for name, t in tensors.items()}
    nbytes = link.send("r", 3, FrameKind.STAGE_ACTIVATIONS, tensors, trace_context={"traceparent": "00-ab"})

    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload < nbytes < payload + 1024  # the tensors plus a small header

    # The sender reuses its buffers at once: the peer's copy must not change.
    for t in tensors.values():
        t.zero_()

    got = c_box.take("r", FrameKind.STAGE_ACTIVATIONS, 3, timeout=1)
    assert got.sender == "U" and got.trace_context == {"traceparent": "00-ab"}
    assert list(got.tensors) == list(sent)
    for name, t in sent.items():
        assert got.tensors[name].dtype == t.dtype and got.tensors[name].shape == t.shape
        assert torch.equal(got.tensors[name], t)
    assert got.nbytes == payload
    assert u_box.rejected == 0 and c_box.rejected == 0


def test_in_memory_link_to_a_peer_without_the_request_is_rejected_there():
    c_box = Mailbox("C")
    link = InMemoryLink("U", c_box)
    link.send("r", 0, FrameKind.BRANCH_PREDICTION, {"p": torch.ones(2, dtype=torch.bfloat16)})
    assert c_box.rejected == 1
    link.close()

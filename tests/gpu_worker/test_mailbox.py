"""The worker's data-plane mailbox (gpu_worker.dataplane): messages filed by (request, kind, step)
and taken by the engine; anything malformed, for a request not running, of another attempt
(nonce), from another sender, of a kind or step the session cannot expect, a duplicate, or past
the session's caps is rejected before its payload is copied; a wait ends in PeerTimeout (naming
the peer) or Cancelled (the request was closed meanwhile)."""

import logging
import os
import threading
import time

import pytest
import torch

import gpu_worker.dataplane as dataplane
from gpu_worker.dataplane import STEPS_AHEAD, Expect, InMemoryLink, Mailbox, session_kinds
from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.internal.v1 import dataplane_pb2 as pb
from hybridiff.wire import ALIGN, MAGIC, PREFIX, FrameKind, encode

PEER = "tcp://10.0.0.2:5555"
NONCE = b"n" * 16
ALL_KINDS = frozenset(
    (
        FrameKind.BRANCH_PREDICTION,
        FrameKind.STAGE_ACTIVATIONS,
        FrameKind.STAGE_RETURN,
        FrameKind.GUIDED_PREDICTION,
    )
)


def _expect(nonce: bytes = NONCE, peer: str = "peer", kinds=ALL_KINDS, first: int = 0, end: int = 50):
    return Expect(nonce=nonce, peer=peer, kinds=frozenset(kinds), first_step=first, end_step=end)


def _frames(
    request_id: str,
    step: int,
    kind: int = FrameKind.BRANCH_PREDICTION,
    value: float = 0.0,
    session: bytes = NONCE,
    sender: str = "peer",
):
    return encode(request_id, step, kind, {"x": torch.full((2, 3), value)}, sender=sender, session=session)


def _forge(header: pb.TensorFrameHeader, payload: bytes) -> bytes:
    """A frame of any header and payload (a forger's)."""
    data = header.SerializeToString()
    lead = PREFIX.pack(MAGIC, 2, len(data)) + data
    return lead + b"\0" * (-len(lead) % ALIGN) + payload


def _split(frame) -> tuple[pb.TensorFrameHeader, bytes]:
    raw = bytes(frame)
    n = PREFIX.unpack(raw[: PREFIX.size])[2]
    return pb.TensorFrameHeader.FromString(raw[PREFIX.size : PREFIX.size + n]), raw[
        -(-(PREFIX.size + n) // ALIGN) * ALIGN :
    ]


@pytest.fixture
def box():
    mailbox = Mailbox("C")
    mailbox.open("r1", _expect())
    return mailbox


def test_messages_are_taken_by_request_kind_and_step(box):
    box.open("r2", _expect())
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
    timer = threading.Timer(0.05, box.deliver, args=(_frames("r1", 2, value=3.0),))
    timer.start()
    try:
        start = time.monotonic()
        got = box.take("r1", FrameKind.BRANCH_PREDICTION, 2, timeout=5)
        assert got.step == 2 and got.tensors["x"][0, 0] == 3.0
        assert time.monotonic() - start < 2
    finally:
        timer.cancel()


def test_a_message_for_a_request_that_is_not_open_is_rejected(box):
    assert not box.deliver(_frames("other", 1))
    assert box.rejected == 1
    assert not box.is_open("other")
    # Nothing was filed: even once the request opens, the message is not there.
    box.open("other", _expect())
    with pytest.raises(PeerTimeout):
        box.take("other", FrameKind.BRANCH_PREDICTION, 1, timeout=0.05)
    # The open request is not disturbed.
    assert box.deliver(_frames("r1", 1))
    assert box.rejected == 1


def _malformed(case: str) -> bytes:
    header, payload = _split(_frames("r1", 1))
    if case == "garbage_header":
        return b"\xff\xff\xff not a header" + payload
    if case == "missing_buffer":
        return _forge(header, b"")
    if case == "extra_buffer":
        return _forge(header, payload + b"\x00" * 4)
    if case == "short_buffer":
        return _forge(header, payload[:-4])
    if case == "offset_outside":
        header.tensors[0].offset = 1 << 40
    elif case == "unknown_kind":
        header.kind = pb.FRAME_KIND_UNSPECIFIED
    elif case == "wrong_version":
        header.version = 99
    elif case == "no_request_id":
        header.request_id = ""
    return _forge(header, payload)


@pytest.mark.parametrize(
    "case",
    [
        "garbage_header",
        "missing_buffer",
        "extra_buffer",
        "short_buffer",
        "offset_outside",
        "unknown_kind",
        "wrong_version",
        "no_request_id",
    ],
)
def test_malformed_frames_are_rejected(box, case):
    assert not box.deliver(_malformed(case))
    assert not box.deliver(b"")
    assert box.rejected == 2
    with pytest.raises(PeerTimeout):
        box.take("r1", FrameKind.BRANCH_PREDICTION, 1, timeout=0.05)


def test_take_times_out_naming_the_peer(box):
    start = time.monotonic()
    with pytest.raises(PeerTimeout) as failure:
        box.take("r1", FrameKind.STAGE_RETURN, 2, timeout=0.2, peer=PEER)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 2
    assert failure.value.metadata == {"peer": PEER}
    assert PEER in str(failure.value) and "step 2" in str(failure.value)
    # The request stays open: a later message is still accepted.
    assert box.is_open("r1") and box.deliver(_frames("r1", 2, FrameKind.STAGE_RETURN))


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
    box.open("r2", _expect())
    assert box.deliver(_frames("r1", 1))
    assert box.deliver(_frames("r1", 2, FrameKind.STAGE_ACTIVATIONS))
    assert box.deliver(_frames("r2", 1, value=5.0))
    box.close("r1")
    assert not box.is_open("r1")
    assert box.take("r2", FrameKind.BRANCH_PREDICTION, 1, timeout=1).tensors["x"][0, 0] == 5.0
    box.close("r1")  # closing twice is harmless
    box.open("r1", _expect())
    for kind, step in ((FrameKind.BRANCH_PREDICTION, 1), (FrameKind.STAGE_ACTIVATIONS, 2)):
        with pytest.raises(PeerTimeout):
            box.take("r1", kind, step, timeout=0.02)


def test_a_stale_frame_does_not_reach_a_later_session_of_the_same_request_id():
    box = Mailbox("C")
    old, new = os.urandom(16), os.urandom(16)
    box.open("r1", _expect(nonce=old, first=6))
    assert box.deliver(_frames("r1", 7, value=1.0, session=old))  # read by nobody: the request was aborted
    box.close("r1")
    assert not box.deliver(_frames("r1", 8, value=1.0, session=old))  # a straggler after the close
    assert box.rejected_by_reason == {"unknown_request": 1}

    box.open("r1", _expect(nonce=new, first=7))  # the same request id runs again (resumed here)
    # Frames of the aborted attempt still in flight: same request id, same sender, steps the
    # new session expects, but the old nonce.
    for step in (7, 8):
        assert not box.deliver(_frames("r1", step, value=1.0, session=old))
    assert box.rejected_by_reason["session"] == 2
    for step in (7, 8):
        with pytest.raises(PeerTimeout):
            box.take("r1", FrameKind.BRANCH_PREDICTION, step, timeout=0.05)
    assert box.deliver(_frames("r1", 7, value=2.0, session=new))
    assert box.take("r1", FrameKind.BRANCH_PREDICTION, 7, timeout=1).tensors["x"][0, 0] == 2.0


def test_in_memory_link_round_trip_with_bf16():
    u_box, c_box = Mailbox("U"), Mailbox("C")
    c_box.open("r", _expect(peer="U"))
    link = InMemoryLink("U", c_box)
    tensors = {
        "prediction": torch.randn(1, 4, 8, 8).to(torch.bfloat16),
        "activations": torch.randn(2, 16, dtype=torch.float16).t(),  # not contiguous
        "timestep": torch.tensor([999], dtype=torch.int64),
    }
    sent = {name: t.clone() for name, t in tensors.items()}
    nbytes = link.send(
        "r", 2, FrameKind.STAGE_ACTIVATIONS, tensors, trace_context={"traceparent": "00-ab"}, session=NONCE
    ).nbytes

    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload < nbytes < payload + 1024  # the tensors plus a small header

    # The sender reuses its buffers at once: the peer's copy must not change.
    for t in tensors.values():
        t.zero_()

    got = c_box.take("r", FrameKind.STAGE_ACTIVATIONS, 2, timeout=1)
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
    link.send("r", 0, FrameKind.BRANCH_PREDICTION, {"p": torch.ones(2, dtype=torch.bfloat16)}, session=NONCE)
    assert c_box.rejected == 1
    link.close()


# --- frames bound to one attempt (docs/design.md section 9) ---------------------------------


def _refused(box: Mailbox, frames, reason: str) -> None:
    before = box.rejected_by_reason[reason]
    assert not box.deliver(frames)
    assert box.rejected_by_reason[reason] == before + 1, dict(box.rejected_by_reason)


@pytest.mark.parametrize("forged", [b"", b"x" * 16, NONCE[:-1], NONCE + b"\x00"])
def test_a_frame_without_this_attempts_nonce_is_rejected(box, forged):
    _refused(box, _frames("r1", 0, value=9.0, session=forged), "session")
    with pytest.raises(PeerTimeout):
        box.take("r1", FrameKind.BRANCH_PREDICTION, 0, timeout=0.05)
    assert box.deliver(_frames("r1", 0, value=1.0))
    assert box.take("r1", FrameKind.BRANCH_PREDICTION, 0, timeout=1).tensors["x"][0, 0] == 1.0


def test_a_frame_from_another_sender_is_rejected(box):
    _refused(box, _frames("r1", 0, value=9.0, sender="intruder"), "sender")
    _refused(box, _frames("r1", 0, value=9.0, sender="C"), "sender")  # our own name
    assert box.held("r1") == 0


def test_a_kind_the_session_never_receives_is_rejected():
    box = Mailbox("U")
    # Stage 1 of a sequential (DiT) split receives branch predictions and guided predictions only.
    box.open("r", _expect(kinds=session_kinds(True, "sequential")))
    _refused(box, _frames("r", 0, FrameKind.STAGE_ACTIVATIONS), "kind")
    _refused(box, _frames("r", 0, FrameKind.STAGE_RETURN), "kind")
    assert box.deliver(_frames("r", 0, FrameKind.GUIDED_PREDICTION))
    assert box.deliver(_frames("r", 0, FrameKind.BRANCH_PREDICTION))


def test_session_kinds_follow_role_and_topology():
    bp, sa, sr, gp = (
        FrameKind.BRANCH_PREDICTION,
        FrameKind.STAGE_ACTIVATIONS,
        FrameKind.STAGE_RETURN,
        FrameKind.GUIDED_PREDICTION,
    )
    assert session_kinds(True, "sequential") == {bp, gp}
    assert session_kinds(False, "sequential") == {bp, sa}
    assert session_kinds(True, "nested") == {bp, sr}
    assert session_kinds(False, "nested") == {bp, sa, gp}


def test_steps_outside_what_the_session_can_expect_are_rejected():
    box = Mailbox("C")
    box.open("r", _expect(first=5, end=12))
    _refused(box, _frames("r", 4), "step")  # before the first step of this attempt
    _refused(box, _frames("r", 5 + STEPS_AHEAD + 1), "step")  # too far ahead of our progress
    assert box.deliver(_frames("r", 5))
    assert box.deliver(_frames("r", 5 + STEPS_AHEAD))
    box.take("r", FrameKind.BRANCH_PREDICTION, 5, timeout=1)
    _refused(box, _frames("r", 5), "step")  # already taken: a replay
    # Progress moved: one more step ahead is acceptable now.
    assert box.deliver(_frames("r", 6 + STEPS_AHEAD))
    # Never past the last step of the request.
    short = Mailbox("C")
    short.open("r", _expect(first=5, end=6))
    _refused(short, _frames("r", 6), "step")
    assert short.deliver(_frames("r", 5))


def test_the_pipeline_pattern_of_a_peer_running_ahead_is_accepted():
    """Stage 2 of a sequential split: the fill step's activations are taken once and reused at
    the next step; then each step takes the previous step's, while stage 1 already sent the
    current one and, after our prediction, the next: the peer is STEPS_AHEAD ahead of us."""
    box = Mailbox("C")
    box.open("r", _expect(kinds=session_kinds(False, "sequential"), end=12))
    act = FrameKind.STAGE_ACTIVATIONS
    for step in (0, 1, 2):  # data-parallel steps; the peer may be one ahead
        assert box.deliver(_frames("r", step))
        if step:
            box.take("r", FrameKind.BRANCH_PREDICTION, step - 1, timeout=1)
    box.take("r", FrameKind.BRANCH_PREDICTION, 2, timeout=1)
    assert box.deliver(_frames("r", 3, act))  # fill step 3
    box.take("r", act, 3, timeout=1)
    assert box.deliver(_frames("r", 4, act))  # step 4 reuses 3's activations: nothing taken
    assert box.deliver(_frames("r", 5, act))  # the peer got our step-4 prediction and moved on
    for step in range(5, 11):
        box.take("r", act, step - 1, timeout=1)
        assert box.deliver(_frames("r", step + 1, act))
    # After the window the pair is back in data parallel while our progress lags by one step.
    assert box.deliver(_frames("r", 11))
    assert box.rejected == 0


def test_a_held_frame_is_never_overwritten(box):
    assert box.deliver(_frames("r1", 1, value=1.0))
    _refused(box, _frames("r1", 1, value=666.0), "duplicate")
    assert box.take("r1", FrameKind.BRANCH_PREDICTION, 1, timeout=1).tensors["x"][0, 0] == 1.0
    _refused(box, _frames("r1", 1, value=666.0), "step")  # and once taken, never again


def test_a_solo_session_accepts_nothing():
    box = Mailbox("U")
    box.open("r")
    for kind in sorted(ALL_KINDS):
        _refused(box, _frames("r", 0, kind), "solo")
    assert box.is_open("r") and box.held("r") == 0


def test_a_session_holds_a_bounded_number_of_messages_and_bytes():
    box = Mailbox("C", max_held=3)
    box.open("r", _expect())
    kinds = sorted(ALL_KINDS)
    for kind in kinds[:3]:
        assert box.deliver(_frames("r", 0, kind))
    _refused(box, _frames("r", 0, kinds[3]), "cap")
    box.take("r", kinds[0], 0, timeout=1)
    assert box.deliver(_frames("r", 0, kinds[3]))  # room again

    payload = 2 * 3 * 4  # one (2, 3) float32 tensor
    small = Mailbox("C", max_held_bytes=2 * payload)
    small.open("r", _expect())
    assert small.deliver(_frames("r", 0, kinds[0])) and small.deliver(_frames("r", 0, kinds[1]))
    _refused(small, _frames("r", 0, kinds[2]), "cap")


def test_a_message_over_the_receivers_bound_is_refused_on_its_header():
    box = Mailbox("C", max_message_bytes=64)
    box.open("r", _expect())
    big = encode("r", 0, FrameKind.BRANCH_PREDICTION, {"x": torch.zeros(17)}, sender="peer", session=NONCE)
    _refused(box, big, "size")
    assert box.deliver(_frames("r", 0))  # 24 bytes: within the bound


def test_refused_frames_are_never_decoded(monkeypatch):
    """The header is checked first: a refused message's buffers are never copied into tensors."""
    decoded = []
    real = dataplane.decode_payload
    monkeypatch.setattr(dataplane, "decode_payload", lambda *a, **k: decoded.append(1) or real(*a, **k))
    box = Mailbox("C", max_message_bytes=1 << 20)
    box.open("r", _expect(end=10))
    box.open("solo")
    header, payload = _split(_frames("r", 0))
    header.tensors[0].shape[:] = [1 << 20]
    header.tensors[0].nbytes = 4 << 20
    outside, _ = _split(_frames("r", 0))
    outside.tensors[0].offset = 64  # its bytes would end past the frame
    forged = [
        _frames("r", 0, session=b"forged-nonce-000"),
        _frames("r", 0, sender="intruder"),
        _frames("r", 9),
        _frames("nope", 0),
        _frames("solo", 0),
        _forge(header, b"\x00" * (4 << 20)),  # over the bound
        PREFIX.pack(MAGIC, 2, 100 * 1024) + b"\x0a" * (100 * 1024),  # a header far larger than any
        _forge(outside, payload),  # a declared offset outside the frame
    ]
    for frames in forged:
        assert not box.deliver(frames)
    assert decoded == [] and box.rejected == len(forged)
    assert box.deliver(_frames("r", 0)) and decoded == [1]


def test_rejections_are_counted_by_reason_and_logged_at_a_bounded_rate(caplog):
    from gpu_worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    box = Mailbox("C", metrics=metrics)
    box._warnings.interval = 0.3
    box.open("r", _expect())
    with caplog.at_level(logging.WARNING, logger="gpu_worker.dataplane"):
        for _ in range(200):
            box.deliver(_frames("r", 0, session=b"forged-nonce-000"))
        box.deliver(_frames("r", 0, sender="intruder"))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2  # one per reason, not one per frame
        assert "(session)" in lines[0] and "(sender)" in lines[1]
        time.sleep(0.35)
        box.deliver(_frames("r", 0, session=b"forged-nonce-000"))
        assert "199 more like it" in caplog.records[-1].getMessage()
    assert metrics.rejected_frames.labels("session")._value.get() == 201
    assert metrics.rejected_frames.labels("sender")._value.get() == 1
    assert box.rejected_by_reason == {"session": 201, "sender": 1}


def test_a_frame_in_flight_when_its_request_is_cancelled_is_dropped_without_a_warning(caplog):
    box = Mailbox("C")
    box.open("r1", _expect())
    box.close("r1")  # the request was cancelled: the peer's next frame is already on its way
    with caplog.at_level(logging.DEBUG, logger="gpu_worker.dataplane"):
        assert not box.deliver(_frames("r1", 3))
    assert box.rejected_by_reason == {"unknown_request": 1}  # still counted
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    caplog.clear()
    # Not the closed session's frame (another nonce, another sender, an id never opened): a warning.
    with caplog.at_level(logging.WARNING, logger="gpu_worker.dataplane"):
        assert not box.deliver(_frames("r1", 4, session=b"x" * 16))
        assert not box.deliver(_frames("r2", 4))
    assert box.rejected_by_reason == {"unknown_request": 3}
    assert caplog.records and all(r.levelno == logging.WARNING for r in caplog.records)

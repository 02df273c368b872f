"""The data-plane wire format: one frame per message (prefix, header, 64-byte aligned payload)."""

import struct

import pytest
import torch

from hybridiff.codegen import assert_fresh
from hybridiff.internal.v1 import dataplane_pb2 as pb
from hybridiff.wire import (
    ALIGN,
    HEADER_ROOM,
    MAGIC,
    PREFIX,
    WIRE_VERSION,
    FrameError,
    FrameKind,
    FrameSizeError,
    Payload,
    decode,
    decode_payload,
    encode,
    parse_header,
    tensor_from_proto,
    tensor_to_proto,
)


def _parts(frame) -> tuple[pb.TensorFrameHeader, bytes]:
    """The header of ``frame`` and its payload bytes."""
    raw = bytes(frame)
    _, _, n = PREFIX.unpack(raw[: PREFIX.size])
    start = -(-(PREFIX.size + n) // ALIGN) * ALIGN
    return pb.TensorFrameHeader.FromString(raw[PREFIX.size : PREFIX.size + n]), raw[start:]


def _frame(
    header: pb.TensorFrameHeader, payload: bytes, magic: bytes = MAGIC, version: int = WIRE_VERSION
) -> bytes:
    """A frame of any header and payload, checked or not (a forger's)."""
    data = header.SerializeToString()
    lead = PREFIX.pack(magic, version, len(data)) + data
    return lead + b"\0" * (-len(lead) % ALIGN) + payload


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool],
)
def test_round_trip_dtypes(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(dtype)
    frame = encode("r1", 7, FrameKind.BRANCH_PREDICTION, {"x": t}, {"traceparent": "00-abc"}, sender="U")
    msg = decode(frame)
    assert msg.request_id == "r1" and msg.step == 7 and msg.kind == FrameKind.BRANCH_PREDICTION
    assert msg.sender == "U" and msg.trace_context == {"traceparent": "00-abc"}
    assert msg.tensors["x"].dtype == dtype and torch.equal(msg.tensors["x"], t)
    assert torch.equal(decode(bytes(frame)).tensors["x"], t)


def test_one_frame_with_aligned_declared_offsets():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    nc = base.t()
    assert not nc.is_contiguous()
    tensors = {"a": nc, "b": torch.empty(0, 3, dtype=torch.float16), "c": torch.ones(5, dtype=torch.int64)}
    frame = encode("r", 0, FrameKind.STAGE_ACTIVATIONS, tensors)
    header, payload = _parts(frame)
    assert [(t.offset, t.nbytes) for t in header.tensors] == [(0, 96), (128, 0), (128, 40)]
    assert len(payload) == 168 and payload[96:128] == b"\0" * 32  # padding is zeros, never stale memory
    msg = decode(frame)
    assert torch.equal(msg.tensors["a"], nc) and msg.tensors["b"].shape == (0, 3)
    assert torch.equal(msg.tensors["c"], tensors["c"]) and list(msg.tensors) == ["a", "b", "c"]
    empty = encode("r", 0, FrameKind.STAGE_ACTIVATIONS, {})
    assert decode(empty).tensors == {} and len(empty) == ALIGN  # prefix + header, padded


def test_an_aligned_writable_frame_is_viewed_any_other_copied_once():
    t = torch.arange(1000, dtype=torch.float32)
    frame = encode("r", 0, FrameKind.GUIDED_PREDICTION, {"p": t})
    start = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
    assert start % ALIGN == 0
    viewed = decode(frame).tensors["p"]
    assert start <= viewed.data_ptr() < start + len(frame) and viewed.data_ptr() % ALIGN == 0
    # the view keeps the frame's memory alive after every other reference is gone
    del frame
    assert torch.equal(viewed, t)
    raw = bytes(encode("r", 0, FrameKind.GUIDED_PREDICTION, {"p": t}))
    for buf in (raw, bytearray(b"\0" + raw)[1:]):  # read-only; writable but (almost surely) unaligned
        copy = bytearray(buf)
        out = decode(copy if isinstance(buf, bytes) else memoryview(bytearray(b"\0" + raw))[1:]).tensors["p"]
        assert torch.equal(out, t)
    owned = bytearray(b"\0" * 8 + raw)  # writable, 8 bytes off alignment: copied, not viewed
    out = decode(memoryview(owned)[8:]).tensors["p"]
    owned[:] = b"\0" * len(owned)
    assert torch.equal(out, t)


def test_decoded_tensor_of_read_only_bytes_owns_its_memory():
    t = torch.ones(4)
    out = decode(bytes(encode("r", 0, FrameKind.GUIDED_PREDICTION, {"p": t}))).tensors["p"]
    out.add_(1)  # writable
    assert torch.equal(out, t + 1)


def _good() -> tuple[pb.TensorFrameHeader, bytes]:
    return _parts(encode("r", 1, FrameKind.BRANCH_PREDICTION, {"x": torch.zeros(2, 2), "y": torch.ones(3)}))


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "short",
        "magic",
        "prefix_version",
        "version",
        "kind",
        "dtype",
        "no_id",
        "header_overrun",
        "huge_header",
    ],
)
def test_rejects_malformed(case):
    h, payload = _good()
    if case == "garbage":
        frame = b"\xff\xff\xff not a frame at all"
    elif case == "short":
        frame = MAGIC
    elif case == "magic":
        frame = _frame(h, payload, magic=b"HTTP")
    elif case == "prefix_version":
        frame = _frame(h, payload, version=1)
    elif case == "header_overrun":
        frame = PREFIX.pack(MAGIC, WIRE_VERSION, 1000) + h.SerializeToString()
    elif case == "huge_header":
        frame = PREFIX.pack(MAGIC, WIRE_VERSION, 64 * 1024 + 1) + b"\x0a" * (64 * 1024 + 1)
    else:
        if case == "version":
            h.version = 99
        elif case == "kind":
            h.kind = 42
        elif case == "dtype":
            h.tensors[0].dtype = 77
        elif case == "no_id":
            h.request_id = ""
        frame = _frame(h, payload)
    with pytest.raises(FrameError):
        decode(frame)


def test_the_prefix_is_fixed_little_endian():
    frame = bytes(encode("r", 1, FrameKind.BRANCH_PREDICTION, {"x": torch.zeros(2)}))
    magic, version, n = struct.unpack("<4sHI", frame[:10])
    assert (magic, version, PREFIX.size) == (b"HYDP", 2, 10) and 0 < n < 200


@pytest.mark.parametrize(
    "case, match",
    [
        ("outside", "offset 1099511627776, expected 64"),
        ("overlap", "expected 64"),
        ("unaligned", "expected 64"),
        ("gap", "expected 64"),
        ("order", "expected 0"),
        ("truncated", "lie outside"),
        ("trailing", "accounts for"),
        ("nbytes", "needs 12 bytes"),
    ],
)
def test_offsets_outside_or_overlapping_are_refused_before_the_payload(case, match):
    h, payload = _good()
    assert [(t.offset, t.nbytes) for t in h.tensors] == [(0, 16), (64, 12)]
    if case == "outside":
        h.tensors[1].offset = 1 << 40
    elif case == "overlap":
        h.tensors[1].offset = 0
    elif case == "unaligned":
        h.tensors[1].offset = 65
    elif case == "gap":
        h.tensors[1].offset = 128
    elif case == "order":
        h.tensors[0].offset, h.tensors[1].offset = 64, 0
    elif case == "truncated":
        payload = payload[:-4]
    elif case == "trailing":
        payload += b"\0" * 64
    elif case == "nbytes":
        h.tensors[1].nbytes = 8
    frame = _frame(h, payload)
    with pytest.raises(FrameSizeError, match=match):
        parse_header(frame)


def test_parse_header_reads_no_payload_byte():
    """The checks need only the prefix and header: a frame whose payload memory cannot even be
    read (a stand-in buffer raising on access past the header) is judged all the same."""
    h, payload = _good()
    frame = _frame(h, payload)
    parsed = parse_header(frame)
    assert parsed.nbytes == 28 and parsed.header.request_id == "r"
    lead = len(frame) - len(payload)
    # the header alone, padded out with nothing: declared bytes lie outside
    with pytest.raises(FrameSizeError, match="lie outside"):
        parse_header(frame[:lead])
    with pytest.raises(FrameSizeError, match="exceeds this receiver's 20-byte limit"):
        parse_header(frame, max_message_bytes=20)
    msg = decode_payload(parsed, frame)
    assert torch.equal(msg.tensors["y"], torch.ones(3))


def test_a_header_declaring_a_huge_tensor_is_refused_before_anything_is_allocated():
    h = pb.TensorFrameHeader(
        version=WIRE_VERSION, request_id="r", step=0, kind=pb.FRAME_KIND_BRANCH_PREDICTION
    )
    h.tensors.add(name="x", dtype=pb.ELEMENT_TYPE_FLOAT32, shape=[1 << 40, 1 << 20], nbytes=1 << 62)
    with pytest.raises(FrameSizeError, match="exceeds"):
        parse_header(_frame(h, b"\0" * 8))
    many = pb.TensorFrameHeader(
        version=WIRE_VERSION, request_id="r", step=0, kind=pb.FRAME_KIND_BRANCH_PREDICTION
    )
    for i in range(65):
        many.tensors.add(name=f"t{i}", dtype=pb.ELEMENT_TYPE_UINT8, shape=[0], nbytes=0)
    with pytest.raises(FrameSizeError, match="limit of 64"):
        parse_header(_frame(many, b""))


def test_unknown_dtype_never_pickled():
    with pytest.raises(FrameError):
        encode("r", 0, FrameKind.BRANCH_PREDICTION, {"c": torch.zeros(2, dtype=torch.complex64)})


def test_a_sealed_payload_is_the_very_frame_encode_makes():
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 4).to(torch.bfloat16), "c": torch.tensor(True)}
    specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    buffer = torch.full((Payload.buffer_bytes(list(specs.values())),), 0xEE, dtype=torch.uint8)
    payload = Payload(buffer, specs)
    payload.zero_padding()
    for k, v in tensors.items():
        payload[k].copy_(v)
    meta = ("r", 3, FrameKind.STAGE_ACTIVATIONS, {"traceparent": "00-x"}, "U", b"n" * 16)
    frame = payload.seal(*meta)
    assert bytes(frame) == bytes(encode(*meta[:3], tensors, *meta[3:]))
    assert torch.frombuffer(frame, dtype=torch.uint8).data_ptr() % ALIGN == 0
    buffer[HEADER_ROOM] += 1  # the frame is the buffer itself, no copy
    assert decode(frame).tensors["a"].view(torch.uint8).view(-1)[0] == buffer[HEADER_ROOM]
    assert payload.seal("r", 3, FrameKind.STAGE_ACTIVATIONS, {"t": "x" * HEADER_ROOM}) is None  # no room
    payload["a"] = torch.zeros(3, 5)  # no longer the payload's own view
    assert payload.seal(*meta) is None


def test_generated_code_matches_protos():
    assert_fresh()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_inline_tensor_round_trip(dtype):
    t = (torch.randn(1, 4, 3, 3) * 5).to(dtype)
    msg = tensor_to_proto(t.transpose(2, 3), "latents")
    back = tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t.transpose(2, 3))


def test_inline_tensor_with_wrong_size_is_rejected():
    msg = tensor_to_proto(torch.zeros(2, 2), "x")
    msg.data = msg.data[:-4]
    with pytest.raises(FrameError, match="needs 16 bytes"):
        tensor_from_proto(msg)


def test_session_nonce_round_trip():
    frame = encode(
        "r", 3, FrameKind.GUIDED_PREDICTION, {"p": torch.ones(2)}, sender="U", session=b"\x01" * 16
    )
    msg = decode(frame)
    assert msg.session == b"\x01" * 16 and msg.sender == "U"

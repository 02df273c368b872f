import pytest
import torch

from hybridiff.codegen import assert_fresh
from hybridiff.internal.v1 import dataplane_pb2 as pb
from hybridiff.wire import (
    FrameError,
    FrameKind,
    decode_frames,
    encode_frames,
    tensor_from_proto,
    tensor_to_proto,
)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool],
)
def test_round_trip_dtypes(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(dtype)
    frames = encode_frames(
        "r1", 7, FrameKind.BRANCH_PREDICTION, {"x": t}, {"traceparent": "00-abc"}, sender="U"
    )
    msg = decode_frames(frames)
    assert msg.request_id == "r1" and msg.step == 7 and msg.kind == FrameKind.BRANCH_PREDICTION
    assert msg.sender == "U" and msg.trace_context == {"traceparent": "00-abc"}
    assert msg.tensors["x"].dtype == dtype and torch.equal(msg.tensors["x"], t)


def test_non_contiguous_and_empty_and_multiple():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    nc = base.t()
    assert not nc.is_contiguous()
    empty = torch.empty(0, 3, dtype=torch.float16)
    frames = encode_frames("r", 0, FrameKind.STAGE_ACTIVATIONS, {"a": nc, "b": empty})
    assert len(frames) == 3
    msg = decode_frames(frames)
    assert torch.equal(msg.tensors["a"], nc) and msg.tensors["b"].shape == (0, 3)
    assert list(msg.tensors) == ["a", "b"]


def test_decoded_tensor_owns_its_memory():
    t = torch.ones(4)
    frames = [bytes(f) for f in encode_frames("r", 0, FrameKind.GUIDED_PREDICTION, {"p": t})]
    buf = bytearray(frames[1])
    msg = decode_frames([frames[0], buf])
    buf[:] = b"\x00" * len(buf)
    assert torch.equal(msg.tensors["p"], t)


def _header(**kw) -> bytes:
    h = pb.TensorFrameHeader(version=1, request_id="r", step=1, kind=pb.BRANCH_PREDICTION)
    for k, v in kw.items():
        setattr(h, k, v)
    return h


@pytest.mark.parametrize("case", ["garbage", "version", "kind", "count", "size", "dtype", "no_id", "empty"])
def test_rejects_malformed(case):
    good = encode_frames("r", 1, FrameKind.BRANCH_PREDICTION, {"x": torch.zeros(2, 2)})
    h = pb.TensorFrameHeader()
    h.ParseFromString(bytes(good[0]))
    frames = [bytes(f) for f in good]
    if case == "garbage":
        frames[0] = b"\xff\xff\xff not a header"
    elif case == "version":
        h.version = 99
        frames[0] = h.SerializeToString()
    elif case == "kind":
        h.kind = 42
        frames[0] = h.SerializeToString()
    elif case == "count":
        frames.append(b"extra")
    elif case == "size":
        frames[1] = frames[1][:-4]
    elif case == "dtype":
        h.tensors[0].dtype = 77
        frames[0] = h.SerializeToString()
    elif case == "no_id":
        h.request_id = ""
        frames[0] = h.SerializeToString()
    elif case == "empty":
        frames = []
    with pytest.raises(FrameError):
        decode_frames(frames)


def test_unknown_dtype_never_pickled():
    with pytest.raises(FrameError):
        encode_frames("r", 0, FrameKind.BRANCH_PREDICTION, {"c": torch.zeros(2, dtype=torch.complex64)})


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
    frames = encode_frames(
        "r", 3, FrameKind.GUIDED_PREDICTION, {"p": torch.ones(2)}, sender="U", session=b"\x01" * 16
    )
    msg = decode_frames(frames)
    assert msg.session == b"\x01" * 16 and msg.sender == "U"


def test_parse_header_checks_sizes_without_reading_buffers():
    from hybridiff.wire import FrameSizeError, parse_header

    frames = encode_frames("r", 1, FrameKind.BRANCH_PREDICTION, {"a": torch.zeros(2, 2), "b": torch.zeros(3)})
    header = parse_header(frames[0], [16, 12])
    assert header.request_id == "r" and [t.name for t in header.tensors] == ["a", "b"]
    with pytest.raises(FrameSizeError, match="2 tensors but 1 buffers"):
        parse_header(frames[0], [16])
    with pytest.raises(FrameSizeError, match="needs 12 bytes"):
        parse_header(frames[0], [16, 8])
    with pytest.raises(FrameSizeError, match="exceeds this receiver's 20-byte limit"):
        parse_header(frames[0], [16, 12], max_message_bytes=20)
    with pytest.raises(FrameSizeError, match="header frame of"):
        parse_header(b"\x0a" * (64 * 1024 + 1), [])


def test_a_header_declaring_a_huge_tensor_is_refused_before_anything_is_allocated():
    from hybridiff.wire import FrameSizeError, parse_header

    h = pb.TensorFrameHeader(version=1, request_id="r", step=0, kind=pb.FRAME_KIND_BRANCH_PREDICTION)
    h.tensors.add(name="x", dtype=pb.ELEMENT_TYPE_FLOAT32, shape=[1 << 40, 1 << 20], nbytes=1 << 62)
    with pytest.raises(FrameSizeError, match="exceeds"):
        parse_header(h.SerializeToString(), [8])
    many = pb.TensorFrameHeader(version=1, request_id="r", step=0, kind=pb.FRAME_KIND_BRANCH_PREDICTION)
    for i in range(65):
        many.tensors.add(name=f"t{i}", dtype=pb.ELEMENT_TYPE_UINT8, shape=[0], nbytes=0)
    with pytest.raises(FrameSizeError, match="limit of 64"):
        parse_header(many.SerializeToString(), [0] * 65)

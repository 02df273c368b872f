"""Tensor wire format of the data plane: one typed header frame plus one raw buffer per tensor.

``encode_frames`` / ``decode_frames`` are the only way tensors cross between workers, in the
in-process engine and over ZeroMQ alike (DESIGN section 2); ``tensor_to_proto`` /
``tensor_from_proto`` carry a tensor inside another message (checkpoints, final latents) as the
same ``Tensor`` message with its bytes inline. bf16 travels as a uint8 view; an unknown dtype,
a version mismatch or a size that does not match the header is rejected with ``FrameError``
— never a pickle fallback.

Decoding is split in two so that a receiver spends nothing on a message it will refuse:
``parse_header`` reads and checks the (small, bounded) header frame against the sizes of the
buffers that follow, without touching them; the receiver then checks the header's session,
sender, kind and step; only then does ``decode_payload`` copy the buffers into tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from google.protobuf.message import DecodeError

from hybridiff.internal.v1 import dataplane_pb2 as pb

WIRE_VERSION = 1
# A single tensor larger than this is refused (a full-size SDXL activation is ~40 MiB in fp32).
MAX_TENSOR_BYTES = 512 * 1024 * 1024
# A whole message larger than this is refused unless the receiver sets its own (lower) bound.
MAX_MESSAGE_BYTES = 4 * MAX_TENSOR_BYTES
# A header names a handful of tensors and a trace context: a few hundred bytes. The bound is
# checked before the header is parsed, so a forged header cannot make the parser allocate.
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 64


class FrameKind:
    """What a data-plane message carries (the wire enum's values, short names)."""

    BRANCH_PREDICTION = pb.FRAME_KIND_BRANCH_PREDICTION
    STAGE_ACTIVATIONS = pb.FRAME_KIND_STAGE_ACTIVATIONS
    STAGE_RETURN = pb.FRAME_KIND_STAGE_RETURN
    GUIDED_PREDICTION = pb.FRAME_KIND_GUIDED_PREDICTION


_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.ELEMENT_TYPE_FLOAT32,
    torch.float16: pb.ELEMENT_TYPE_FLOAT16,
    torch.bfloat16: pb.ELEMENT_TYPE_BFLOAT16,
    torch.float64: pb.ELEMENT_TYPE_FLOAT64,
    torch.int64: pb.ELEMENT_TYPE_INT64,
    torch.int32: pb.ELEMENT_TYPE_INT32,
    torch.uint8: pb.ELEMENT_TYPE_UINT8,
    torch.bool: pb.ELEMENT_TYPE_BOOL,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


class FrameError(ValueError):
    """A data-plane message that is not a valid header + buffers (rejected, never trusted)."""


class FrameSizeError(FrameError):
    """A well-formed header whose sizes do not match its buffers or exceed a limit."""


@dataclass
class TensorMessage:
    """A decoded data-plane message: who, which step, what kind, and the named tensors."""

    request_id: str
    step: int
    kind: int
    tensors: dict[str, torch.Tensor]
    trace_context: dict[str, str] = field(default_factory=dict)
    sender: str = ""
    session: bytes = b""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _raw_view(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint8)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.numpy()).cast("B")


def encode_frames(
    request_id: str,
    step: int,
    kind: int,
    tensors: Mapping[str, torch.Tensor],
    trace_context: Mapping[str, str] | None = None,
    sender: str = "",
    session: bytes = b"",
) -> list[bytes | memoryview]:
    """Header frame followed by one raw buffer frame per tensor (zero-copy views where possible);
    ``session`` is the attempt's nonce (``BeginCommand.session_nonce``)."""
    header = pb.TensorFrameHeader(
        version=WIRE_VERSION, request_id=request_id, step=step, kind=kind, sender=sender, session=session
    )
    if trace_context:
        header.trace_context.update(trace_context)
    frames: list[bytes | memoryview] = [b""]
    for name, tensor in tensors.items():
        if tensor.dtype not in _TO_WIRE:
            raise FrameError(f"tensor {name!r}: dtype {tensor.dtype} has no wire encoding")
        buf = _raw_view(tensor)
        header.tensors.add(
            name=name, dtype=_TO_WIRE[tensor.dtype], shape=list(tensor.shape), nbytes=buf.nbytes
        )
        frames.append(buf)
    frames[0] = header.SerializeToString()
    return frames


def decode_frames(
    frames: Sequence[bytes | memoryview],
    device: torch.device | str = "cpu",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> TensorMessage:
    """Parse and check a message; every mismatch raises ``FrameError`` naming what is wrong."""
    if not frames:
        raise FrameError("empty message")
    header = parse_header(frames[0], [memoryview(f).nbytes for f in frames[1:]], max_message_bytes)
    return decode_payload(header, frames[1:], device)


def parse_header(
    header_frame: bytes | memoryview, buffer_sizes: Sequence[int], max_message_bytes: int = MAX_MESSAGE_BYTES
) -> pb.TensorFrameHeader:
    """The checked header of a message whose buffers have ``buffer_sizes``: version, kind,
    request id, one tensor spec per buffer, each spec's size equal to its buffer's, and the total
    within ``max_message_bytes``. Reads no buffer; ``FrameError`` names the first mismatch."""
    size = memoryview(header_frame).nbytes
    if size > MAX_HEADER_BYTES:
        raise FrameSizeError(f"header frame of {size} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    header = pb.TensorFrameHeader()
    try:
        header.ParseFromString(bytes(header_frame))
    except DecodeError as exc:
        raise FrameError(f"header frame is not a TensorFrameHeader: {exc}") from None
    if header.version != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {header.version} (expected {WIRE_VERSION})")
    if header.kind == pb.FRAME_KIND_UNSPECIFIED or header.kind not in pb.FrameKind.values():
        raise FrameError(f"unknown frame kind {header.kind}")
    if not header.request_id:
        raise FrameError("header has no request id")
    if len(buffer_sizes) != len(header.tensors):
        raise FrameSizeError(
            f"header names {len(header.tensors)} tensors but {len(buffer_sizes)} buffers follow"
        )
    if len(header.tensors) > MAX_TENSORS:
        raise FrameSizeError(f"{len(header.tensors)} tensors exceed the limit of {MAX_TENSORS} per message")
    total = 0
    for spec, nbytes in zip(header.tensors, buffer_sizes):
        _check_spec(spec, nbytes)
        total += nbytes
    if total > max_message_bytes:
        raise FrameSizeError(
            f"message of {total} bytes exceeds this receiver's {max_message_bytes}-byte limit"
        )
    return header


def decode_payload(
    header: pb.TensorFrameHeader, buffers: Sequence[bytes | memoryview], device: torch.device | str = "cpu"
) -> TensorMessage:
    """The message of a header ``parse_header`` accepted: its buffers copied into tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for spec, buf in zip(header.tensors, buffers, strict=True):
        tensors[spec.name] = _tensor_from_buffer(spec, buf, device)
    return TensorMessage(
        request_id=header.request_id,
        step=header.step,
        kind=header.kind,
        tensors=tensors,
        trace_context=dict(header.trace_context),
        sender=header.sender,
        session=header.session,
    )


def tensor_to_proto(tensor: torch.Tensor, name: str = "") -> pb.Tensor:
    """A tensor as one ``Tensor`` message with its bytes inline."""
    if tensor.dtype not in _TO_WIRE:
        raise FrameError(f"tensor {name!r}: dtype {tensor.dtype} has no wire encoding")
    buf = _raw_view(tensor)
    return pb.Tensor(
        name=name,
        dtype=_TO_WIRE[tensor.dtype],
        shape=list(tensor.shape),
        nbytes=buf.nbytes,
        data=buf.tobytes(),
    )


def tensor_from_proto(msg: pb.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor of a ``Tensor`` message, checked like a frame (``FrameError`` when it does not hold)."""
    return _tensor_from_buffer(msg, msg.data, device)


def _check_spec(spec: pb.Tensor, nbytes: int) -> torch.dtype:
    """The dtype of a tensor spec whose shape, declared size and buffer size (``nbytes``) agree."""
    dtype = _FROM_WIRE.get(spec.dtype)
    if dtype is None:
        raise FrameError(f"tensor {spec.name!r}: unknown wire dtype {spec.dtype}")
    if any(d < 0 for d in spec.shape):
        raise FrameError(f"tensor {spec.name!r}: negative dimension in shape {list(spec.shape)}")
    numel = 1
    for d in spec.shape:
        numel *= d
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if expected > MAX_TENSOR_BYTES:
        raise FrameSizeError(
            f"tensor {spec.name!r}: {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit"
        )
    if nbytes != expected or spec.nbytes != expected:
        raise FrameSizeError(
            f"tensor {spec.name!r}: shape {list(spec.shape)} of {dtype} needs {expected} bytes, "
            f"header says {spec.nbytes}, buffer has {nbytes}"
        )
    return dtype


def _tensor_from_buffer(spec: pb.Tensor, buf: bytes | memoryview, device: torch.device | str) -> torch.Tensor:
    raw = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    dtype = _check_spec(spec, raw.nbytes)
    if raw.nbytes == 0:
        return torch.empty(tuple(spec.shape), dtype=dtype, device=device)
    wire_dtype = torch.uint8 if dtype == torch.bfloat16 else dtype
    # bytearray copy: the receive buffer may be reused by the transport, and torch needs writable memory.
    flat = torch.frombuffer(bytearray(raw), dtype=wire_dtype)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat.reshape(tuple(spec.shape)).to(device)

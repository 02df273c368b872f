"""Tensor wire format of the data plane: every message is ONE frame (prefix, header, payload).

``encode`` / ``decode`` are the only way tensors cross between workers, in the in-process
engine and over ZeroMQ alike (docs/design.md section 9); ``tensor_to_proto`` / ``tensor_from_proto``
carry a tensor inside another message (checkpoints, final latents) as the same ``Tensor``
message with its bytes inline. bf16 travels as raw bytes; an unknown dtype, a version mismatch
or a size that does not match the header is rejected with ``FrameError`` — never a pickle
fallback.

The frame (proto/hybridiff/internal/v1/dataplane.proto): a 10-byte little-endian prefix (magic,
wire version, header length), the ``TensorFrameHeader``, then the payload from the first 64-byte
boundary: each tensor at its declared 64-byte-aligned offset, in order, zero padding between.
One frame because ZeroMQ's ``MAXMSGSIZE`` bounds each *part* of a message and libzmq buffers
every part before the reader sees the first: only a one-part protocol lets it bound a message.

Decoding is split in two so that a receiver spends nothing on a message it will refuse:
``parse_header`` checks the prefix, the (small, bounded) header and that every tensor's bytes
lie inside the frame where the canonical layout puts them, without reading the payload; the
receiver then checks the header's session, sender, kind and step; only then does
``decode_payload`` turn the payload into tensors.

Copies: ``encode`` copies each tensor once, into a fresh 64-byte-aligned buffer that is the
message (sent without a further copy). A ``Payload`` is the zero-copy way: tensors staged
straight into one buffer at their payload offsets, with room in front for the header, which
``Payload.seal`` writes there. ``decode_payload`` views the tensors in the frame itself when the
frame starts on a 64-byte boundary and is writable (the views keep the frame alive); otherwise
it copies each tensor once (into pinned memory with ``pin_memory``). Measured with libzmq 4.3.5
over TCP, a received frame never starts aligned (a large message sits 40 bytes after its
malloc'd header: 8 or 56 mod 64), so there the copy stays; in-process and ``inproc`` frames of
a ``Payload`` or of ``encode`` are aligned and viewed.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from google.protobuf.message import DecodeError

from hybridiff.internal.v1 import dataplane_pb2 as pb

WIRE_VERSION = 2
MAGIC = b"HYDP"
PREFIX = struct.Struct("<4sHI")  # magic, wire version, header length
ALIGN = 64
# A single tensor larger than this is refused (a full-size SDXL activation is ~40 MiB in fp32).
MAX_TENSOR_BYTES = 512 * 1024 * 1024
# A whole message larger than this is refused unless the receiver sets its own (lower) bound.
MAX_MESSAGE_BYTES = 4 * MAX_TENSOR_BYTES
# A header names a handful of tensors and a trace context: a few hundred bytes. The bound is
# checked before the header is parsed, so a forged header cannot make the parser allocate.
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 64
# Room a Payload keeps in front of its tensors for the prefix and header; a larger header makes
# the send fall back to ``encode`` (one more copy), never fail.
HEADER_ROOM = 4096


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
    """A data-plane message that is not a valid frame (rejected, never trusted)."""


class FrameSizeError(FrameError):
    """A well-formed header whose sizes or offsets do not fit its frame or exceed a limit."""


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


@dataclass(frozen=True)
class ParsedHeader:
    """A header ``parse_header`` accepted, with where its payload starts and its tensor bytes."""

    header: pb.TensorFrameHeader
    payload_start: int
    nbytes: int


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def max_frame_bytes(max_message_bytes: int) -> int:
    """The largest frame a message of ``max_message_bytes`` tensor bytes can take."""
    return PREFIX.size + MAX_HEADER_BYTES + ALIGN * (MAX_TENSORS + 1) + max_message_bytes


def payload_layout(
    tensors: Sequence[tuple[torch.Size | Sequence[int], torch.dtype]],
) -> tuple[list[int], int]:
    """The payload offsets of tensors of these shapes and dtypes, and the payload's size."""
    offsets, end = [], 0
    for shape, dtype in tensors:
        offsets.append(align(end))
        end = offsets[-1] + _nbytes(shape, dtype)
    return offsets, end


def _nbytes(shape: torch.Size | Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=dtype).element_size()


def _header(
    request_id: str,
    step: int,
    kind: int,
    tensors: Mapping[str, torch.Tensor],
    offsets: Sequence[int],
    trace_context: Mapping[str, str] | None,
    sender: str,
    session: bytes,
) -> bytes:
    header = pb.TensorFrameHeader(
        version=WIRE_VERSION, request_id=request_id, step=step, kind=kind, sender=sender, session=session
    )
    if trace_context:
        header.trace_context.update(trace_context)
    for (name, t), offset in zip(tensors.items(), offsets, strict=True):
        if t.dtype not in _TO_WIRE:
            raise FrameError(f"tensor {name!r}: dtype {t.dtype} has no wire encoding")
        header.tensors.add(
            name=name,
            dtype=_TO_WIRE[t.dtype],
            shape=list(t.shape),
            nbytes=t.numel() * t.element_size(),
            offset=offset,
        )
    data = header.SerializeToString()
    if len(data) > MAX_HEADER_BYTES:
        raise FrameSizeError(f"header of {len(data)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return data


def _write_lead(buf: torch.Tensor, header: bytes) -> None:
    """Prefix and header at the start of ``buf`` (uint8), zeros up to the payload start."""
    lead = PREFIX.pack(MAGIC, WIRE_VERSION, len(header)) + header
    view = memoryview(buf.numpy())
    view[: len(lead)] = lead
    buf[len(lead) : align(len(lead))] = 0


def _put(payload: torch.Tensor, offsets: Sequence[int], tensors: Sequence[torch.Tensor], **copy) -> None:
    """Copies ``tensors`` into ``payload`` (uint8) at ``offsets``; ``copy``: ``Tensor.copy_`` options."""
    for offset, t in zip(offsets, tensors):
        if t.numel():
            n = t.numel() * t.element_size()
            payload[offset : offset + n].view(t.dtype).view(t.shape).copy_(t, **copy)


def _zero_gaps(payload: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> None:
    for end, nxt in zip((o + n for o, n in zip(offsets, sizes)), [*offsets[1:], None]):
        if nxt is not None and nxt > end:
            payload[end:nxt] = 0


def encode(
    request_id: str,
    step: int,
    kind: int,
    tensors: Mapping[str, torch.Tensor],
    trace_context: Mapping[str, str] | None = None,
    sender: str = "",
    session: bytes = b"",
) -> memoryview:
    """The message as one frame, in a fresh 64-byte-aligned buffer: one copy of each tensor (from
    any device, any layout); ``session`` is the attempt's nonce (``BeginCommand.session_nonce``)."""
    specs = [(t.shape, t.dtype) for t in tensors.values()]
    for name, t in tensors.items():
        if t.dtype not in _TO_WIRE:
            raise FrameError(f"tensor {name!r}: dtype {t.dtype} has no wire encoding")
    offsets, size = payload_layout(specs)
    header = _header(request_id, step, kind, tensors, offsets, trace_context, sender, session)
    start = align(PREFIX.size + len(header))
    buf = torch.empty(start + size, dtype=torch.uint8)  # CPU allocations are 64-byte aligned
    _write_lead(buf, header)
    payload = buf[start:]
    _put(payload, offsets, [t.detach() for t in tensors.values()])
    _zero_gaps(payload, offsets, [_nbytes(*s) for s in specs])
    return memoryview(buf.numpy())


class Payload(dict):
    """Named tensors laid out in one host buffer as a message's payload, with ``HEADER_ROOM``
    bytes in front for the prefix and header: ``seal`` makes the message of them without
    copying them again. Filled by its owner (``gpu_worker.transfers``: device-to-host copies
    straight into the views); the buffer must stay unchanged while a sent frame is read."""

    def __init__(self, buffer: torch.Tensor, specs: Mapping[str, tuple[torch.Size, torch.dtype]]) -> None:
        """``buffer``: uint8, 64-byte aligned, of ``Payload.buffer_bytes(specs.values())``."""
        offsets, size = payload_layout(list(specs.values()))
        if buffer.dtype != torch.uint8 or buffer.numel() < HEADER_ROOM + size:
            raise ValueError(f"a payload of {size} bytes needs a uint8 buffer of {HEADER_ROOM + size}")
        self.buffer = buffer
        self.size = size
        self._offsets = offsets
        data = buffer[HEADER_ROOM : HEADER_ROOM + size]
        views = {}
        for (name, (shape, dtype)), offset in zip(specs.items(), offsets):
            n = _nbytes(shape, dtype)
            views[name] = data[offset : offset + n].view(dtype).view(shape)
        super().__init__(views)
        self._ptrs = [(t.data_ptr(), t.shape, t.dtype) for t in views.values()]

    @staticmethod
    def buffer_bytes(specs: Sequence[tuple[torch.Size, torch.dtype]]) -> int:
        """Bytes of the buffer a payload of tensors of these shapes and dtypes needs."""
        return HEADER_ROOM + payload_layout(specs)[1]

    def zero_padding(self) -> None:
        """Zeros between the tensors (done once per buffer: the tensors never write there)."""
        data = self.buffer[HEADER_ROOM : HEADER_ROOM + self.size]
        _zero_gaps(data, self._offsets, [t.numel() * t.element_size() for t in self.values()])

    def seal(
        self,
        request_id: str,
        step: int,
        kind: int,
        trace_context: Mapping[str, str] | None = None,
        sender: str = "",
        session: bytes = b"",
    ) -> memoryview | None:
        """The message of these tensors as one frame over this very buffer (its header written in
        front of them); None when it cannot be (a header larger than the room, or tensors no
        longer the payload's own views): then ``encode`` them."""
        if [(t.data_ptr(), t.shape, t.dtype) for t in self.values()] != self._ptrs:
            return None
        header = _header(request_id, step, kind, self, self._offsets, trace_context, sender, session)
        lead = align(PREFIX.size + len(header))
        if lead > HEADER_ROOM:
            return None
        _write_lead(self.buffer[HEADER_ROOM - lead : HEADER_ROOM], header)
        return memoryview(self.buffer.numpy())[HEADER_ROOM - lead : HEADER_ROOM + self.size]


def decode(
    frame: bytes | bytearray | memoryview,
    device: torch.device | str = "cpu",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> TensorMessage:
    """Parse and check a message; every mismatch raises ``FrameError`` naming what is wrong."""
    return decode_payload(parse_header(frame, max_message_bytes), frame, device)


def parse_header(
    frame: bytes | bytearray | memoryview, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> ParsedHeader:
    """The checked header of ``frame``: prefix (magic, version, header length within
    ``MAX_HEADER_BYTES`` and the frame), version, kind, request id, and every tensor's spec and
    bytes inside the frame at its canonical offset (in order, not overlapping, the frame ending
    with the last, or at the payload start when there is none), the total within
    ``max_message_bytes``. Reads no payload byte."""
    raw = _bytes_view(frame)
    size = raw.nbytes
    if size < PREFIX.size:
        raise FrameError(f"a frame of {size} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, header_len = PREFIX.unpack(raw[: PREFIX.size].tobytes())
    if magic != MAGIC:
        raise FrameError(f"not a data-plane frame (magic {magic!r})")
    if version != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {version} (expected {WIRE_VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise FrameSizeError(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if PREFIX.size + header_len > size:
        raise FrameSizeError(f"header of {header_len} bytes overruns the {size}-byte frame")
    header = pb.TensorFrameHeader()
    try:
        header.ParseFromString(raw[PREFIX.size : PREFIX.size + header_len].tobytes())
    except DecodeError as exc:
        raise FrameError(f"header is not a TensorFrameHeader: {exc}") from None
    if header.version != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {header.version} in the header (expected {WIRE_VERSION})")
    if header.kind == pb.FRAME_KIND_UNSPECIFIED or header.kind not in pb.FrameKind.values():
        raise FrameError(f"unknown frame kind {header.kind}")
    if not header.request_id:
        raise FrameError("header has no request id")
    if len(header.tensors) > MAX_TENSORS:
        raise FrameSizeError(f"{len(header.tensors)} tensors exceed the limit of {MAX_TENSORS} per message")
    start = align(PREFIX.size + header_len)
    end, total = 0, 0
    for spec in header.tensors:
        _check_spec(spec, spec.nbytes)
        if spec.offset != align(end):
            raise FrameSizeError(
                f"tensor {spec.name!r}: offset {spec.offset}, expected {align(end)} (in order, "
                "64-byte aligned, not overlapping)"
            )
        end = spec.offset + spec.nbytes
        total += spec.nbytes
        if start + end > size:
            raise FrameSizeError(
                f"tensor {spec.name!r}: bytes {spec.offset}..{end} of the payload lie outside the "
                f"{size}-byte frame"
            )
    expected = start + end
    if size != expected:
        raise FrameSizeError(f"frame of {size} bytes, its header accounts for {expected}")
    if total > max_message_bytes:
        raise FrameSizeError(
            f"message of {total} bytes exceeds this receiver's {max_message_bytes}-byte limit"
        )
    return ParsedHeader(header, start, total)


def decode_payload(
    parsed: ParsedHeader,
    frame: bytes | bytearray | memoryview,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
) -> TensorMessage:
    """The message of a frame ``parse_header`` accepted. Its tensors are views of the frame when
    it is writable and 64-byte aligned (they keep it alive), else copies (into pinned host
    memory with ``pin_memory``, which needs CUDA, and then ``device`` is ignored)."""
    header = parsed.header
    raw = _bytes_view(frame)
    data = None
    if not pin_memory and not raw.readonly and parsed.nbytes:
        whole = torch.frombuffer(raw, dtype=torch.uint8)
        if whole.data_ptr() % ALIGN == 0:
            data = whole[parsed.payload_start :]
    tensors: dict[str, torch.Tensor] = {}
    for spec in header.tensors:
        dtype = _check_spec(spec, spec.nbytes)
        shape = tuple(spec.shape)
        at = parsed.payload_start + spec.offset
        if spec.nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
        elif data is not None:
            t = data[spec.offset : spec.offset + spec.nbytes].view(dtype).view(shape)
        else:
            t = torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
            memoryview(t.numpy())[:] = raw[at : at + spec.nbytes]
            t = t.view(dtype).view(shape)
        tensors[spec.name] = t if pin_memory else t.to(device)
    return TensorMessage(
        request_id=header.request_id,
        step=header.step,
        kind=header.kind,
        tensors=tensors,
        trace_context=dict(header.trace_context),
        sender=header.sender,
        session=header.session,
    )


def _bytes_view(frame: bytes | bytearray | memoryview) -> memoryview:
    raw = memoryview(frame)
    return raw if raw.format == "B" and raw.ndim == 1 else raw.cast("B")


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
    # A copy: the message's bytes are immutable and torch needs writable memory.
    flat = torch.empty(raw.nbytes, dtype=torch.uint8)
    memoryview(flat.numpy())[:] = raw
    return flat.view(dtype).view(tuple(spec.shape)).to(device)

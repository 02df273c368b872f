"""A resumed request's checkpoint on the control Session, in parts (docs/design.md section 5).

A checkpoint (latents, the scheduler's history, the last difference) outgrows any small message
bound: the largest SD3 request's is about 100 MiB. The worker's control port receives messages of
at most ``hybridiff.serving.CONTROL_RECEIVE_BYTES`` from anyone, so the coordinator sends a Begin
that names the checkpoint's size (``resume_bytes``) and then the serialized checkpoint in
``CheckpointPart`` commands of ``PART_BYTES``; the worker assembles them (``CheckpointAssembly``)
into the Begin's ``resume`` before it runs it. What the worker buffers is bounded by its largest
genuine checkpoint (``checkpoint_bound``), one session at a time, and parts must come in order:
a gap, an overlap or more bytes than announced end the session.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb

# Each part stays far below the control port's receive bound, and a stream of them keeps
# the worker's read-ahead (a few commands) small.
PART_BYTES = 1024 * 1024
# Latent-sized float32 tensors a checkpoint may hold: the latents, the last difference and the
# scheduler's history. Measured at most 7 (SASolver at predictor order 3, corrector order 4;
# UniPC of order 3 and PNDM: 6; DPMSolverMultistep: 5); the bound leaves room for more.
CHECKPOINT_LATENT_COPIES = 12
# The rest: the generator's state (5 KiB on a CPU), scheduler counters, field names, headers.
CHECKPOINT_SLACK_BYTES = 1024 * 1024


def checkpoint_bound(latent_elements: int) -> int:
    """The most bytes a serialized checkpoint may take for latents of ``latent_elements``
    elements (the largest request's: every image at the largest size)."""
    return CHECKPOINT_LATENT_COPIES * 4 * latent_elements + CHECKPOINT_SLACK_BYTES


def in_parts(cmd: wpb.SessionRequest, part_bytes: int = PART_BYTES) -> list[wpb.SessionRequest]:
    """``cmd`` as it goes on the wire: a Begin with a checkpoint becomes the Begin naming its size
    and the parts of it; any other command stays as it is (``cmd`` itself is left unchanged)."""
    if cmd.WhichOneof("command") != "begin" or not cmd.begin.HasField("resume"):
        return [cmd]
    data = cmd.begin.resume.SerializeToString()
    if not data:  # a checkpoint of defaults only: nothing to cut, and resume_bytes 0 means none
        return [cmd]
    begin = wpb.SessionRequest(request_id=cmd.request_id, trace_context=cmd.trace_context)
    for field, value in cmd.begin.ListFields():  # every field set but the checkpoint, not copied
        if field.name == "resume":
            continue
        if field.message_type is not None:
            getattr(begin.begin, field.name).CopyFrom(value)
        else:
            setattr(begin.begin, field.name, value)
    begin.begin.resume_bytes = len(data)
    view = memoryview(data)
    parts = [
        wpb.SessionRequest(
            request_id=cmd.request_id,
            checkpoint_part=wpb.CheckpointPart(offset=offset, data=bytes(view[offset : offset + part_bytes])),
        )
        for offset in range(0, len(data), part_bytes)
    ]
    return [begin, *parts]


class CheckpointAssembly:
    """The parts of one checkpoint of ``expected`` bytes, taken in order; ``BadCommand`` (before
    anything is buffered) when ``expected`` exceeds ``bound``, and for a part out of order,
    repeated, empty, or past the announced size."""

    def __init__(self, expected: int, bound: int) -> None:
        if expected > bound:
            raise BadCommand(
                "begin.resume_bytes", f"a checkpoint of {expected} bytes exceeds this worker's {bound}"
            )
        self.expected = expected
        self._data = bytearray()

    @property
    def received(self) -> int:
        return len(self._data)

    @property
    def complete(self) -> bool:
        return self.received == self.expected

    def add(self, part: wpb.CheckpointPart) -> None:
        if part.offset != self.received:
            raise BadCommand(
                "checkpoint_part.offset", f"part at {part.offset}, expected the one at {self.received}"
            )
        if not part.data:
            raise BadCommand("checkpoint_part.data", "an empty part")
        if self.received + len(part.data) > self.expected:
            raise BadCommand(
                "checkpoint_part.data",
                f"{self.received + len(part.data)} bytes, past the announced {self.expected}",
            )
        self._data += part.data

    def fill(self, checkpoint: wpb.Checkpoint) -> None:
        """Parse the whole checkpoint into ``checkpoint`` (a Begin's ``resume``) and let the parts go."""
        if not self.complete:
            raise BadCommand("checkpoint_part", f"{self.received} of {self.expected} bytes of the checkpoint")
        try:
            checkpoint.ParseFromString(self._data)
        except DecodeError as exc:
            raise BadCommand("checkpoint_part", f"the checkpoint does not parse: {exc}") from None
        finally:
            self._data = bytearray()

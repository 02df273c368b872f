"""The data plane between the two workers of a pair: typed tensor messages, matched by step.

A ``Mailbox`` holds decoded messages keyed by (request id, kind, step) until the engine takes
them. It trusts nothing that arrives: a message is accepted only for an open *paired* session,
carrying that attempt's nonce, sent by the peer its Begin named, of a kind the session can
receive, for a step it can still need (not one already taken, at most ``STEPS_AHEAD`` past the
engine's progress), never replacing a message it holds, and within the session's caps (message
count and bytes). A message is one frame; its header is checked first
(``hybridiff.wire.parse_header``: prefix, header, every tensor's bytes inside the frame): a
refused message is never copied, so it costs no more than the transport already spent receiving it.
Refusals are counted by reason and logged at most once per reason every ``WARN_INTERVAL``.

Messages are decoded into host memory (pinned when the mailbox serves a CUDA worker, so the
engine's copy to the device can be asynchronous: ``gpu_worker.transfers``).

A ``PeerLink`` sends to the peer; ``InMemoryLink`` connects two engines in one process (the
ZeroMQ link of the cluster carries the very same frames). A zero-copy send of a
``hybridiff.wire.Payload`` hands the transport the payload's own buffer, its header written in
front, and returns its tracker: the buffer must not change until it is done. Any other send
encodes the message into a fresh buffer (one copy of each tensor) that the transport owns.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gpu_worker.metrics import WorkerMetrics
from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.internal.v1 import dataplane_pb2 as pb
from hybridiff.wire import (
    MAX_MESSAGE_BYTES,
    FrameError,
    FrameSizeError,
    Payload,
    TensorMessage,
    decode_payload,
    encode,
    parse_header,
)

log = logging.getLogger(__name__)

# How far past the engine's progress (the step after the highest one it has taken) a peer's
# message may be. Every step exchanges in both directions, so a peer is at most one step ahead
# of the step we wait in; the pipeline adds one: a stage re-uses the fill step's activations as
# its stale input without taking anything, and a non-fill step takes the previous step's.
STEPS_AHEAD = 2
# A session holds at most two messages of each of the (at most two) kinds it receives at once.
MAX_HELD_MESSAGES = 8
WARN_INTERVAL = 10.0  # seconds between two warnings of the same rejection reason
# Paired sessions remembered after their close, so that the peer's frames still in flight when a
# request is cancelled or aborted (a normal event) are dropped without a warning.
CLOSED_REMEMBERED = 64


@dataclass(frozen=True)
class Expect:
    """What a paired session accepts: frames of this attempt (``nonce``), from ``peer`` (the
    sender id its frames carry), of ``kinds``, for steps in ``first_step .. end_step - 1``."""

    nonce: bytes
    peer: str
    kinds: frozenset[int]
    first_step: int = 0
    end_step: int = 2**32


@dataclass(eq=False)
class SessionInbox:
    """A mailbox's part for one open session: the peer's messages held for the engine to take,
    those still being decoded, and how far the engine has taken each kind."""

    expect: Expect | None  # None: a solo session, which accepts nothing
    held: dict[tuple[int, int], TensorMessage] = field(default_factory=dict)
    pending: dict[tuple[int, int], int] = field(default_factory=dict)  # being decoded: bytes
    held_bytes: int = 0
    taken: dict[int, int] = field(default_factory=dict)  # kind -> highest step taken

    def progress(self) -> int:
        """The lowest step the engine may still wait for."""
        first = self.expect.first_step if self.expect else 0
        return max(first, max(self.taken.values(), default=first - 1) + 1)

    def count(self) -> int:
        return len(self.held) + len(self.pending)

    def nbytes(self) -> int:
        return self.held_bytes + sum(self.pending.values())


def _short(text: str, limit: int = 80) -> str:
    """A peer-chosen string cut to a length fit for a log line."""
    return text if len(text) <= limit else text[:limit] + "..."


class RateLimitedWarnings:
    """At most one warning per key every ``interval`` seconds, with the count of those held back."""

    def __init__(self, logger: logging.Logger, interval: float = WARN_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._state.get(key, (-math.inf, 0))
            if now - last < self.interval:
                self._state[key] = (last, suppressed + 1)
                return
            self._state[key] = (now, 0)
        if suppressed:
            message += f" ({suppressed} more like it in the last {now - last:.0f}s not logged)"
        self.logger.warning(message)


class Mailbox:
    def __init__(
        self,
        owner: str,
        device: torch.device | str = "cpu",
        metrics: WorkerMetrics | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_held: int = MAX_HELD_MESSAGES,
        max_held_bytes: int | None = None,
    ) -> None:
        """``metrics``: bytes received, peer waits, rejected frames. A session holds at most
        ``max_held`` messages and ``max_held_bytes`` (default: four of the largest message).
        Messages are decoded into host memory, pinned when ``device`` is a CUDA device."""
        self.owner = owner
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" and torch.cuda.is_available()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes if max_held_bytes is not None else 4 * max_message_bytes
        self._cond = threading.Condition()
        self._open: dict[str, SessionInbox] = {}
        self._closed: OrderedDict[str, Expect] = OrderedDict()  # request id -> its last paired session
        self.rejected = 0
        self.rejected_by_reason: Counter[str] = Counter()
        self._warnings = RateLimitedWarnings(log)

    def open(self, request_id: str, expect: Expect | None = None) -> None:
        """Open a session of ``request_id`` (replacing any earlier one and what it held);
        ``expect`` None: a solo session, which accepts no message."""
        with self._cond:
            self._open[request_id] = SessionInbox(expect)
            self._cond.notify_all()

    def is_open(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._open

    def close(self, request_id: str, nonce: bytes | None = None) -> None:
        """Forget a request and drop what it left unread (e.g. the last window activations).
        With ``nonce``, only the paired session of that attempt: a late close of an earlier
        attempt (its RPC's callback) leaves the session of a newer one with the same id open."""
        with self._cond:
            session = self._open.get(request_id)
            if session is None:
                return
            if nonce is not None and (session.expect is None or session.expect.nonce != nonce):
                return  # a solo session accepts no frame: no wait of its own that a close must end
            del self._open[request_id]
            if session.expect is not None:
                self._closed[request_id] = session.expect
                self._closed.move_to_end(request_id)
                if len(self._closed) > CLOSED_REMEMBERED:
                    self._closed.popitem(last=False)
            self._cond.notify_all()

    def held(self, request_id: str) -> int:
        """How many messages the open session of ``request_id`` holds (0 when none is open)."""
        with self._cond:
            session = self._open.get(request_id)
            return session.count() if session else 0

    # --- arrival --------------------------------------------------------------------
    def deliver(self, frame: bytes | bytearray | memoryview) -> bool:
        """Check and file a message (one frame); returns False (counted, logged at a bounded rate)
        when refused. Nothing is copied before the header has passed every check; the decoded
        tensors may be views of ``frame`` (``hybridiff.wire.decode_payload``): it must be the
        message's own memory."""
        try:
            parsed = parse_header(frame, self.max_message_bytes)
        except FrameError as exc:
            return self._reject("size" if isinstance(exc, FrameSizeError) else "malformed", str(exc))
        header, size = parsed.header, parsed.nbytes
        key = (header.kind, header.step)
        with self._cond:
            session = self._open.get(header.request_id)
            refusal = self._refusal(session, header, size)
            if refusal is None:
                session.pending[key] = size  # counts against the caps while it is copied
            late = session is None and self._late(header)
        if refusal is not None:
            return self._reject(*refusal, quiet=late)
        try:
            msg = decode_payload(parsed, frame, pin_memory=self.pin_memory)
        except FrameError as exc:  # parse_header checked every size: not expected, but never trusted
            with self._cond:
                session.pending.pop(key, None)
            return self._reject("malformed", str(exc))
        with self._cond:
            session.pending.pop(key, None)
            current = self._open.get(header.request_id) is session
            if current:
                session.held[key] = msg
                session.held_bytes += msg.nbytes
                self._cond.notify_all()
        if not current:
            detail = f"request {header.request_id!r} was closed meanwhile"
            return self._reject("unknown_request", detail, quiet=True)
        if self.metrics is not None:
            self.metrics.received_bytes.inc(memoryview(frame).nbytes)
        return True

    def refuse(self, reason: str, detail: str) -> bool:
        """Counts and logs a message the transport refused before delivering it (False)."""
        return self._reject(reason, detail)

    def _refusal(
        self, session: SessionInbox | None, header: pb.TensorFrameHeader, size: int
    ) -> tuple[str, str] | None:
        """Why the message of ``header`` is refused, as (reason, detail); None when it is accepted."""
        rid, kind, step, sender = _short(header.request_id), header.kind, header.step, _short(header.sender)
        what = f"kind {kind} step {step} of request {rid!r} from {sender!r}"
        if session is None:
            return "unknown_request", f"unknown request {rid!r} (kind {kind} step {step} from {sender!r})"
        expect = session.expect
        if expect is None:
            return "solo", f"{what}: the request runs alone here"
        if not hmac.compare_digest(header.session, expect.nonce):
            return "session", f"{what}: not this attempt's session nonce"
        if header.sender != expect.peer:
            return "sender", f"{what}: the session's peer is {expect.peer!r}"
        if kind not in expect.kinds:
            return "kind", f"{what}: this session never receives that kind"
        low = max(expect.first_step, session.taken.get(kind, -1) + 1)
        high = min(expect.end_step - 1, session.progress() + STEPS_AHEAD)
        if not low <= step <= high:
            return "step", f"{what}: expected a step in {low}..{high}"
        if (kind, step) in session.held or (kind, step) in session.pending:
            return "duplicate", f"{what}: already held (a message is never replaced)"
        if session.count() >= self.max_held or session.nbytes() + size > self.max_held_bytes:
            return "cap", (
                f"{what}: the session holds {session.count()} messages, {session.nbytes()} bytes "
                f"(limits {self.max_held}, {self.max_held_bytes})"
            )
        return None

    def _late(self, header: pb.TensorFrameHeader) -> bool:
        """Whether a frame of no open session is the peer's, still in flight when this side closed
        the session (the request was cancelled or aborted): its request id, attempt nonce and
        sender are those of a session closed lately. Caller holds the lock."""
        expect = self._closed.get(header.request_id)
        return (
            expect is not None
            and hmac.compare_digest(header.session, expect.nonce)
            and header.sender == expect.peer
        )

    def _reject(self, reason: str, detail: str, quiet: bool = False) -> bool:
        """Count and log a refused message; ``quiet``: an expected one (a frame still in flight
        when its request was cancelled), logged at DEBUG instead of as a warning."""
        with self._cond:
            self.rejected += 1
            self.rejected_by_reason[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected_frames.labels(reason).inc()
        message = f"{self.owner}: rejected data-plane message ({reason}): {detail}"
        if quiet:
            log.debug("%s (its request was closed: a cancel or an abort)", message)
        else:
            self._warnings.warn(reason, message)
        return False

    # --- the engine's side ----------------------------------------------------------
    def take(self, request_id: str, kind: int, step: int, timeout: float, peer: str = "") -> TensorMessage:
        """The message of ``kind`` for ``step``; ``PeerTimeout`` naming ``peer`` when it does not come in
        time, ``Cancelled`` when the request is closed (aborted) meanwhile."""
        started = time.monotonic()
        try:
            return self._take(request_id, kind, step, started + timeout, timeout, peer)
        finally:
            if self.metrics is not None:
                self.metrics.peer_wait_seconds.observe(time.monotonic() - started)

    def _take(
        self, request_id: str, kind: int, step: int, deadline: float, timeout: float, peer: str
    ) -> TensorMessage:
        key = (kind, step)
        with self._cond:
            session = self._open.get(request_id)
            while session is None or key not in session.held:
                if session is None or self._open.get(request_id) is not session:
                    raise Cancelled(
                        f"{self.owner}: request {request_id} was closed while waiting for step {step}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeout(
                        f"{self.owner}: no message kind {kind} for step {step} from the peer "
                        f"{peer or '(unknown)'} within {timeout:.1f}s",
                        peer=peer,
                    )
                self._cond.wait(remaining)
            msg = session.held.pop(key)
            session.held_bytes -= msg.nbytes
            session.taken[kind] = max(step, session.taken.get(kind, -1))
            return msg


def message_bound(adapter: Any) -> int:
    """The largest data-plane message ``adapter``'s model can send, in bytes: the widest stage
    boundary (or prediction) at the largest size and batch its limits allow, in its dtype, plus
    1 MiB of slack; never above the wire's own limit. See ``boundary_elements``."""
    limits = adapter.size_limits()
    batch = 2 * limits.max_images  # the full-CFG window runs both branches of every image
    elements = boundary_elements(adapter.denoiser.config, limits.max_side // adapter.vae_scale_factor)
    itemsize = torch.empty((), dtype=adapter.dtype).element_size()
    return min(MAX_MESSAGE_BYTES, batch * elements * itemsize + (1 << 20))


def boundary_elements(config: Any, latent_side: int) -> int:
    """Per image, an upper bound on the elements a stage boundary carries for a square latent of
    ``latent_side``. UNet: the widest activation of any level (the area shrinks by 4 per level
    down; an up block's upsampler hands the next level up its own, wider, channels). DiT: the
    image tokens plus up to 1024 text tokens at the transformer's width."""
    area = latent_side * latent_side
    channels = getattr(config, "block_out_channels", None)
    if channels:
        widths = [*channels, channels[-1]]
        return max(max(widths[i], widths[i + 1]) * area // 4**i for i in range(len(channels)))
    heads, head_dim = getattr(config, "num_attention_heads", 0), getattr(config, "attention_head_dim", 0)
    patch = getattr(config, "patch_size", 0)
    if heads and head_dim and patch:
        return (area // (patch * patch) + 1024) * heads * head_dim
    return MAX_MESSAGE_BYTES  # an unknown denoiser: only the wire's own limit


def session_kinds(role_is_u: bool, topology: str) -> frozenset[int]:
    """The kinds a paired session receives: the peer's branch prediction (data parallel), and in
    the window what the other stage sends (docs/design.md section 9)."""
    kinds = {pb.FRAME_KIND_BRANCH_PREDICTION}
    if topology == "sequential":
        kinds.add(pb.FRAME_KIND_GUIDED_PREDICTION if role_is_u else pb.FRAME_KIND_STAGE_ACTIVATIONS)
    elif role_is_u:
        kinds.add(pb.FRAME_KIND_STAGE_RETURN)
    else:
        kinds.update((pb.FRAME_KIND_STAGE_ACTIVATIONS, pb.FRAME_KIND_GUIDED_PREDICTION))
    return frozenset(kinds)


@dataclass(frozen=True)
class Sent:
    """A message handed to the transport: its bytes, and for a zero-copy send the tracker
    (``zmq.MessageTracker``) whose ``done`` says the transport no longer reads the tensors."""

    nbytes: int
    tracker: Any = None  # None: the transport copied the tensors
    frame_copies: int = 0  # tensors copied into a fresh frame (none for a sealed payload)
    frame_copy_seconds: float = 0.0


class PeerLink(ABC):
    """Sends tensors to the peer worker; returns the bytes put on the wire."""

    zero_copy = True  # whether the transport can read a Payload's buffer after the send returns

    def __init__(self, sender: str) -> None:
        self.sender = sender

    def send(
        self,
        request_id: str,
        step: int,
        kind: int,
        tensors: Mapping[str, torch.Tensor],
        trace_context: Mapping[str, str] | None = None,
        cancelled: Callable[[], bool] | None = None,
        session: bytes = b"",
        zero_copy: bool = False,
    ) -> Sent:
        """Sends one message: ``cancelled()`` turning true (the request was aborted) ends a send
        still waiting for the peer; ``session``: the attempt's nonce, without which the peer
        refuses the message. With ``zero_copy`` and ``tensors`` a ``Payload`` (on a transport
        that can), the transport reads the payload's buffer after this returns, until the
        returned tracker is done: the caller keeps it unchanged until then. Otherwise the message
        is a fresh buffer the transport owns (tracker None)."""
        frame = None
        if zero_copy and self.zero_copy and isinstance(tensors, Payload):
            frame = tensors.seal(request_id, step, kind, trace_context, self.sender, session)
        tracked = frame is not None
        copies, copy_seconds = 0, 0.0
        if frame is None:
            start = time.perf_counter()
            frame = encode(
                request_id, step, kind, tensors, trace_context, sender=self.sender, session=session
            )
            copies, copy_seconds = len(tensors), time.perf_counter() - start
        tracker = self._send_frame(frame, cancelled, tracked)
        return Sent(memoryview(frame).nbytes, tracker, copies, copy_seconds)

    @abstractmethod
    def _send_frame(
        self, frame: memoryview, cancelled: Callable[[], bool] | None = None, track: bool = False
    ) -> Any:
        """Hands the message's one ``frame`` to the transport without copying it; with ``track``
        returns the tracker saying when the transport no longer reads it, else None (the frame
        is the message's own buffer)."""

    def close(self) -> None:
        pass


class InMemoryLink(PeerLink):
    """Delivers encoded frames straight into the peer's mailbox (same process)."""

    def __init__(self, sender: str, peer_mailbox: Mailbox) -> None:
        super().__init__(sender)
        self.peer_mailbox = peer_mailbox

    zero_copy = False  # delivered at once, so every message is a fresh buffer the peer may keep

    def _send_frame(
        self, frame: memoryview, cancelled: Callable[[], bool] | None = None, track: bool = False
    ) -> None:
        self.peer_mailbox.deliver(frame)

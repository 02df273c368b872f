"""The data plane between the two workers of a pair: typed tensor messages, matched by step.

A ``Mailbox`` holds decoded messages keyed by (request id, kind, step) until the engine takes
them; every message is decoded and checked by ``hybridiff.wire`` on arrival, and anything that
does not parse, or names a request the worker is not running, is rejected and logged. A
``PeerLink`` sends to the peer; ``InMemoryLink`` connects two engines in one process (the
ZeroMQ link of the cluster carries the very same frames).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch

from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.wire import FrameError, TensorMessage, decode_frames, encode_frames

log = logging.getLogger(__name__)


class Mailbox:
    def __init__(self, owner: str, device: torch.device | str = "cpu", metrics=None) -> None:
        """``metrics``: an optional ``gpu_worker.metrics.WorkerMetrics`` (bytes received, peer waits)."""
        self.owner = owner
        self.device = device
        self.metrics = metrics
        self._cond = threading.Condition()
        self._messages: dict[tuple[str, int, int], TensorMessage] = {}
        self._open: set[str] = set()
        self.rejected = 0

    def open(self, request_id: str) -> None:
        with self._cond:
            self._open.add(request_id)

    def is_open(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._open

    def close(self, request_id: str) -> None:
        """Forget a request and drop what it left unread (e.g. the last window activations)."""
        with self._cond:
            self._open.discard(request_id)
            for key in [k for k in self._messages if k[0] == request_id]:
                del self._messages[key]
            self._cond.notify_all()

    def deliver(self, frames: Sequence[bytes | memoryview]) -> bool:
        """Decode and file a message; returns False (and logs why) when it is rejected."""
        try:
            msg = decode_frames(frames, self.device)
        except FrameError as exc:
            self.rejected += 1
            log.warning("%s: rejected data-plane message: %s", self.owner, exc)
            return False
        with self._cond:
            if msg.request_id not in self._open:
                self.rejected += 1
                log.warning(
                    "%s: rejected message for unknown request %r (step %d)",
                    self.owner,
                    msg.request_id,
                    msg.step,
                )
                return False
            self._messages[(msg.request_id, msg.kind, msg.step)] = msg
            self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.received_bytes.inc(sum(memoryview(f).nbytes for f in frames))
        return True

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
        key = (request_id, kind, step)
        with self._cond:
            while key not in self._messages:
                if request_id not in self._open:
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
            return self._messages.pop(key)


class PeerLink(ABC):
    """Sends tensors to the peer worker; returns the bytes put on the wire."""

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
    ) -> int:
        """``cancelled()`` turning true (the request was aborted) ends a send still waiting for the peer."""
        frames = encode_frames(request_id, step, kind, tensors, trace_context, sender=self.sender)
        self._send_frames(frames, cancelled)
        return sum(memoryview(f).nbytes for f in frames)

    @abstractmethod
    def _send_frames(
        self, frames: list[bytes | memoryview], cancelled: Callable[[], bool] | None = None
    ) -> None: ...

    def close(self) -> None:
        pass


class InMemoryLink(PeerLink):
    """Delivers encoded frames straight into the peer's mailbox (same process)."""

    def __init__(self, sender: str, peer_mailbox: Mailbox) -> None:
        super().__init__(sender)
        self.peer_mailbox = peer_mailbox

    def _send_frames(
        self, frames: list[bytes | memoryview], cancelled: Callable[[], bool] | None = None
    ) -> None:
        # Copy the buffers: the sender may reuse its tensors before the peer reads them.
        self.peer_mailbox.deliver([bytes(f) for f in frames])

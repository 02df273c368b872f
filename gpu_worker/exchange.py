"""One step's exchange with the peer worker and the account of where its time went.

A ``StepExchange`` is made for each step (never kept between steps): it holds the step's costs
(``StepCosts``) and trace context, runs the step's compute under a timer, sends tensors to the
peer and takes the peer's through the data plane (docs/design.md section 9), and at the step's end
waits for the sends still on the sending thread (``flush``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.dataplane import Mailbox, Sent
from gpu_worker.outgoing import Outgoing
from gpu_worker.session import Session
from gpu_worker.transfers import DirectTransfers, Staged, StagedTransfers, StepCosts

# A step waits for its sends on the sending thread at most the session's peer timeout and this
# (ZmqLink's own send timeout, 60 s, ends a send the peer does not take before then).
MAX_SEND_SECONDS = 65.0


@dataclass(frozen=True)
class WorkerPlane:
    """A worker's side of the data plane, shared by its steps: the mailbox its peers' messages
    arrive in, how tensors go between its device and the wire, its sending thread (staged
    transfers only) and its metrics (an optional ``gpu_worker.metrics.WorkerMetrics``)."""

    mailbox: Mailbox
    transfers: DirectTransfers | StagedTransfers
    outgoing: Outgoing | None
    device: torch.device
    metrics: Any = None


class StepExchange:
    def __init__(
        self,
        plane: WorkerPlane,
        session: Session,
        trace_context: Mapping[str, str],
        superseded: Callable[[], bool],
    ) -> None:
        """``superseded()``: whether ``session`` is no longer the running one (aborted, or another
        attempt), which ends a send still waiting for the peer."""
        self.session = session
        self.mailbox = plane.mailbox
        self.transfers = plane.transfers
        self.outgoing = plane.outgoing
        self.metrics = plane.metrics
        self.device = plane.device
        self.trace_context = dict(trace_context)
        self.superseded = superseded
        self.costs = StepCosts()
        self._cuda = plane.device.type == "cuda"

    def timed(self, fn, *args) -> Any:
        """``fn(*args)``, its compute time counted: on CUDA by events on the compute stream, read
        at the step's end (no device sync here, so the CPU queues ahead and copies overlap)."""
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn(*args)
            end.record(stream)
            self.costs.compute_events.append((start, end))
            return out
        start = time.perf_counter()
        out = fn(*args)
        self.costs.compute_seconds += time.perf_counter() - start
        return out

    def send(self, step: int, kind: int, tensors: dict[str, torch.Tensor]) -> None:
        """Stages ``tensors`` for the wire (device-to-host where the transfers need it) and sends
        them; staged buffers go back to their pool once the transport is done reading them. With
        staged transfers the copy's wait and the send run on the sending thread (``Outgoing``)
        while this thread computes on; the step's end waits for them (``flush``)."""
        costs, peer_timeout = self.costs, self.session.peer_timeout
        if not self.transfers.overlaps:
            staged = self.transfers.to_host(tensors, costs, peer_timeout)
            start = time.perf_counter()
            try:
                sent = self._send_now(step, kind, staged)
            finally:
                costs.send_seconds += time.perf_counter() - start
            costs.send_seconds -= sent.frame_copy_seconds  # counted as a copy, not as wire time
            costs.frame_copy_seconds += sent.frame_copy_seconds
            self._count_sent(sent)
            return
        staged, copied = self.transfers.stage(tensors, peer_timeout)

        def copy_and_send() -> tuple[int, float, Sent, float]:
            try:
                copies, copy_seconds = copied()
            except BaseException:
                staged.release(None)
                raise
            start = time.perf_counter()
            sent = self._send_now(step, kind, staged)
            return copies, copy_seconds, sent, time.perf_counter() - start

        self.outgoing.submit(copy_and_send)

    def _send_now(self, step: int, kind: int, staged: Staged) -> Sent:
        st, mailbox, superseded = self.session, self.mailbox, self.superseded
        rid = st.request_id
        try:
            # The mailbox is closed on abort or cancel, and a later attempt of the request is
            # another session: a send still waiting for the peer ends then.
            sent = st.link.send(
                rid,
                step,
                kind,
                staged.tensors,
                self.trace_context,
                cancelled=lambda: not mailbox.is_open(rid) or superseded(),
                session=st.nonce,
                zero_copy=self.transfers.zero_copy,
            )
        except BaseException:
            staged.release(None)  # nothing was queued (a message goes all or nothing)
            raise
        staged.release(sent.tracker)
        return sent

    def _count_sent(self, sent: Sent) -> None:
        self.costs.bytes_sent += sent.nbytes
        self.costs.frame_copies += sent.frame_copies
        if self.metrics is not None:
            self.metrics.sent_bytes.inc(sent.nbytes)

    def flush(self) -> None:
        """Waits for the step's sends still on the sending thread (the wait is this thread's
        send time) and counts their copies, bytes and the time they took there, overlapped."""
        if not self.transfers.overlaps:
            return
        costs, start = self.costs, time.perf_counter()
        try:
            done = self.outgoing.flush(self.session.peer_timeout + MAX_SEND_SECONDS)
        finally:
            costs.send_seconds += time.perf_counter() - start
        for copies, copy_seconds, sent, send_seconds in done:
            costs.device_to_host_copies += copies
            # a link that copies into a frame copied there too, overlapped like the rest
            costs.overlapped_copy_seconds += copy_seconds + sent.frame_copy_seconds
            costs.overlapped_send_seconds += send_seconds - sent.frame_copy_seconds
            self._count_sent(sent)

    def receive(self, step: int, kind: int) -> dict[str, torch.Tensor]:
        """The peer's tensors of ``step`` on this worker's device."""
        st = self.session
        start = time.perf_counter()
        try:
            msg = self.mailbox.take(st.request_id, kind, step, st.peer_timeout, peer=st.peer)
        finally:
            self.costs.receive_wait_seconds += time.perf_counter() - start
        self.costs.bytes_received += msg.nbytes
        return self.transfers.to_device(msg.tensors, self.costs)

    def timed_wait(self, wait: Callable[[], Any]) -> Any:
        """``wait()`` (a control wait: a speculative step's resolution), counted as such."""
        start = time.perf_counter()
        try:
            return wait()
        finally:
            self.costs.resolve_wait_seconds += time.perf_counter() - start

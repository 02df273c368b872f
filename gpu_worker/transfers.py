"""Tensor transfers between the device and the data plane, counted and timed per step.

Two ways, chosen by the worker's device (``transfers_for``):

- ``DirectTransfers`` (CPU): tensors go to the wire as they are (the wire reads them in place,
  ZeroMQ copies them into its message) and come back as the mailbox decoded them: no copy of
  ours, nothing to count.
- ``StagedTransfers`` (CUDA): before a send, the tensors are copied device-to-host on a side
  stream straight into ONE pinned host buffer per message from a bounded ``HostBufferPool``,
  laid out as the message's payload (``hybridiff.wire.Payload``: each tensor at its 64-byte
  aligned offset, room for the header in front); the sender waits on the copy's event (not on
  the device), the link writes the header in front and sends the buffer as the message's one
  frame, zero-copy. A buffer goes back to the pool only when ZeroMQ's tracker says it no longer
  reads it. After a receive, the mailbox has
  already decoded the message into pinned memory (on its IO thread); the copy to the device is
  issued ``non_blocking`` on the compute stream, so the compute thread does not wait for it and
  the kernels that use it are ordered after it. Device memory for received tensors comes from
  torch's caching allocator (reused blocks, not fresh allocations, once warm); pinned receive
  buffers from torch's caching host allocator, which keeps a block until the copies reading it
  have completed.

Where the copies overlap compute: a send's device-to-host copy is queued on the side stream
after the work that produced the tensor, and the engine hands the wait for it and the send to
its sending thread (``gpu_worker.outgoing``, ``stage``): the compute thread goes on with what the
schedule has next — in the nested window the outer ring's second half after the core's input
left, the scheduler step after a prediction left — and the copy engine works meanwhile; the
step waits at its end only for what is still in flight. Across workers, in the pipeline window
the stage-1 worker's activations are copied and sent while its peer computes stage 2 on the
previous step's activations, and a receive's host-to-device copy is queued without blocking
the compute thread. ``StagedTransfers`` also runs on CPU (pool, sending thread and zero-copy
sends, without pinning or streams; the copy itself is done on the sending thread), which is
how the suite exercises it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from hybridiff.errors import PeerTimeout
from hybridiff.step_stats import other_seconds
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.wire import Payload

PER_KEY = 4  # buffers of one shape and dtype: a step has at most a few sends of one kind in flight
MAX_KEYS = 32  # shapes and dtypes kept; the least recently used idle ones are dropped first
# Host bytes the pool holds at most (pinned memory counts against the pod's memory limit; the
# caching host allocator rounds a block up to a power of two): idle buffers are dropped, the least
# recently used layouts first, to make room, and a send waits for room beyond it.
MAX_BYTES = 2 << 30
POLL_SECONDS = 0.001


class Tracker(Protocol):
    """What a pool buffer waits on: ``zmq.MessageTracker`` (``done``) or anything like it."""

    @property
    def done(self) -> bool: ...


@dataclass
class StepCosts:
    """What one step spent on the compute thread besides compute, with counts and bytes: the
    fields of the public ``WorkerStep`` the step accumulates, by the same names (``report``)."""

    compute_seconds: float = 0.0
    device_to_host_copies: int = 0
    device_to_host_seconds: float = 0.0
    host_to_device_copies: int = 0
    host_to_device_seconds: float = 0.0
    frame_copies: int = 0  # tensors copied into a fresh message frame (every send on CPU)
    frame_copy_seconds: float = 0.0
    send_seconds: float = 0.0
    receive_wait_seconds: float = 0.0
    resolve_wait_seconds: float = 0.0  # a speculative step waiting for its resolution
    # Staged sends on the sending thread, while this one computed on: their device-to-host
    # copies (waited for there) and their hand-over to the transport.
    overlapped_copy_seconds: float = 0.0
    overlapped_send_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    # CUDA copies timed by events, read once the step's work is done: (start, end) pairs.
    pending: list[tuple[Any, Any]] = field(default_factory=list)
    # CUDA compute timed by events on the compute stream, read at the step's end likewise.
    compute_events: list[tuple[Any, Any]] = field(default_factory=list)

    def finish(self) -> StepCosts:
        """Adds the device time of the step's pending host-to-device copies and compute."""
        for start, end in self.pending:
            end.synchronize()
            self.host_to_device_seconds += start.elapsed_time(end) / 1000
        for start, end in self.compute_events:
            end.synchronize()
            self.compute_seconds += start.elapsed_time(end) / 1000
        self.pending.clear()
        self.compute_events.clear()
        return self

    def report(self, phase: int, wall_seconds: float, command_wait_seconds: float) -> pb.WorkerStep:
        """The step as the worker reports it (``StepDone.report``), once ``finish``ed."""
        counted = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _REPORTED}
        w = pb.WorkerStep(
            phase=phase, wall_seconds=wall_seconds, command_wait_seconds=command_wait_seconds, **counted
        )
        w.other_seconds = other_seconds(w)
        return w


_REPORTED = set(pb.WorkerStep.DESCRIPTOR.fields_by_name)


@dataclass(eq=False)
class _Slot:
    buffer: torch.Tensor  # uint8: one message (HEADER_ROOM, then the payload)
    tracker: Tracker | None = None  # None: free
    in_use: bool = False  # handed out, not yet released
    payload: Payload | None = None  # the tensors' views, of the current use

    def free(self) -> bool:
        return not self.in_use and (self.tracker is None or self.tracker.done)


class HostBufferPool:
    """Host message buffers, at most ``per_key`` per layout (the shapes and dtypes of a message's
    tensors) and ``max_keys`` layouts, handed out for a send and reused only once the transport
    no longer reads them (the tracker a buffer was released with says ``done``). A buffer's
    padding is zeroed once, when allocated. Acquired on the compute thread, released by the
    sending thread too. At most ``max_bytes`` are held (a buffer counted as the power of two the
    pinned allocator rounds it to): idle buffers are dropped to make room, else a send waits for
    one in flight to come free; one message larger than the bound is allowed alone."""

    def __init__(
        self, pin: bool = False, per_key: int = PER_KEY, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES
    ) -> None:
        self.pin = pin
        self.per_key = per_key
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0  # held now, as counted against max_bytes
        self._slots: OrderedDict[tuple, list[_Slot]] = OrderedDict()
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated (a test counts reuse by it)
        self.dropped = 0  # buffers dropped to stay within the bounds

    def acquire(self, specs: Mapping[str, tuple[torch.Size, torch.dtype]], timeout: float) -> _Slot:
        """A free message buffer for tensors of these names, shapes and dtypes (its ``payload``);
        waits for one in flight when all ``per_key`` are, ``PeerTimeout`` when none comes free
        within ``timeout`` seconds."""
        key = tuple((tuple(shape), dtype) for shape, dtype in specs.values())
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                slots = self._slots.setdefault(key, [])
                self._slots.move_to_end(key)
                slot = next((s for s in slots if s.free()), None)
                nbytes = self._counted(Payload.buffer_bytes(key))
                if slot is None and len(slots) < self.per_key and self._make_room(nbytes):
                    buffer = torch.empty(Payload.buffer_bytes(key), dtype=torch.uint8, pin_memory=self.pin)
                    slot = _Slot(buffer)
                    Payload(buffer, specs).zero_padding()
                    slots = self._slots.setdefault(key, slots)  # making room may have dropped the empty list
                    slots.append(slot)
                    self.allocated += 1
                    self.bytes += nbytes
                    self._trim()
                if slot is not None:
                    slot.in_use, slot.tracker = True, None
                    slot.payload = Payload(slot.buffer, specs)
                    return slot
            if time.monotonic() >= deadline:
                shapes = [list(shape) for shape, _ in key]
                raise PeerTimeout(f"no send buffer for shapes {shapes} came free in {timeout:.1f}s")
            time.sleep(POLL_SECONDS)

    def release(self, slot: _Slot, tracker: Tracker | None) -> None:
        """``slot`` may be reused once ``tracker`` is done (None: at once)."""
        with self._lock:
            slot.tracker, slot.in_use = tracker, False

    def _counted(self, nbytes: int) -> int:
        """What a buffer of ``nbytes`` holds: pinned blocks are rounded up to a power of two."""
        return 1 << (nbytes - 1).bit_length() if self.pin and nbytes > 1 else nbytes

    def _make_room(self, nbytes: int) -> bool:
        """Drop idle buffers, the least recently used layouts first, until ``nbytes`` more fit;
        whether they do (or nothing else is held: one message above the bound goes alone)."""
        if self.bytes + nbytes > self.max_bytes:
            for key in list(self._slots):
                self._drop_idle(key, lambda: self.bytes + nbytes > self.max_bytes)
        return self.bytes + nbytes <= self.max_bytes or self.bytes == 0

    def _drop_idle(self, key: tuple, more: Callable[[], bool] = lambda: True) -> None:
        kept = []
        for slot in self._slots[key]:
            if slot.free() and more():
                self.bytes -= self._counted(slot.buffer.numel())
                self.dropped += 1
            else:
                kept.append(slot)
        freed = len(kept) < len(self._slots[key])
        self._slots[key] = kept
        if not kept:
            del self._slots[key]
        if freed and self.pin:
            torch.accelerator.empty_host_cache()  # the caching host allocator gives the blocks back

    def _trim(self) -> None:
        for key in list(self._slots)[: max(0, len(self._slots) - self.max_keys)]:
            self._drop_idle(key)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._slots.values())


@dataclass
class Staged:
    """Tensors ready for the wire (a ``Payload`` when staged in a pool buffer) and the pool
    buffers behind them."""

    tensors: Mapping[str, torch.Tensor]
    slots: list[_Slot]
    pool: HostBufferPool | None = None

    def release(self, tracker: Tracker | None) -> None:
        for slot in self.slots:
            self.pool.release(slot, tracker)


class DirectTransfers:
    """CPU: no copies of ours; a tensor on another device is moved plainly (counted)."""

    zero_copy = False
    overlaps = False  # sends stay on the compute thread

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def to_host(self, tensors: Mapping[str, torch.Tensor], costs: StepCosts, timeout: float) -> Staged:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if t.device.type != "cpu":
                start = time.perf_counter()
                t = t.cpu()
                costs.device_to_host_copies += 1
                costs.device_to_host_seconds += time.perf_counter() - start
            out[name] = t
        return Staged(out, [])

    def to_device(self, tensors: Mapping[str, torch.Tensor], costs: StepCosts) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if t.device != self.device:
                start = time.perf_counter()
                t = t.to(self.device)
                costs.host_to_device_copies += 1
                costs.host_to_device_seconds += time.perf_counter() - start
            out[name] = t
        return out


# Waits until a staged message's copies are in its buffer: (copies, their seconds).
Copied = Callable[[], tuple[int, float]]


class StagedTransfers:
    """Device-to-host into pooled (pinned on CUDA) buffers, zero-copy sends from the engine's
    sending thread, non-blocking host-to-device; see the module docstring."""

    zero_copy = True
    overlaps = True  # the engine sends from its sending thread (``stage``)

    def __init__(self, device: torch.device, pool: HostBufferPool | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = pool if pool is not None else HostBufferPool(pin=self.cuda)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def to_host(self, tensors: Mapping[str, torch.Tensor], costs: StepCosts, timeout: float) -> Staged:
        """``stage``, waiting for the copies."""
        staged, copied = self.stage(tensors, timeout)
        copies, seconds = copied()
        costs.device_to_host_copies += copies
        costs.device_to_host_seconds += seconds
        return staged

    def stage(self, tensors: Mapping[str, torch.Tensor], timeout: float) -> tuple[Staged, Copied]:
        """A pool buffer laid out for ``tensors`` with their copies into it under way (on CUDA:
        queued on the side stream after the work that produces them; on CPU: done by the
        ``Copied`` call), and the call that waits for them. The tensors must not change until
        then (the engine never writes a tensor it has sent)."""
        slot = self.pool.acquire({name: (t.shape, t.dtype) for name, t in tensors.items()}, timeout)
        staged = Staged(slot.payload, [slot], self.pool)
        pairs = [(t, slot.payload[name]) for name, t in tensors.items() if t.numel()]
        if not self.cuda:
            return staged, lambda: _copy_on_host(pairs)
        try:
            ready = self._copy_on_side_stream(pairs)
        except BaseException:
            staged.release(None)
            raise
        return staged, ready

    def _copy_on_side_stream(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Copied:
        """Queues the copy of each (tensor, pinned view) pair into the view on the side stream,
        after the work queued so far on the compute stream (which produced the tensors); the
        call returned waits for the copies only (not for the device) and gives their device time."""
        compute = torch.cuda.current_stream(self.device)
        start, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            for t, host in pairs:
                host.copy_(t, non_blocking=True)
                if t.is_cuda:
                    t.record_stream(self.stream)  # the allocator keeps t until the copy has read it
            ready.record(self.stream)

        def wait() -> tuple[int, float]:
            ready.synchronize()  # the send reads the buffers: they must hold the copies
            return len(pairs), start.elapsed_time(ready) / 1000

        return wait

    def to_device(self, tensors: Mapping[str, torch.Tensor], costs: StepCosts) -> dict[str, torch.Tensor]:
        if not self.cuda:
            return DirectTransfers(self.device).to_device(tensors, costs)
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        # From pinned memory (the mailbox decodes into it) the copy is asynchronous; the caching
        # host allocator keeps the pinned block until it has completed.
        out = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        end.record(compute)
        costs.host_to_device_copies += len(out)
        costs.pending.append((start, end))
        return out


def _copy_on_host(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    start = time.perf_counter()
    for t, host in pairs:
        host.copy_(t)
    return len(pairs), time.perf_counter() - start


def transfers_for(device: torch.device | str) -> DirectTransfers | StagedTransfers:
    """Staged transfers on CUDA, direct ones elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return StagedTransfers(device)
    return DirectTransfers(device)

"""Every call the coordinator makes to a worker, and the one mapping of a worker's errors to
what the client is told.

``RemoteWorker`` is the handle on a remote worker: one control-API Session stream per request.

Commands are queued onto the stream as they are issued (the driver sends steps ahead); the
worker answers each with one event, in order, which resolves the oldest pending future (a
speculative step's ResolveCommand has none: the step's own event answers it). A Begin's
checkpoint goes in parts after it (``hybridiff.checkpoint_parts``), which have no event either. A
broken stream fails every pending future with the typed error the worker sent
(``hybridiff.errors.from_rpc_error``), naming the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import grpc

from hybridiff.checkpoint_parts import PART_BYTES, in_parts
from hybridiff.errors import (
    BadCommand,
    Cancelled,
    DeadlineExceeded,
    HybridiffError,
    InvalidArgument,
    Unavailable,
    WorkerFailed,
    from_rpc_error,
    status_details,
)
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import COORDINATOR_METADATA

log = logging.getLogger(__name__)
_END = object()
NO_EVENT = ("resolve", "checkpoint_part")  # commands without an event of their own
MEASURE_SPLIT_TIMEOUT = 300.0  # a worker measures a size once (a few forwards) and keeps it


class WorkerFault(Exception):
    """A request failed because of one worker: ``error`` is what the client is told, ``worker``
    the one the pool quarantines (the others of the lease are released healthy)."""

    def __init__(self, error: HybridiffError, worker: str) -> None:
        super().__init__(str(error))
        self.error, self.worker = error, worker


def as_seen_by_the_client(worker: str, cause: BaseException, what: str = "a command") -> BaseException:
    """A worker's failure as the client sees it, naming the worker. A worker refusing a command
    (or a call) is this service's fault, not the caller's: INTERNAL. A control call that broke
    without one of our typed errors stays UNAVAILABLE when the worker is gone (a retry may find
    another) and is INTERNAL otherwise; one that was not answered in time is UNAVAILABLE. Every
    other error keeps its type."""
    if isinstance(cause, grpc.RpcError):
        if "ErrorInfo" not in status_details(cause):  # not one of ours: its text is the worker's internals
            if cause.code() == grpc.StatusCode.UNAVAILABLE:
                return Unavailable(f"worker {worker} is unreachable ({what})", worker=worker)
            return WorkerFailed(
                f"worker {worker}: {what} failed ({cause.code().name}); see its log", worker=worker
            )
        typed = from_rpc_error(cause, prefix=f"worker {worker}: {what}: ")
        if isinstance(typed, (DeadlineExceeded, Cancelled)):
            return Unavailable(f"worker {worker} did not answer {what}: {cause.details()}", worker=worker)
        if isinstance(typed, InvalidArgument):
            return WorkerFailed(
                f"worker {worker} refused {what} ({typed.reason}): {cause.details()}", worker=worker
            )
        if isinstance(typed, Unavailable):
            return typed
        return WorkerFailed(
            f"worker {worker} failed {what} ({typed.reason}): {cause.details()}", worker=worker
        )
    if isinstance(cause, BadCommand):
        return WorkerFailed(f"worker {worker} refused {what} ({cause.reason}): {cause}")
    return cause


def measure_split(
    stub: worker_pb2_grpc.WorkerControlServiceStub,
    worker: str,
    width: int,
    height: int,
    check_alive: Callable[[], None],
    poll_seconds: float,
) -> worker_pb2.MeasureSplitResponse:
    """The balanced stage cut at a size and what a step's parts cost there, measured by
    ``worker``: a call that a cancel or a passed deadline (``check_alive`` raising) ends at once;
    its failure is a ``WorkerFault`` naming it."""
    call = stub.MeasureSplit.future(
        worker_pb2.MeasureSplitRequest(width=width, height=height), timeout=MEASURE_SPLIT_TIMEOUT
    )
    try:
        while True:
            try:
                return call.result(timeout=poll_seconds)
            except grpc.FutureTimeoutError:
                check_alive()
    except grpc.RpcError as err:
        raise WorkerFault(as_seen_by_the_client(worker, err, "MeasureSplit"), worker) from None
    finally:
        call.cancel()  # no-op once done


# The sessions' reader threads: each reads one worker's stream and may outlive its request; at the
# end of a drain, once the worker channels are closed, ``join_session_readers`` waits for them.
_readers: set[threading.Thread] = set()
_readers_lock = threading.Lock()


def join_session_readers(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every session's reader thread; whether all ended."""
    deadline = time.monotonic() + timeout
    with _readers_lock:
        readers = [t for t in _readers if t is not threading.current_thread()]
    for t in readers:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in readers)


class WorkerSession:
    """One request's control Session stream to one worker: commands queued in order, each
    answered by one event, read by a thread of its own."""

    def __init__(
        self, stub: worker_pb2_grpc.WorkerControlServiceStub, worker: str, coordinator: str = ""
    ) -> None:
        """``coordinator``: this coordinator's identity, sent as call metadata (the worker tells
        another coordinator's session from one of this coordinator's)."""
        self.worker = worker
        self._outbox: queue.Queue = queue.Queue()
        self._pending: deque[tuple[Future, str]] = deque()
        self._lock = threading.Lock()
        self._failed: HybridiffError | None = None
        metadata = [(COORDINATOR_METADATA, coordinator)] if coordinator else None
        self._call = stub.Session(iter(self._outbox.get, _END), wait_for_ready=False, metadata=metadata)
        self._reader = threading.Thread(target=self._read, name=f"session-{worker}", daemon=True)
        with _readers_lock:
            _readers.add(self._reader)
        self._reader.start()

    def send(self, command: worker_pb2.SessionRequest) -> Future:
        fut: Future = Future()
        which = command.WhichOneof("command")
        with self._lock:
            if self._failed is not None:
                fut.set_exception(self._failed)
                return fut
            if which in NO_EVENT:
                fut.set_result(None)  # answered by the event of the command it belongs to
            else:
                self._pending.append((fut, which))
        self._outbox.put(command)
        return fut

    def _read(self) -> None:
        try:
            self._read_events()
        finally:
            with _readers_lock:
                _readers.discard(threading.current_thread())

    def _read_events(self) -> None:
        try:
            for event in self._call:
                with self._lock:
                    fut, kind = self._pending.popleft()
                which = event.WhichOneof("event")
                if which != kind:
                    fut.set_exception(WorkerFailed(f"worker {self.worker}: answered {which} to {kind}"))
                else:
                    fut.set_result(event)
            self._fail(WorkerFailed(f"worker {self.worker}: session ended early"))
        except grpc.RpcError as err:
            self._fail(from_rpc_error(err, prefix=f"worker {self.worker}: "))
        except Exception as exc:  # a malformed event must not leave the driver waiting
            self._fail(WorkerFailed(f"worker {self.worker}: bad event: {exc}"))

    def _fail(self, error: HybridiffError) -> None:
        with self._lock:
            self._failed = self._failed or error
            pending, self._pending = list(self._pending), deque()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(error)

    def close(self) -> None:
        self._outbox.put(_END)

    def cancel(self) -> None:
        self._call.cancel()
        self._outbox.put(_END)


class RemoteWorker:
    """A ``WorkerHandle`` (coordinator.driver) over one worker's control channel: a Begin opens
    a new Session stream, a Finish closes it."""

    def __init__(
        self,
        worker_id: str,
        channel: grpc.Channel,
        data_address: str,
        identity: str = "",
        coordinator: str = "",
        part_bytes: int = PART_BYTES,
    ) -> None:
        """``part_bytes``: the size of the parts a Begin's checkpoint is sent in."""
        self.name = worker_id
        self.part_bytes = part_bytes
        self.coordinator = coordinator
        self.data_address = data_address
        self.identity = identity or worker_id
        self._stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
        self._session: WorkerSession | None = None

    def send(self, cmd: worker_pb2.SessionRequest) -> Future:
        which = cmd.WhichOneof("command")
        if which == "begin":
            self._session = WorkerSession(self._stub, self.name, self.coordinator)
        first, *parts = in_parts(cmd, self.part_bytes)
        fut = self._session.send(first)
        for part in parts:
            self._session.send(part)
        if which == "finish":
            self._session.close()
        return fut

    def abort(self, request_id: str) -> None:
        if self._session is not None:
            self._session.cancel()

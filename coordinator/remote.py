"""The coordinator's handle on a remote worker: one control-API Session stream per request.

Commands are queued onto the stream as they are issued (the driver sends steps ahead); the
worker answers each with one event, in order, which resolves the oldest pending future (a
speculative step's ResolveCommand has none: the step's own event answers it). A
broken stream fails every pending future with the typed error the worker sent
(``hybridiff.errors.from_rpc_error``), naming the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future

import grpc

from hybridiff.errors import HybridiffError, WorkerFailed, from_rpc_error
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
_END = object()


class _Session:
    def __init__(self, stub: worker_pb2_grpc.WorkerControlServiceStub, worker: str) -> None:
        self.worker = worker
        self._outbox: queue.Queue = queue.Queue()
        self._pending: deque[tuple[Future, str]] = deque()
        self._lock = threading.Lock()
        self._failed: HybridiffError | None = None
        self._call = stub.Session(iter(self._outbox.get, _END), wait_for_ready=False)
        self._reader = threading.Thread(target=self._read, name=f"session-{worker}", daemon=True)
        self._reader.start()

    def send(self, command: worker_pb2.SessionRequest) -> Future:
        fut: Future = Future()
        which = command.WhichOneof("command")
        with self._lock:
            if self._failed is not None:
                fut.set_exception(self._failed)
                return fut
            if which == "resolve":
                fut.set_result(None)  # a resolution has no event: its step's event follows it
            else:
                self._pending.append((fut, which))
        self._outbox.put(command)
        return fut

    def _read(self) -> None:
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

    def __init__(self, worker_id: str, channel: grpc.Channel, data_address: str, identity: str = "") -> None:
        self.name = worker_id
        self.data_address = data_address
        self.identity = identity or worker_id
        self._stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
        self._session: _Session | None = None

    def send(self, cmd: worker_pb2.SessionRequest) -> Future:
        which = cmd.WhichOneof("command")
        if which == "begin":
            self._session = _Session(self._stub, self.name)
        fut = self._session.send(cmd)
        if which == "finish":
            self._session.close()
        return fut

    def abort(self, request_id: str) -> None:
        if self._session is not None:
            self._session.cancel()

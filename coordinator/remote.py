"""The coordinator's handle on a remote worker: one control-API Session stream per request.

Commands are queued onto the stream as they are issued (the driver sends steps ahead); the
worker answers each with one event, in order, which resolves the oldest pending future. A
broken stream fails every pending future with a typed error naming the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future

import grpc

from hybridiff.api.v1 import worker_pb2_grpc
from hybridiff.errors import Cancelled, DeadlineExceeded, HybridiffError, InvalidArgument, Unavailable, WorkerFailed
from hybridiff.messages import (BeginCommand, StepCommand, begin_to_proto, finish_report_from_proto,
                                step_report_from_proto, step_to_proto)

log = logging.getLogger(__name__)
_END = object()


def error_from_rpc(worker: str, err: grpc.RpcError) -> HybridiffError:
    """Map a worker's gRPC failure to the error the coordinator reports."""
    code, details = err.code(), err.details()
    text = f"worker {worker}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(text)
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(text)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(text)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("worker", text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Unavailable(text)
    return WorkerFailed(text)


class _Session:
    def __init__(self, stub: worker_pb2_grpc.WorkerControlStub, worker: str) -> None:
        self.worker = worker
        self._outbox: queue.Queue = queue.Queue()
        self._pending: deque[tuple[Future, str]] = deque()
        self._lock = threading.Lock()
        self._failed: HybridiffError | None = None
        self._call = stub.Session(iter(self._outbox.get, _END), wait_for_ready=False)
        self._reader = threading.Thread(target=self._read, name=f"session-{worker}", daemon=True)
        self._reader.start()

    def send(self, command, kind: str) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._failed is not None:
                fut.set_exception(self._failed)
                return fut
            self._pending.append((fut, kind))
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
                elif which == "begin":
                    fut.set_result(event.begin.encoding_seconds)
                elif which == "step":
                    fut.set_result(step_report_from_proto(event))
                else:
                    fut.set_result(finish_report_from_proto(event))
            self._fail(WorkerFailed(f"worker {self.worker}: session ended early"))
        except grpc.RpcError as err:
            self._fail(error_from_rpc(self.worker, err))
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
    """A ``WorkerHandle`` (coordinator.driver) over one worker's control channel."""

    def __init__(self, worker_id: str, channel: grpc.Channel, data_address: str) -> None:
        self.name = worker_id
        self.data_address = data_address
        self._stub = worker_pb2_grpc.WorkerControlStub(channel)
        self._session: _Session | None = None

    def begin(self, cmd: BeginCommand) -> Future:
        self._session = _Session(self._stub, self.name)
        return self._session.send(begin_to_proto(cmd), "begin")

    def step(self, cmd: StepCommand) -> Future:
        return self._session.send(step_to_proto(cmd), "step")

    def finish(self, request_id: str, decode: bool) -> Future:
        from hybridiff.api.v1 import worker_pb2

        fut = self._session.send(
            worker_pb2.WorkerCommand(request_id=request_id, finish=worker_pb2.FinishCommand(decode=decode)), "finish")
        self._session.close()
        return fut

    def abort(self, request_id: str) -> None:
        if self._session is not None:
            self._session.cancel()

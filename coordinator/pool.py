"""The worker pool and pair allocator (DESIGN section 2).

Discovery reports workers (``worker_ready`` / ``worker_gone``); the pool connects to each,
reads its ``WorkerInfo`` and keeps its state: joining -> idle <-> busy, draining (gone while
busy: no new work), unhealthy (a failed request; probed until it answers again). Requests wait
in one FIFO admission queue of bounded length; the head of the queue takes the workers it
needs — two idle workers serving its model (one per guidance branch), or in AUTO mode a lone
idle worker rather than waiting. A worker is never in two requests at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from coordinator.allocation import PoolView
from hybridiff.errors import DeadlineExceeded, InvalidArgument, ModelNotFound, QueueFull, Unavailable
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

JOINING, IDLE, BUSY, DRAINING, UNHEALTHY = "joining", "idle", "busy", "draining", "unhealthy"
STATES = (JOINING, IDLE, BUSY, DRAINING, UNHEALTHY)


@dataclass
class WorkerEntry:
    worker_id: str
    address: str
    channel: grpc.Channel
    state: str = JOINING
    info: worker_pb2.InfoResponse | None = None
    request_id: str = ""
    gone: bool = False
    stub: worker_pb2_grpc.WorkerControlServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = worker_pb2_grpc.WorkerControlServiceStub(self.channel)

    @property
    def model(self) -> str:
        return self.info.model_name if self.info else ""


class WorkerPool:
    def __init__(
        self,
        channel_factory: Callable[[str], grpc.Channel],
        queue_capacity: int = 16,
        probe_interval: float = 1.0,
        on_change: Callable[[WorkerPool], None] | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self.queue_capacity = queue_capacity
        self.probe_interval = probe_interval
        self._on_change = on_change
        self._cond = threading.Condition()
        self._workers: dict[str, WorkerEntry] = {}
        self._waiting: list[int] = []
        self._wants: dict[int, tuple[str, int, bool]] = {}  # ticket -> (model, want, accept_one)
        self._tickets = itertools.count()
        self._closed = False

    # --- discovery sink -------------------------------------------------------------
    def worker_ready(self, worker_id: str, address: str) -> None:
        with self._cond:
            entry = self._workers.get(worker_id)
            if entry is not None and entry.address == address and not entry.gone:
                return
            if entry is not None and not entry.gone:
                # Replaced: a busy one finishes its request, then leaves; any other goes now (and
                # its probe, if it is still being probed, ends instead of dialling the old address).
                entry.gone = True
                if entry.state != BUSY:
                    entry.channel.close()
            entry = WorkerEntry(worker_id, address, self._channel_factory(address))
            self._workers[worker_id] = entry
        threading.Thread(target=self._probe, args=(entry,), name=f"probe-{worker_id}", daemon=True).start()
        self._changed()

    def worker_gone(self, worker_id: str) -> None:
        with self._cond:
            entry = self._workers.get(worker_id)
            if entry is None:
                return
            entry.gone = True
            if entry.state == BUSY:
                entry.state = DRAINING
            else:
                self._remove(entry)
            self._cond.notify_all()
        self._changed()

    def _remove(self, entry: WorkerEntry) -> None:
        if self._workers.get(entry.worker_id) is entry:
            del self._workers[entry.worker_id]
        entry.channel.close()

    def _probe(self, entry: WorkerEntry) -> None:
        """Read the worker's info until it answers (it may still be loading its model)."""
        while not self._closed and not entry.gone:
            try:
                info = entry.stub.Info(worker_pb2.InfoRequest(), timeout=5)
            except grpc.RpcError as err:
                log.debug("worker %s not ready: %s", entry.worker_id, err.code())
                time.sleep(self.probe_interval)
                continue
            except ValueError:  # its channel was closed meanwhile: it is gone or replaced
                return
            with self._cond:
                if entry.gone:
                    return
                entry.info = info
                entry.state = IDLE
                self._cond.notify_all()
            log.info(
                "worker %s joined: model %s (%s) on %s",
                entry.worker_id,
                info.model_name,
                info.arch,
                info.device,
            )
            self._changed()
            return

    def _changed(self) -> None:
        if self._on_change:
            self._on_change(self)

    # --- allocation -----------------------------------------------------------------
    def model_info(self, model: str) -> worker_pb2.InfoResponse:
        """Info of a worker serving ``model`` ("" = the only served model)."""
        with self._cond:
            infos = {e.model: e.info for e in self._workers.values() if e.info is not None and not e.gone}
        if not infos:
            raise Unavailable("no workers are ready")
        if not model:
            if len(infos) > 1:
                raise InvalidArgument(
                    "model", f"several models are served ({', '.join(sorted(infos))}); name one"
                )
            return next(iter(infos.values()))
        if model not in infos:
            raise ModelNotFound(f"model {model!r} is not served here; served: {', '.join(sorted(infos))}")
        return infos[model]

    def acquire(
        self,
        model: str,
        want: int,
        accept_one: bool,
        request_id: str,
        timeout: float,
        check_alive: Callable[[], None] | None = None,
        admission: Callable[[PoolView], tuple[int, bool]] | None = None,
    ) -> list[WorkerEntry]:
        """Wait in the admission queue for ``want`` idle workers of ``model`` (or one when
        ``accept_one``); ``QueueFull`` at once when the queue is full. With ``admission``, the
        width is decided again from the pool as it is when the request reaches the head."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                raise Unavailable("the coordinator is draining")
            if len(self._waiting) >= self.queue_capacity:
                raise QueueFull(f"admission queue is full ({self.queue_capacity} waiting)")
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            self._wants[ticket] = (model, want, accept_one)
            self._changed()  # the condition's lock is reentrant
            try:
                while True:
                    if self._closed:
                        raise Unavailable("the coordinator is draining")
                    serving = [e for e in self._workers.values() if e.model == model and not e.gone]
                    if not serving:
                        raise Unavailable(f"no worker serves model {model!r} any more")
                    idle = [e for e in serving if e.state == IDLE]
                    if self._waiting[0] == ticket:
                        if admission is not None:
                            want, accept_one = admission(self._view(model, behind=ticket))
                            self._wants[ticket] = (model, want, accept_one)
                        take = want if len(idle) >= want else (1 if accept_one and idle else 0)
                        if take:
                            chosen = sorted(idle, key=lambda e: e.worker_id)[:take]
                            for e in chosen:
                                e.state, e.request_id = BUSY, request_id
                            return chosen
                        if want > len(serving) and not accept_one:
                            raise Unavailable(f"{want} workers needed, {len(serving)} serve model {model!r}")
                    if check_alive:
                        self._cond.release()
                        try:
                            check_alive()
                        finally:
                            self._cond.acquire()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DeadlineExceeded("no workers became free in time")
                    self._cond.wait(min(remaining, 0.5))
            finally:
                self._waiting.remove(ticket)
                self._wants.pop(ticket, None)
                self._cond.notify_all()
                self._changed()  # the condition's lock is reentrant

    def take_idle(self, model: str, count: int, request_id: str) -> list[WorkerEntry]:
        """Up to ``count`` idle workers of ``model`` at once, ahead of the queue: a request that
        lost a worker mid-way resumes before new requests start."""
        with self._cond:
            idle = sorted(
                (e for e in self._workers.values() if e.model == model and e.state == IDLE and not e.gone),
                key=lambda e: e.worker_id,
            )[:count]
            for e in idle:
                e.state, e.request_id = BUSY, request_id
        if idle:
            self._changed()
        return idle

    def release(self, entries: list[WorkerEntry], failed: bool = False) -> None:
        with self._cond:
            for e in entries:
                e.request_id = ""
                if e.gone:
                    self._remove(e)
                elif failed:
                    e.state = UNHEALTHY
                    threading.Thread(target=self._probe, args=(e,), daemon=True).start()
                else:
                    e.state = IDLE
            self._cond.notify_all()
        self._changed()

    def lease(
        self,
        model: str,
        want: int,
        accept_one: bool,
        request_id: str,
        timeout: float,
        check_alive: Callable[[], None] | None = None,
        admission: Callable[[PoolView], tuple[int, bool]] | None = None,
    ) -> Lease:
        """``acquire`` as a ``Lease`` that owns the request's workers until released."""
        entries = self.acquire(model, want, accept_one, request_id, timeout, check_alive, admission)
        return Lease(self, model, request_id, entries)

    def _view(self, model: str, behind: int | None = None) -> PoolView:
        """The pool as a request of ``model`` sees it (with ``behind``: the waiters after that ticket)."""
        idle = sum(e.model == model and e.state == IDLE and not e.gone for e in self._workers.values())
        queue = self._waiting[self._waiting.index(behind) + 1 :] if behind is not None else self._waiting
        waiters = [self._wants[t] for t in queue if self._wants.get(t, ("",))[0] == model]
        takes_one = bool(waiters) and (waiters[0][1] == 1 or waiters[0][2])
        return PoolView(idle=idle, waiting=len(waiters), waiting_takes_one=takes_one)

    def view(self, model: str) -> PoolView:
        with self._cond:
            return self._view(model)

    def demand(self) -> int:
        """Workers busy plus workers wanted by the queued requests (the autoscaler's signal: it
        does not read zero on a saturated pool, as the queue depth alone can)."""
        with self._cond:
            busy = sum(e.state in (BUSY, DRAINING) for e in self._workers.values())
            return busy + sum(want for _, want, _ in self._wants.values())

    # --- introspection ----------------------------------------------------------------
    def snapshot(self) -> list[WorkerEntry]:
        with self._cond:
            return list(self._workers.values())

    def counts(self) -> dict[str, int]:
        with self._cond:
            counts = dict.fromkeys(STATES, 0)
            for e in self._workers.values():
                counts[e.state] += 1
            return counts

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Lease:
    """The workers one request holds: it swaps a failed one for an idle one (``replace_failed``)
    and gives them all back at the end (``release``), each exactly once."""

    def __init__(self, pool: WorkerPool, model: str, request_id: str, entries: list[WorkerEntry]) -> None:
        self.pool, self.model, self.request_id = pool, model, request_id
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def replace_failed(self, worker_id: str, keep: set[str], want: int) -> list[WorkerEntry]:
        """Mark ``worker_id`` unhealthy and return it; keep the workers named in ``keep``; top up to
        ``want`` with idle workers ahead of the queue. ``Unavailable`` when none is left."""
        failed = [e for e in self.entries if e.worker_id == worker_id]
        self.pool.release(failed, failed=True)
        others = [e for e in self.entries if e.worker_id != worker_id]
        kept = [e for e in others if e.worker_id in keep]
        self.pool.release([e for e in others if e.worker_id not in keep])
        self.entries = kept + self.pool.take_idle(self.model, want - len(kept), self.request_id)
        if not self.entries:
            raise Unavailable(f"worker {worker_id} failed and no other worker is free")
        return self.entries

    def release(self, failed: bool = False) -> None:
        entries, self.entries = self.entries, []
        self.pool.release(entries, failed=failed)

    def give_back(self, worker_id: str) -> None:
        """Return one healthy worker to the pool (an elastic shrink): the head waiter may take it."""
        given = [e for e in self.entries if e.worker_id == worker_id]
        self.entries = [e for e in self.entries if e.worker_id != worker_id]
        self.pool.release(given)

    def take_one(self) -> WorkerEntry | None:
        """An idle worker of the lease's model, if one is free and no request waits (an elastic grow)."""
        with self.pool._cond:
            if self.pool._view(self.model).waiting:
                return None
            taken = self.pool.take_idle(self.model, 1, self.request_id)
        self.entries.extend(taken)
        return taken[0] if taken else None

    def split_cut(self, height: int, width: int, timeout: float = 300.0) -> int:
        """The balanced stage cut at this size (each worker measures a size once and keeps it)."""
        request = worker_pb2.MeasureSplitRequest(width=width, height=height)
        return self.entries[0].stub.MeasureSplit(request, timeout=timeout).cut

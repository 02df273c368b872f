"""The worker pool and pair allocator (docs/design.md section 10).

Discovery reports workers (``worker_ready`` / ``worker_gone``); the pool connects to each,
reads its ``WorkerInfo`` and keeps its state:

- joining -> idle <-> busy; a worker that speaks another protocol version is ``incompatible``
  (refused at join, re-read now and then: it never gets a request while it differs);
- busy -> aborting -> idle: after an aborted or cancelled request a worker is free again only
  once its ``Info`` no longer names that request (it finished unwinding the step), or it is
  quarantined when it does not confirm within ``HealthPolicy.abort_confirm`` seconds;
- idle -> unhealthy: one thread of the pool sends every idle worker a ``grpc.health.v1`` Check
  every ``HealthPolicy.idle_check`` seconds, all at once; one not answering SERVING within
  ``idle_check_timeout`` (a stopped process, a hung host, a worker draining) is quarantined before
  a request draws it. Drawing a worker bumps its epoch: a Check in flight then no longer counts;
- busy -> unhealthy (quarantined) -> idle: a worker that failed a request is probed with
  ``grpc.health.v1`` Check and ``Info`` (a stuck worker's other gRPC threads still answer
  ``Info``, but its watchdog turns health NOT_SERVING, and a stopped process answers nothing)
  and re-admitted only after ``readmit_probes`` good probes in a row and a minimum quarantine
  that doubles with each failure in a row (capped; reset after a healthy stretch);
- gone while busy or aborting: ``draining`` (no new work; it leaves at release). Reported ready
  again at the same address before then (a readiness flap), it is the same worker, still in
  its request: it is never entered twice;
- idle -> elsewhere -> idle: a worker that refused a Begin with WORKER_BUSY serves another
  coordinator (several coordinators share the workers, docs/design.md section 10). It is not
  quarantined: it is held aside and its ``Info`` read every ``ELSEWHERE_POLL`` seconds until it
  names no request; a probe that gets no answer quarantines it.

Requests wait in one FIFO admission queue per model; the queue capacity is one bound over all
models. The head of a model's queue takes the workers it needs — two idle, compatible workers
serving its model (one per guidance branch), or in AUTO mode a lone idle worker rather than
waiting — while a head of another model's queue does not wait behind it. Two workers are
compatible when they agree on protocol version, dtype, device kind and weights digest. A worker
is never in two requests at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.admission_queue import AdmissionQueue, Readmit
from coordinator.allocation import PoolView
from coordinator.remote import RemoteWorker
from coordinator.worker_info import WorkerInfo, incompatibility, pairing_key, read_info
from hybridiff.errors import DeadlineExceeded, InvalidArgument, ModelNotFound, Unavailable
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerControlService"].full_name

JOINING, IDLE, BUSY, ABORTING, DRAINING = "joining", "idle", "busy", "aborting", "draining"
# A quarantined worker shows as "unhealthy" (ClusterStatus, hybridiff_workers{state}).
UNHEALTHY, INCOMPATIBLE = "unhealthy", "incompatible"
# Busy with another coordinator's request: healthy, not ours to give (docs/design.md section 10).
ELSEWHERE = "elsewhere"
STATES = (JOINING, IDLE, BUSY, ABORTING, DRAINING, UNHEALTHY, INCOMPATIBLE, ELSEWHERE)
SERVING_STATES = (IDLE, BUSY, ELSEWHERE)  # a coordinator with any worker so is ready
ELSEWHERE_POLL = 0.2  # seconds between reads of a worker busy with another coordinator
OCCUPIED = (BUSY, ABORTING)  # still running something of a request


@dataclass(frozen=True)
class HealthPolicy:
    """When a worker that failed, or that was aborted, may serve again."""

    probe_timeout: float = 2.0  # each health Check and Info of a probe
    readmit_probes: int = 3  # good probes in a row before a quarantined worker is idle again
    quarantine_base: float = 2.0  # the minimum quarantine after a first failure ...
    quarantine_max: float = 120.0  # ... doubled with each failure in a row, up to this
    healthy_stretch: float = 300.0  # re-admitted this long ago: the next failure counts as a first
    abort_confirm: float = 10.0  # an aborted worker not confirming within this is quarantined
    incompatible_recheck: float = 30.0  # how often an incompatible worker's Info is read again
    idle_check: float = 0.5  # seconds between health Checks of every idle worker (0: none)
    idle_check_timeout: float = 1.5  # an idle worker not SERVING within this is quarantined

    def quarantine_seconds(self, failures: int) -> float:
        return min(self.quarantine_max, self.quarantine_base * 2 ** max(0, failures - 1))


@dataclass(eq=False)
class WorkerEntry:
    worker_id: str
    address: str
    channel: grpc.Channel
    held: str = JOINING  # the state as the pool holds it; ``state`` is what it shows
    info: WorkerInfo | None = None
    request_id: str = ""
    gone: bool = False
    failures: int = 0  # quarantines in a row
    failed_request: str = ""  # the request it was quarantined for: still running it is not healthy
    quarantined_until: float = 0.0
    readmitted_at: float | None = None
    epoch: int = 0  # bumped whenever a new probe starts: an older probe then stops
    stub: worker_pb2_grpc.WorkerControlServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = worker_pb2_grpc.WorkerControlServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def state(self) -> str:
        return DRAINING if self.gone and self.held in OCCUPIED else self.held

    @property
    def model(self) -> str:
        return self.info.model_name if self.info else ""

    def ask_info(self, timeout: float) -> WorkerInfo:
        return read_info(self.stub.Info(worker_pb2.InfoRequest(), timeout=timeout))


def _answered_busy(err: grpc.RpcError) -> bool:
    """A health Check refused for want of a slot: the worker's server is up and answering. Without
    a client CA the coordinator is not told apart from anyone else, so its Check runs in the open
    slots, which other callers may hold (``serving.new_server``); that says nothing of the worker.
    A stopped or hung worker does not answer at all (the call's deadline passes)."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _not_serving(call: grpc.Future) -> str:
    """Why a health Check call did not find its worker SERVING ("" when it did)."""
    try:
        status = call.result().status
    except grpc.RpcError as err:
        return "" if _answered_busy(err) else err.code().name
    if status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return ""


def _draw(entry: WorkerEntry, request_id: str) -> None:
    """``entry`` taken by ``request_id`` (under the pool's lock). Its epoch moves on: an idle
    Check of it still in flight says nothing of the worker it now is."""
    entry.held, entry.request_id = BUSY, request_id
    entry.epoch += 1


def _groups(entries: list[WorkerEntry]) -> list[list[WorkerEntry]]:
    """``entries`` split into compatible groups, each by worker id, ordered by its first id."""
    groups: dict[tuple, list[WorkerEntry]] = {}
    for e in sorted(entries, key=lambda e: e.worker_id):
        groups.setdefault(pairing_key(e.info), []).append(e)
    return list(groups.values())


def _pick(idle: list[WorkerEntry], want: int, accept_one: bool) -> list[WorkerEntry]:
    """``want`` compatible workers of ``idle``, or one when ``accept_one``; none otherwise."""
    for group in _groups(idle):
        if len(group) >= want:
            return group[:want]
    return sorted(idle, key=lambda e: e.worker_id)[:1] if accept_one else []


class WorkerPool:
    def __init__(
        self,
        channel_factory: Callable[[str], grpc.Channel],
        queue_capacity: int = 16,
        probe_interval: float = 1.0,
        on_change: Callable[[WorkerPool], None] | None = None,
        health: HealthPolicy | None = None,
    ) -> None:
        """``queue_capacity``: the most requests waiting, all models together."""
        self._channel_factory = channel_factory
        self.queue_capacity = queue_capacity
        self.probe_interval = probe_interval
        self.health = health or HealthPolicy()
        self._on_change = on_change
        self._cond = threading.Condition()
        self._stop = threading.Event()  # set at close: every probe ends at its next wait
        self._workers: dict[str, WorkerEntry] = {}
        self._queue = AdmissionQueue(queue_capacity)
        self._closed = False
        self._probes: set[threading.Thread] = set()
        # Every entry whose channel may be open, also one replaced while busy (its lease holds it).
        self._entries: weakref.WeakSet[WorkerEntry] = weakref.WeakSet()
        self.quarantines = 0  # workers quarantined so far (hybridiff_worker_quarantines_total)
        self.busy_elsewhere = 0  # Begins refused as WORKER_BUSY: the worker served another coordinator
        # Sent with every Session (``remote.COORDINATOR_METADATA``): a worker busy with another
        # coordinator's session refuses this one at once rather than waiting for it.
        self.identity = os.urandom(8).hex()
        if self.health.idle_check > 0:
            watch = threading.Thread(
                target=self._run_probe, args=(self._watch_idle,), name="probe-idle", daemon=True
            )
            self._probes.add(watch)
            watch.start()

    # --- discovery sink -------------------------------------------------------------
    def worker_ready(self, worker_id: str, address: str) -> None:
        with self._cond:
            entry = self._workers.get(worker_id)
            if entry is not None and entry.address == address:
                if not entry.gone:
                    return
                if entry.held in OCCUPIED:
                    # A readiness flap: the same worker, still in its request, is back; a second
                    # entry would hand it to another request while this one runs.
                    entry.gone = False
                    log.info("worker %s is ready again while %s", worker_id, entry.held)
                    self._cond.notify_all()
                    self._changed()
                    return
            if entry is not None and not entry.gone:
                # Replaced: a busy one finishes its request, then leaves; any other goes now (and
                # its probe, if it is still being probed, ends instead of dialling the old address).
                entry.gone = True
                if entry.held not in OCCUPIED:
                    entry.channel.close()
            entry = WorkerEntry(worker_id, address, self._channel_factory(address))
            self._workers[worker_id] = entry
            self._entries.add(entry)
            self._spawn(entry, self._join)
        self._changed()

    def worker_gone(self, worker_id: str) -> None:
        with self._cond:
            entry = self._workers.get(worker_id)
            if entry is None:
                return
            entry.gone = True  # an occupied one shows as draining and leaves at release
            if entry.held not in OCCUPIED:
                self._remove(entry)
            self._cond.notify_all()
        self._changed()

    def _remove(self, entry: WorkerEntry) -> None:
        entry.epoch += 1
        if self._workers.get(entry.worker_id) is entry:
            del self._workers[entry.worker_id]
        entry.channel.close()

    def _changed(self) -> None:
        if self._on_change:
            self._on_change(self)

    # --- probes -----------------------------------------------------------------------
    def _spawn(self, entry: WorkerEntry, probe: Callable[..., None], *args) -> None:
        """Start ``probe`` on ``entry``, ending any probe of it still running (call under the lock)."""
        entry.epoch += 1
        thread = threading.Thread(
            target=self._run_probe,
            args=(probe, entry, entry.epoch, *args),
            name=f"probe-{entry.worker_id}",
            daemon=True,
        )
        self._probes.add(thread)
        thread.start()

    def _run_probe(self, probe: Callable[..., None], *args) -> None:
        try:
            probe(*args)
        finally:
            with self._cond:
                self._probes.discard(threading.current_thread())

    def _current(self, entry: WorkerEntry, epoch: int) -> bool:
        return not self._closed and entry.epoch == epoch

    def _join(self, entry: WorkerEntry, epoch: int) -> None:
        """Read the worker's info until it answers (it may still be loading its model); refuse it
        while it is incompatible."""
        while self._current(entry, epoch) and not entry.gone:
            try:
                info = entry.ask_info(max(5.0, self.health.probe_timeout))
            except grpc.RpcError as err:
                log.debug("worker %s not ready: %s", entry.worker_id, err.code())
                self._stop.wait(self.probe_interval)
                continue
            except ValueError:  # its channel was closed meanwhile: it is gone or replaced
                return
            problem = incompatibility(info)
            with self._cond:
                if not self._current(entry, epoch) or entry.gone:
                    return
                was, entry.info = entry.held, info
                entry.held = INCOMPATIBLE if problem else IDLE
                kinds = {pairing_key(e.info) for e in self._serving(info.model_name) if e is not entry}
                if not problem and kinds and pairing_key(info) not in kinds:
                    # Said before anyone can see it idle (a reader of the state finds the reason logged).
                    log.warning(
                        "worker %s differs from the other workers of %s in protocol, dtype, device kind "
                        "or weights (%s): it is paired only with workers that agree",
                        entry.worker_id,
                        info.model_name,
                        pairing_key(info),
                    )
                self._cond.notify_all()
            if problem:
                if was != INCOMPATIBLE:
                    log.error("worker %s refused: %s; it gets no requests", entry.worker_id, problem)
                    self._changed()
                self._stop.wait(self.health.incompatible_recheck)
                continue
            log.info(
                "worker %s joined: model %s (%s) on %s, %s, weights %s",
                entry.worker_id,
                info.model_name,
                info.arch,
                info.device,
                info.dtype,
                info.weights_digest[:12] or "-",
            )
            self._changed()
            return

    def _check(self, entry: WorkerEntry) -> tuple[WorkerInfo | None, str]:
        """One probe: health SERVING, no session running, still compatible. (info, "") when
        good, (None, why) when not."""
        timeout = self.health.probe_timeout
        # The same rule as the idle watch: a Check refused for want of an open slot is an answer
        # (Info, below, runs in slots of its own).
        why = _not_serving(
            entry.health.Check.future(health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout)
        )
        if why:
            return None, f"health {why}"
        try:
            info = entry.ask_info(timeout)
        except grpc.RpcError as err:
            return None, f"{err.code().name}"
        if info.active_request_id and info.active_request_id == entry.failed_request:
            return None, f"still running request {info.active_request_id}"
        # Another request is another coordinator's (this one gives a quarantined worker none):
        # the worker is healthy, re-admitted as busy elsewhere.
        problem = incompatibility(info)
        return (None, problem) if problem else (info, "")

    def _watch_idle(self) -> None:
        """The pool's one idle watch: every ``idle_check`` seconds a health Check of each idle
        worker, all in flight at once; those not SERVING within ``idle_check_timeout`` are
        quarantined, unless drawn, gone or replaced meanwhile (their epoch moved on)."""
        request = health_pb2.HealthCheckRequest(service=WORKER_SERVICE)
        while not self._stop.wait(self.health.idle_check):
            with self._cond:
                idle = [(e, e.epoch) for e in self._workers.values() if e.held == IDLE and not e.gone]
            calls = []
            for entry, epoch in idle:
                try:
                    call = entry.health.Check.future(request, timeout=self.health.idle_check_timeout)
                except ValueError:  # its channel was closed meanwhile: it is gone or replaced
                    continue
                calls.append((entry, epoch, call))
            failed = [(entry, epoch, why) for entry, epoch, call in calls if (why := _not_serving(call))]
            if not failed:
                continue
            with self._cond:
                quarantined = False
                for entry, epoch, why in failed:
                    if self._current(entry, epoch) and entry.held == IDLE and not entry.gone:
                        self._quarantine(entry, f"idle, its health Check: {why}", request_id="")
                        quarantined = True
                self._cond.notify_all()
            if quarantined:
                self._changed()

    def _quarantine(self, entry: WorkerEntry, reason: str, request_id: str | None = None) -> None:
        """Take ``entry`` out of service until it proves itself (call under the lock);
        ``request_id``: the request that failed on it (default: the one it holds)."""
        now = time.monotonic()
        if entry.readmitted_at is not None and now - entry.readmitted_at >= self.health.healthy_stretch:
            entry.failures = 0
        entry.failures += 1
        seconds = self.health.quarantine_seconds(entry.failures)
        entry.failed_request = entry.request_id if request_id is None else request_id
        entry.held, entry.request_id = UNHEALTHY, ""
        entry.quarantined_until = now + seconds
        self.quarantines += 1
        log.warning(
            "worker %s quarantined for at least %.1fs (failure %d in a row): %s",
            entry.worker_id,
            seconds,
            entry.failures,
            reason,
        )
        self._spawn(entry, self._probe_quarantined)

    def _probe_quarantined(self, entry: WorkerEntry, epoch: int) -> None:
        good, last_why = 0, ""
        while not self._stop.wait(self.probe_interval) and self._current(entry, epoch) and not entry.gone:
            try:
                info, why = self._check(entry)
            except ValueError:  # its channel was closed: it is gone or replaced
                return
            if why and why != last_why:
                log.info("worker %s stays quarantined: %s", entry.worker_id, why)
            last_why = why
            good = good + 1 if info is not None else 0
            if good < self.health.readmit_probes or time.monotonic() < entry.quarantined_until:
                continue
            with self._cond:
                if not self._current(entry, epoch) or entry.gone:
                    return
                entry.info, entry.readmitted_at, entry.failed_request = info, time.monotonic(), ""
                if info.active_request_id:
                    self._hold_elsewhere(entry, info.active_request_id)
                else:
                    entry.held = IDLE
                self._cond.notify_all()
            log.info("worker %s re-admitted after %d good probes", entry.worker_id, good)
            self._changed()
            return

    def _hold_elsewhere(self, entry: WorkerEntry, reason: str) -> None:
        """``entry`` serves another coordinator: out of allocation, not quarantined, read again in
        ``ELSEWHERE_POLL`` seconds (call under the lock)."""
        entry.held, entry.request_id = ELSEWHERE, ""
        log.info("worker %s is busy with another coordinator (%s); asked again soon", entry.worker_id, reason)
        self._spawn(entry, self._probe_elsewhere)

    def _probe_elsewhere(self, entry: WorkerEntry, epoch: int) -> None:
        """Idle again once the worker's ``Info`` names no request; quarantined if it stops answering."""
        while not self._stop.wait(ELSEWHERE_POLL) and self._current(entry, epoch) and not entry.gone:
            try:
                info = entry.ask_info(self.health.probe_timeout)
                why = ""
            except grpc.RpcError as err:
                info, why = None, f"Info failed ({err.code().name}) while it served another coordinator"
            except ValueError:  # its channel was closed: it is gone or replaced
                return
            if info is not None and info.active_request_id:
                continue
            with self._cond:
                if not self._current(entry, epoch) or entry.gone:
                    return
                if info is None:
                    self._quarantine(entry, why)
                else:
                    entry.held = IDLE
                self._cond.notify_all()
            self._changed()
            return

    def _confirm_abort(self, entry: WorkerEntry, epoch: int, request_id: str) -> None:
        """Free ``entry`` once it no longer runs ``request_id``; quarantine it when it does not
        say so within ``abort_confirm`` seconds."""
        deadline = time.monotonic() + self.health.abort_confirm
        while self._current(entry, epoch):
            try:
                info = entry.ask_info(self.health.probe_timeout)
                confirmed = info.active_request_id != request_id
            except grpc.RpcError:
                confirmed = False
            except ValueError:  # its channel was closed: it is gone
                return
            with self._cond:
                if not self._current(entry, epoch):
                    return
                if confirmed or time.monotonic() >= deadline:
                    if entry.gone:
                        self._remove(entry)
                    elif confirmed:
                        entry.held, entry.request_id = IDLE, ""
                    else:
                        self._quarantine(
                            entry,
                            f"it did not confirm the abort of request {request_id} "
                            f"within {self.health.abort_confirm:g}s",
                        )
                    self._cond.notify_all()
                    self._changed()
                    return
            self._stop.wait(min(self.probe_interval, 0.1))

    # --- allocation -----------------------------------------------------------------
    def _serving(self, model: str) -> list[WorkerEntry]:
        return [
            e
            for e in self._workers.values()
            if e.model == model and not e.gone and e.held not in (JOINING, INCOMPATIBLE)
        ]

    def model_info(self, model: str) -> WorkerInfo:
        """Info of a worker serving ``model`` ("" = the only served model)."""
        with self._cond:
            infos = {
                e.model: e.info
                for e in self._workers.values()
                if e.info is not None and not e.gone and e.held != INCOMPATIBLE
            }
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
        admission: Readmit | None = None,
        resuming: bool = False,
        like: WorkerInfo | None = None,
    ) -> list[WorkerEntry]:
        """Wait in the model's admission queue for ``want`` idle, compatible workers of ``model``
        (or one when ``accept_one``); ``QueueFull`` at once when the queue is full. With
        ``admission``, the width is decided again from the pool as it is when the request
        reaches the head. ``resuming``: a request that lost a worker waits ahead of new ones,
        also during a drain (it was running: it may finish within the grace period), on workers
        paired like ``like`` (the checkpoint's weights, dtype and device)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed and not resuming:
                raise Unavailable("the coordinator is draining")
            if resuming:
                ticket = self._queue.enqueue_resuming(model, want, accept_one)
            else:
                ticket = self._queue.enqueue(model, want, accept_one)
            self._changed()  # the condition's lock is reentrant
            try:
                while True:
                    if self._closed and not resuming:
                        raise Unavailable("the coordinator is draining")
                    serving = self._serving(model)
                    if like is not None:
                        serving = [e for e in serving if pairing_key(e.info) == pairing_key(like)]
                    if not serving:
                        raise Unavailable(f"no worker serves model {model!r} any more")
                    if self._queue.is_head(ticket):
                        idle = [e for e in serving if e.held == IDLE]
                        self._queue.readmit(ticket, len(idle), admission)
                        chosen = _pick(idle, ticket.want, ticket.accept_one)
                        if chosen:
                            for e in chosen:
                                _draw(e, request_id)
                            return chosen
                        largest = max(len(g) for g in _groups(serving))
                        if ticket.want > largest and not ticket.accept_one:
                            raise Unavailable(
                                f"{ticket.want} workers needed, {largest} compatible ones serve "
                                f"model {model!r}"
                            )
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
                self._queue.remove(ticket)
                self._cond.notify_all()
                self._changed()  # the condition's lock is reentrant

    def take_idle(
        self, model: str, count: int, request_id: str, partner: WorkerEntry | None = None
    ) -> list[WorkerEntry]:
        """Up to ``count`` idle, compatible workers of ``model`` at once, ahead of the queue: a
        request that lost a worker mid-way resumes before new requests start. With ``partner``,
        only workers compatible with it."""
        with self._cond:
            idle = [e for e in self._serving(model) if e.held == IDLE]
            if partner is not None and partner.info is not None:
                idle = [e for e in idle if pairing_key(e.info) == pairing_key(partner.info)]
            taken = _pick(idle, count, accept_one=True) if count > 0 else []
            for e in taken:
                _draw(e, request_id)
        if taken:
            self._changed()
        return taken

    def release(
        self, entries: list[WorkerEntry], failed: bool = False, aborted: bool = False, elsewhere: bool = False
    ) -> None:
        """Give ``entries`` back: ``failed`` quarantines them; ``aborted`` (their session was
        cancelled mid-request) frees each once it confirms it stopped, else quarantines it;
        ``elsewhere`` (they refused the Begin as busy with another coordinator) holds them aside
        until they are free; otherwise (the request finished) they are idle at once."""
        with self._cond:
            for e in entries:
                request_id, e.request_id = e.request_id, ""
                if elsewhere:
                    self.busy_elsewhere += 1
                    if e.gone:
                        self._remove(e)
                    else:
                        self._hold_elsewhere(e, f"it refused request {request_id}")
                elif failed:
                    if e.gone:
                        self._remove(e)
                    else:
                        self._quarantine(e, f"request {request_id} failed on it", request_id)
                elif aborted:
                    e.held, e.request_id = ABORTING, request_id
                    self._spawn(e, self._confirm_abort, request_id)
                elif e.gone:
                    self._remove(e)
                else:
                    e.held = IDLE
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
        admission: Readmit | None = None,
    ) -> Lease:
        """``acquire`` as a ``Lease`` that owns the request's workers until released."""
        entries = self.acquire(model, want, accept_one, request_id, timeout, check_alive, admission)
        return Lease(self, model, request_id, entries)

    def could_take(self, model: str, count: int, like: WorkerInfo | None) -> bool:
        """Whether ``count`` workers of ``model`` paired like ``like`` are up (idle, busy or held
        elsewhere: not quarantined, not gone), so that a request waiting for them may get them."""
        with self._cond:
            up = [e for e in self._serving(model) if e.held != UNHEALTHY]
            if like is not None:
                up = [e for e in up if pairing_key(e.info) == pairing_key(like)]
            return len(up) >= count

    def _view(self, model: str) -> PoolView:
        """The pool as a request of ``model`` sees it."""
        return self._queue.view(model, sum(e.held == IDLE for e in self._serving(model)))

    def view(self, model: str) -> PoolView:
        with self._cond:
            return self._view(model)

    def demand(self) -> int:
        """Workers busy plus workers wanted by the queued requests (the autoscaler's signal: it
        does not read zero on a saturated pool, as the queue depth alone can)."""
        with self._cond:
            busy = sum(e.held in OCCUPIED for e in self._workers.values())
            return busy + self._queue.wanted()

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
        """Requests waiting, all models together."""
        return self._queue.depth

    def close(self) -> None:
        """Drain: waiting requests get ``Unavailable`` and none starts any more (running requests
        still release and recover); the probes end."""
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
            probes = list(self._probes)
        # A probe ends at its next wait, or when its call in flight times out: none is left
        # calling a worker while the interpreter exits.
        for thread in probes:
            thread.join(timeout=max(5.0, self.health.probe_timeout) + 1)

    def shutdown(self, timeout: float) -> bool:
        """The end of the pool (at exit): closed as by ``close``, every worker channel closed (a
        probe's call in flight ends at once instead of at its deadline) and the probes joined,
        all within ``timeout`` seconds. Whether every probe ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
            probes = list(self._probes)
            entries = list(self._entries)
        for entry in entries:
            entry.channel.close()
        for thread in probes:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in probes)


class Lease:
    """The workers one request holds: it swaps a failed one for an idle one (``replace_failed``)
    and gives them all back at the end (``release``), each exactly once."""

    def __init__(self, pool: WorkerPool, model: str, request_id: str, entries: list[WorkerEntry]) -> None:
        self.pool, self.model, self.request_id = pool, model, request_id
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def view(self) -> PoolView:
        """The pool as the lease's model sees it now (idle workers, waiting requests)."""
        return self.pool.view(self.model)

    def handles(self) -> list[RemoteWorker]:
        """The driver's handles on the leased workers, in lease order (U first)."""
        return [
            RemoteWorker(
                e.worker_id, e.channel, e.info.data_address, e.info.worker_id, coordinator=self.pool.identity
            )
            for e in self.entries
        ]

    def replace_failed(
        self,
        worker_id: str,
        keep: set[str],
        want: int,
        need: int = 1,
        timeout: float = 0.0,
        check_alive: Callable[[], None] | None = None,
        busy: bool = False,
    ) -> list[WorkerEntry]:
        """Quarantine ``worker_id`` (``busy``: it refused the Begin as busy with another
        coordinator's request, so it is held aside until free instead); keep the workers named
        in ``keep`` (the driver aborted every session: the others are released as aborted); top
        up to ``want`` with idle workers compatible with the kept ones, ahead of the queue. With
        fewer than ``need`` then, the request goes back to the head of its model's queue holding
        nothing (no request holds a worker while it waits for another) and resumes on the next
        ``need`` free workers, waiting up to ``timeout`` (``check_alive`` raising ends the wait:
        the client's deadline or cancel). A survivor that no pair can form with again (the
        others quarantined or gone) goes on alone instead. ``Unavailable`` when no worker is
        left to wait for, or none came in time."""
        failed = [e for e in self.entries if e.worker_id == worker_id]
        self.pool.release(failed, failed=not busy, elsewhere=busy)
        others = [e for e in self.entries if e.worker_id != worker_id]
        kept = [e for e in others if e.worker_id in keep]
        self.pool.release([e for e in others if e.worker_id not in keep], aborted=True)
        partner = kept[0] if kept else None
        self.entries = kept + self.pool.take_idle(self.model, want - len(kept), self.request_id, partner)
        if len(self.entries) >= need:
            return self.entries
        like = (partner or failed[0]).info if (partner or failed) else None
        if need > 1 and kept and not self.pool.could_take(self.model, need, like):
            # No pair can form again (the others are quarantined or gone): waiting would hold the
            # model's queue until the deadline; the survivor goes on alone as before.
            return self.entries
        waiting, self.entries = self.entries, []
        self.pool.release(waiting, aborted=True)
        what = "was busy elsewhere" if busy else "failed"
        if timeout <= 0:
            raise Unavailable(f"worker {worker_id} {what} and no other worker is free")
        started = time.monotonic()
        try:
            self.entries = self.pool.acquire(
                self.model,
                want,
                need < want,
                self.request_id,
                timeout,
                check_alive,
                resuming=True,
                like=like,
            )
        except DeadlineExceeded:
            if time.monotonic() - started < timeout:  # the client's own deadline: it stays one
                raise
            raise Unavailable(
                f"worker {worker_id} {what} and no other worker freed in {timeout:g}s"
            ) from None
        return self.entries

    def release_blaming(self, worker_id: str) -> None:
        """Give every worker back after a failure blamed on ``worker_id``: it is quarantined, the
        others (healthy, their sessions aborted) are released as aborted."""
        entries, self.entries = self.entries, []
        self.pool.release([e for e in entries if e.worker_id == worker_id], failed=True)
        self.pool.release([e for e in entries if e.worker_id != worker_id], aborted=True)

    def release(self, failed: bool = False, aborted: bool = False) -> None:
        """Give every worker back: ``failed`` quarantines them; ``aborted`` (the request ended
        early: cancelled, past its deadline, or failed elsewhere) waits for each to confirm it
        stopped; a request that finished frees them at once."""
        entries, self.entries = self.entries, []
        self.pool.release(entries, failed=failed, aborted=aborted)

    def give_back(self, worker_id: str) -> None:
        """Return one healthy worker to the pool (an elastic shrink): the head waiter may take it
        once the worker confirms its session of this request ended (the driver aborts it)."""
        given = [e for e in self.entries if e.worker_id == worker_id]
        self.entries = [e for e in self.entries if e.worker_id != worker_id]
        self.pool.release(given, aborted=True)

    def take_one(self) -> WorkerEntry | None:
        """An idle worker of the lease's model compatible with its own, if one is free and no
        request waits (an elastic grow)."""
        with self.pool._cond:
            if self.pool._view(self.model).waiting:
                return None
            partner = self.entries[0] if self.entries else None
            taken = self.pool.take_idle(self.model, 1, self.request_id, partner)
        self.entries.extend(taken)
        return taken[0] if taken else None

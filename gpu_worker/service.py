"""The worker's control API (``hybridiff.internal.v1.WorkerControlService``), answered for the
coordinator.

One request at a time: a second Session is refused with WORKER_BUSY (one coordinator's allocator
never does that; several coordinators sharing the workers do, and the refused one asks another
worker, docs/design.md section 10). One Session of the same coordinator (named by the
``COORDINATOR_METADATA`` call metadata) may wait, briefly (``BUSY_WAIT_SECONDS``), for the one
before it to unwind after its Finish; any other, and any of another coordinator, is refused at
once, so sessions never pile up on the server's few threads. Each Session runs its commands in
order on the handler thread (a helper thread reads them); the coordinator sends steps ahead, so
the next command is already queued. Every failure leaves as a typed status
(``hybridiff.errors.to_status``): the coordinator reads its reason, never its text.

Nothing the client does holds the worker for long: a session whose Begin does not come within
``begin_seconds`` of its opening, or whose next command does not come within
``session_idle_seconds`` (or whose answer the client does not take within it), is ended with
SESSION_IDLE (ABORTED), and its request aborted; gRPC keepalive drops a peer that stops
answering pings. A command that runs past ``watchdog_seconds`` (more in a session whose
coordinator asks for longer peer waits) is a stall: the worker turns NOT_SERVING, liveness
included, refuses new sessions, and stays so until it is restarted (a command that ends after
all does not make the process trustworthy again: a wedged device or a deadlocked thread may
be behind it).

A resumed request's checkpoint comes in parts after its Begin (``hybridiff.checkpoint_parts``):
the session assembles them, each within ``session_idle_seconds``, up to the largest checkpoint
the model's limits allow, and runs the Begin with the whole checkpoint.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import grpc

from gpu_worker.config import BEGIN_SECONDS, SESSION_IDLE_SECONDS, WATCHDOG_SECONDS
from gpu_worker.engine import MAX_PEER_TIMEOUT, WorkerEngine
from gpu_worker.split_balance import SplitPlanner
from gpu_worker.zmq_plane import SEND_TIMEOUT_MS
from hybridiff import logs, serving, telemetry
from hybridiff.calibration_wire import calibration_to_proto
from hybridiff.checkpoint_parts import CheckpointAssembly, checkpoint_bound
from hybridiff.errors import (
    BadCommand,
    Cancelled,
    HybridiffError,
    InvalidArgument,
    SessionIdle,
    Unavailable,
    WorkerBusy,
    WorkerFailed,
)
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import COORDINATOR_METADATA, WORKER_PROTOCOL_VERSION, Phase
from hybridiff.request import side_problem
from hybridiff.v1 import diffusion_pb2

log = logging.getLogger(__name__)
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerControlService"].full_name
# A health-service name, not an RPC service: SERVING from start-up until the watchdog fires.
# Kubernetes' liveness probe asks for it (readiness asks for ""), so a stalled worker restarts.
LIVENESS_SERVICE = "hybridiff.liveness"
# The legitimate wait: the previous session frees the worker once its Finish event is sent, which
# the coordinator may see (and hand the worker on) first. Measured from the Finish event's arrival
# to the worker's release (tiny model, 30 sessions, 2 shared cores): median 0.2 ms, max 0.7 ms.
# The bound leaves a thousandfold room, and holds one thread at most.
BUSY_WAIT_SECONDS = 1.0
# Info's active_request_id while a session holds the worker before its Begin named the request:
# never "" then, or the coordinator's pool would read the worker as free.
OPENING = "(opening)"
PEER_WAITS_PER_COMMAND = 4
SEND_WAIT_SECONDS = SEND_TIMEOUT_MS / 1000  # one send the peer does not take
READ_AHEAD = 4  # commands read ahead of the one running (the coordinator sends steps ahead)


@dataclass
class Watch:
    """One bounded activity: ``what`` it is, its ``bound`` in seconds, the thread running it."""

    what: str
    bound: float
    on_expire: Callable[[Watch], None]
    thread: int
    started: float = field(default_factory=time.monotonic)
    expired: bool = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stack(self) -> str:
        """Where its thread is now (for the log of a stall)."""
        frame = sys._current_frames().get(self.thread)
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


class Watchdog:
    """One thread that calls ``on_expire(watch)`` once for each ``watch`` that lasts longer than
    its bound (checked every ``poll`` seconds)."""

    def __init__(self, poll: float = 0.25) -> None:
        self._poll = poll
        self._watches: dict[int, Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @contextmanager
    def watch(self, what: str, bound: float, on_expire: Callable[[Watch], None]) -> Iterator[Watch]:
        entry = Watch(what, bound, on_expire, threading.get_ident())
        with self._lock:
            self._watches[id(entry)] = entry
        try:
            yield entry
        finally:
            with self._lock:
                self._watches.pop(id(entry), None)

    def check(self) -> None:
        with self._lock:
            due = [w for w in self._watches.values() if not w.expired and w.elapsed > w.bound]
            for w in due:
                w.expired = True
        for w in due:
            try:
                w.on_expire(w)
            except Exception:  # one failed action must not stop the dog
                log.exception("watchdog action for %s failed", w.what)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.check()


class _Commands:
    """A session's commands, read on a helper thread so the handler can wait for the next one
    with a timeout. The reader ends with the stream (gRPC ends the iterator when the RPC ends)
    or when ``close`` is called, whichever comes first: no thread stays blocked."""

    _END = object()

    def __init__(self, request_iterator: Iterator[worker_pb2.SessionRequest], name: str) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self._closed = threading.Event()
        self.thread = threading.Thread(
            target=self._read, args=(request_iterator,), name=f"session-reader-{name}", daemon=True
        )
        self.thread.start()

    def _read(self, request_iterator) -> None:
        try:
            for cmd in request_iterator:
                if not self._put(cmd):
                    return
            self._put(self._END)
        except Exception as exc:  # grpc.RpcError: the client cancelled or its connection dropped
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def next(self, timeout: float) -> worker_pb2.SessionRequest | None:
        """The next command; None when the client closed the stream. ``SessionIdle`` when none
        came within ``timeout`` seconds, ``Cancelled`` when the stream broke."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise SessionIdle(f"no command came within {timeout:g} s; the session is ended") from None
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise Cancelled("the session was cancelled or its connection dropped")
        return item

    def poll(self, timeout: float) -> worker_pb2.SessionRequest | None:
        """``next``, but None when none came in time (the engine says what it waited for); a
        stream the client closed is cancelled here, since a step still waits on it."""
        try:
            cmd = self.next(timeout)
        except SessionIdle:
            return None
        if cmd is None:
            raise Cancelled("the session's stream ended while a speculative step waited for its resolution")
        return cmd

    def close(self) -> None:
        self._closed.set()


@dataclass
class ControlSession:
    """One control Session call as the service follows it: the request it runs, how long one of
    its commands may run, and how it ended (the sessions metric's outcome)."""

    watchdog_bound: float  # seconds a command may run before it counts as a stall
    request_id: str | None = None  # set by its Begin; None again once finished
    outcome: str = "cancelled"  # the stream ended (or the coordinator cancelled it) before finish


class WorkerService(worker_pb2_grpc.WorkerControlServiceServicer):
    """Registered before the model loads (so health answers at once); ``attach`` makes it ready."""

    def __init__(
        self,
        worker_id: str,
        model_name: str,
        metrics=None,
        session_idle_seconds: float = SESSION_IDLE_SECONDS,
        watchdog_seconds: float = WATCHDOG_SECONDS,
        on_stall: Callable[[], None] | None = None,
        begin_seconds: float = BEGIN_SECONDS,
    ) -> None:
        """``metrics``: an optional ``gpu_worker.metrics.WorkerMetrics`` (sessions by outcome);
        ``on_stall``: called once when the watchdog fires (the process turns its health off);
        ``begin_seconds``: a session's Begin must come within it (at most ``session_idle_seconds``)."""
        for name, seconds in (
            ("session_idle_seconds", session_idle_seconds),
            ("watchdog_seconds", watchdog_seconds),
            ("begin_seconds", begin_seconds),
        ):
            if not seconds > 0:
                raise InvalidArgument(name, f"must be a positive number of seconds, got {seconds}")
        self.worker_id = worker_id
        self.metrics = metrics
        self.model_name = model_name
        self.data_address = ""
        self.weights_digest = ""
        self.engine: WorkerEngine | None = None
        self.checkpoint_bound = 0  # the largest checkpoint this worker assembles, once attached
        self.planner: SplitPlanner | None = None
        self.session_idle_seconds = session_idle_seconds
        self.begin_seconds = min(begin_seconds, session_idle_seconds)
        self.watchdog_seconds = watchdog_seconds
        self.stalled = threading.Event()
        self._on_stall = on_stall
        self._busy = threading.Lock()
        self._waiter = threading.Lock()  # held by the one session that may wait for the busy lock
        self._active_request_id = ""  # cleared before the busy lock is released, set after it is taken
        self._owner = ""  # the coordinator whose session holds the busy lock ("" when unnamed)
        self._watchdog = Watchdog(poll=min(0.25, watchdog_seconds / 4, session_idle_seconds / 4)).start()
        self._tracer = telemetry.tracer("hybridiff.worker")

    def attach(self, engine: WorkerEngine, data_address: str, weights_digest: str = "") -> None:
        self.adapter = engine.adapter
        self.planner = SplitPlanner(engine.adapter)
        limits, scale = engine.adapter.size_limits(), engine.adapter.vae_scale_factor
        latent_side = limits.max_side // scale
        channels = engine.adapter.denoiser.config.in_channels
        self.checkpoint_bound = checkpoint_bound(limits.max_images * channels * latent_side * latent_side)
        self.data_address = data_address
        self.weights_digest = weights_digest
        self.engine = engine

    def close(self) -> None:
        self._watchdog.stop()

    @property
    def active_request_id(self) -> str:
        return self._active_request_id

    def _ready(self, context: grpc.ServicerContext) -> None:
        if self.engine is None:
            serving.abort(context, Unavailable(f"worker {self.worker_id} is still loading its model"))

    def Info(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        d = self.adapter.defaults
        info = worker_pb2.InfoResponse(
            worker_id=self.worker_id,
            model_name=self.model_name,
            arch=self.adapter.arch,
            data_address=self.data_address,
            limits=worker_pb2.SizeLimits(**asdict(limits)),
            default_steps=d.steps,
            default_guidance_scale=d.guidance_scale,
            hybrid_defaults=diffusion_pb2.HybridParams(**asdict(d.hybrid)),
            device=str(self.adapter.device),
            dtype=str(self.adapter.dtype).removeprefix("torch."),
            protocol_version=WORKER_PROTOCOL_VERSION,
            weights_digest=self.weights_digest,
            active_request_id=self._active_request_id,
        )
        if self.adapter.calibration is not None:
            info.calibration.CopyFrom(calibration_to_proto(self.adapter.calibration))
        return info

    def MeasureSplit(self, request, context):
        self._ready(context)
        limits = self.adapter.size_limits()
        for name, side in (("width", request.width), ("height", request.height)):
            problem = side_problem(side, limits)
            if problem:
                serving.abort(context, InvalidArgument(name, problem))
        plan = self.planner.plan(request.height, request.width)
        response = worker_pb2.MeasureSplitResponse(
            cut=plan.cut,
            stage1_seconds=plan.stage1_seconds,
            stage2_seconds=plan.stage2_seconds,
            unit_seconds=plan.unit_seconds,
            topology=self.adapter.make_split(plan.cut).topology.value,
        )
        for batch, costs in ((1, response.batch1), (2, response.batch2)):
            c = plan.costs.get(batch)
            if c is not None:
                costs.CopyFrom(
                    worker_pb2.PhaseCosts(
                        forward_seconds=c.forward,
                        stage1_seconds=c.stage1,
                        stage2_seconds=c.stage2,
                        stage1_pre_seconds=c.pre,
                        stage1_post_seconds=c.post,
                    )
                )
        return response

    def Session(self, request_iterator, context):
        self._admit(context)
        commands = _Commands(request_iterator, self.worker_id)
        session = ControlSession(self.watchdog_seconds)
        try:
            while (cmd := commands.next(self._wait_for_next(session))) is not None:
                which = self._accept(cmd, session, context)
                if which == "begin" and cmd.begin.resume_bytes:
                    self._assemble_checkpoint(cmd, commands)
                with self._watchdog.watch(
                    f"{which} of request {session.request_id}", session.watchdog_bound, self._stall
                ):
                    event = self._run(cmd, which, commands)
                # Handing the event over waits on the client when it does not read: bounded too.
                with self._watchdog.watch(
                    f"the event of {which}", self.session_idle_seconds, self._idle(context, session)
                ):
                    yield event
                if which == "finish":
                    session.request_id, session.outcome = None, "ok"
                    return
        except SessionIdle as exc:
            session.outcome = "idle_timeout"
            log.warning("%s: session of request %s ended: %s", self.worker_id, session.request_id, exc)
            serving.abort(context, exc)
        except HybridiffError as exc:
            session.outcome = "cancelled" if exc.code == grpc.StatusCode.CANCELLED else "error"
            serving.abort(context, exc)
        except Exception as exc:  # a failed request is a typed result, not a dead worker
            session.outcome = "error"
            log.exception("request %s failed on %s", session.request_id, self.worker_id)
            serving.abort(context, WorkerFailed(f"{self.worker_id}: {type(exc).__name__}: {exc}"))
        finally:
            commands.close()
            self._release(session)

    def _wait_for_next(self, session: ControlSession) -> float:
        return self.session_idle_seconds if session.request_id is not None else self.begin_seconds

    def _admit(self, context: grpc.ServicerContext) -> None:
        """Take the worker for this session, or end the RPC: loading, stalled, or busy."""
        self._ready(context)
        if self.stalled.is_set():
            serving.abort(
                context, Unavailable(f"worker {self.worker_id} stalled in a command; it needs a restart")
            )
        caller = dict(context.invocation_metadata()).get(COORDINATOR_METADATA, "")
        if not self._take_busy(caller):
            self._count("busy")
            serving.abort(context, WorkerBusy(f"worker {self.worker_id} is busy with another request"))
        self._owner = caller
        self._active_request_id = OPENING

    def _take_busy(self, caller: str = "") -> bool:
        """The busy lock, at once, or after a short wait by one session at a time: the previous
        session may still be unwinding after its last event reached the coordinator, which then
        hands this worker on. Anyone else, and a session of another coordinator than the holder's
        (``caller``), finds it busy at once (and holds no thread waiting)."""
        if self._busy.acquire(blocking=False):
            return True
        owner = self._owner
        if caller and owner and caller != owner:
            return False
        if not self._waiter.acquire(blocking=False):
            return False
        try:
            return self._busy.acquire(timeout=BUSY_WAIT_SECONDS)
        finally:
            self._waiter.release()

    def _accept(
        self, cmd: worker_pb2.SessionRequest, session: ControlSession, context: grpc.ServicerContext
    ) -> str | None:
        """The command's kind, once it fits the session (a Begin opens the request)."""
        which = cmd.WhichOneof("command")
        if which == "begin":
            if session.request_id is not None:
                raise BadCommand("begin", "a session runs one request")
            if not cmd.request_id:
                raise BadCommand("request_id", "a session needs a request id")
            session.request_id = self._active_request_id = cmd.request_id
            session.watchdog_bound = self.watchdog_bound(cmd.begin)
            logs.set_request_id(cmd.request_id)  # this handler thread's log lines name it
            # On gRPC's thread, maybe after the next attempt of this id began here: close only this
            # attempt's session (its nonce), which ends a wait for the peer on a cancelled RPC.
            mailbox, nonce = self.engine.mailbox, cmd.begin.session_nonce
            context.add_callback(lambda rid=cmd.request_id: mailbox.close(rid, nonce))
        elif which == "checkpoint_part":
            raise BadCommand("checkpoint_part", "no checkpoint is expected (parts follow a Begin naming one)")
        elif cmd.request_id != session.request_id:
            raise BadCommand(
                "request_id", f"command for {cmd.request_id!r} in the session of {session.request_id!r}"
            )
        return which

    def _assemble_checkpoint(self, cmd: worker_pb2.SessionRequest, commands: _Commands) -> None:
        """Read the parts of ``cmd``'s checkpoint that follow it into its Begin's ``resume``.
        ``BadCommand`` for a checkpoint larger than this worker's bound (before a part is read), for
        parts out of order and for a stream that ends before the last; ``SessionIdle`` when a
        part does not come in time; ``Cancelled`` when the stream breaks."""
        begin = cmd.begin
        if begin.HasField("resume"):
            raise BadCommand("begin.resume", "a checkpoint comes whole or in parts, not both")
        assembly = CheckpointAssembly(begin.resume_bytes, self.checkpoint_bound)
        while not assembly.complete:
            part = commands.next(self.session_idle_seconds)
            if part is None:
                got = f"{assembly.received} of {assembly.expected} bytes"
                raise BadCommand("checkpoint_part", f"the stream ended after {got} of the checkpoint")
            if part.WhichOneof("command") != "checkpoint_part" or part.request_id != cmd.request_id:
                raise BadCommand(
                    "checkpoint_part",
                    f"{part.WhichOneof('command')} of {part.request_id!r} before the checkpoint was whole",
                )
            assembly.add(part.checkpoint_part)
        assembly.fill(begin.resume)

    def watchdog_bound(self, begin: worker_pb2.BeginCommand) -> float:
        """``watchdog_seconds``, raised for a session whose coordinator asks for longer peer waits
        than it covers: a wait the engine bounds itself is not a stall."""
        requested = begin.peer_timeout_seconds
        if not requested > 0:  # 0 (this worker's default) or not a number
            return self.watchdog_seconds
        waits = PEER_WAITS_PER_COMMAND * min(requested, MAX_PEER_TIMEOUT) + SEND_WAIT_SECONDS
        return max(self.watchdog_seconds, waits)

    def _release(self, session: ControlSession) -> None:
        """Abort what the session left running, then free the worker: an Info that shows no
        active request means the abort is done."""
        if session.request_id is not None:
            self.engine.abort(session.request_id)
        self._active_request_id = self._owner = ""
        self._busy.release()
        self._count(session.outcome)
        logs.set_request_id(None)

    def _idle(self, context: grpc.ServicerContext, session: ControlSession) -> Callable[[Watch], None]:
        def expire(watch: Watch) -> None:
            session.outcome = "idle_timeout"
            log.warning(
                "%s: the client did not take %s in %.0f s; session cancelled",
                self.worker_id,
                watch.what,
                watch.elapsed,
            )
            context.cancel()

        return expire

    def _stall(self, watch: Watch) -> None:
        """The watchdog fired: this worker is not to be trusted with work until restarted."""
        if self.stalled.is_set():
            return
        self.stalled.set()
        log.error(
            "%s: %s made no progress for %.0f s (bound %.0f s): NOT_SERVING until restarted; it is at\n%s",
            self.worker_id,
            watch.what,
            watch.elapsed,
            watch.bound,
            watch.stack(),
        )
        if self.metrics is not None:
            self.metrics.stalled.set(1)
        if self._on_stall is not None:
            self._on_stall()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()

    def _run(
        self, cmd: worker_pb2.SessionRequest, which: str | None, commands: _Commands
    ) -> worker_pb2.SessionResponse:
        """One command under its span; a step's frames carry the worker's step span, and a
        speculative step reads its resolution, the next command on the stream."""
        attributes = {"hybridiff.worker": self.worker_id}
        if which == "step":
            attributes.update(
                {
                    "hybridiff.step": cmd.step.step,
                    "hybridiff.phase": Phase(cmd.step.phase).name
                    if cmd.step.phase in Phase.__members__.values()
                    else str(cmd.step.phase),
                }
            )
        with telemetry.span_from(
            dict(cmd.trace_context), self._tracer, f"worker.{which or 'empty'}", **attributes
        ):
            if which in ("begin", "finish"):
                log.info("%s: %s of request %s", self.worker_id, which, cmd.request_id)
            return self.engine.handle(cmd, trace_context=telemetry.inject(), next_command=commands.poll)

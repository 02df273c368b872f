"""The worker's device thread: the one thread that enters its compiled graphs (docs/design.md section 4).

torch's CUDA-graph trees keep their state in the thread-local storage of the thread that first
ran a graph: a graph entered from another thread fails, and two threads replaying one graph
share its static input buffers. So each worker (each engine of an in-process pair too) has one
``DeviceThread``, and every compiled call — the warm-up, ``MeasureSplit``'s compiled timings,
the compiles a ``Begin`` asks for and every step's compiled forward and stages — runs on it:
callers submit work and wait for it (``call``), or queue a compile behind it (``background``).

Work submitted with ``call`` runs in order, before any background job that has not started;
while a background job (a compile, which may take minutes) runs, ``try_call`` declines, so a
step never waits behind a compile (the compile cache then runs the call eager on the caller's
thread). Each job runs in the submitter's context variables (log request ids, trace context)
and grad mode (both are per thread in Python and torch).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

log = logging.getLogger(__name__)

_Job = tuple[Future, contextvars.Context, bool, Callable, tuple, dict]


class DeviceThread:
    """One daemon thread running submitted calls: urgent ones in order, background ones only
    when no urgent one waits. ``ident`` is the thread's id (``threading.get_ident`` there)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._urgent: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._closed = False
        self.background_running = False  # a background job holds the thread now
        self.background_done = 0  # background jobs finished (a test waits on it)
        self._thread = threading.Thread(target=self._loop, name=f"device-{name}", daemon=True)
        self._thread.start()
        self.ident = self._thread.ident

    def on_thread(self) -> bool:
        return threading.get_ident() == self.ident

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        """``fn(*args, **kwargs)`` queued to run on the thread, in order; its future."""
        future: Future = Future()
        with self._cond:
            self._refuse_if_closed()
            self._urgent.append(self._job(future, fn, args, kwargs))
            self._cond.notify()
        return future

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the thread (at once when called there), its result or
        exception. Waits behind a background job that already runs (``try_call`` does not)."""
        if self.on_thread():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def try_call(self, fn: Callable, *args: Any) -> tuple[bool, Any]:
        """(True, ``fn(*args)``) run on the thread, or (False, None) at once when a background job
        holds it: the caller does the work another way (eager) instead of waiting for it."""
        if self.on_thread():
            return True, fn(*args)
        future: Future = Future()
        with self._cond:
            self._refuse_if_closed()
            if self.background_running:
                return False, None
            # Urgent jobs are taken before any background one: this one runs next or after
            # other urgent ones, never behind a compile.
            self._urgent.append(self._job(future, fn, args, {}))
            self._cond.notify()
        return True, future.result()

    def background(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        """``fn(*args, **kwargs)`` queued to run on the thread once no urgent call waits."""
        future: Future = Future()
        with self._cond:
            self._refuse_if_closed()
            self._background.append(self._job(future, fn, args, kwargs))
            self._cond.notify()
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Cancels the jobs that have not started and ends the thread once the running one ends
        (waiting at most ``timeout`` seconds for it)."""
        with self._cond:
            self._closed = True
            for job in (*self._urgent, *self._background):
                job[0].cancel()
            self._urgent.clear()
            self._background.clear()
            self._cond.notify()
        if not self.on_thread():
            self._thread.join(timeout)

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise RuntimeError(f"device thread {self.name} is closed")

    @staticmethod
    def _job(future: Future, fn: Callable, args: tuple, kwargs: dict) -> _Job:
        return (future, contextvars.copy_context(), torch.is_grad_enabled(), fn, args, kwargs)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._urgent or self._background or self._closed):
                    self._cond.wait()
                if self._closed and not self._urgent:
                    return
                background = not self._urgent
                future, context, grad, fn, args, kwargs = (
                    self._background if background else self._urgent
                ).popleft()
                self.background_running = background
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = context.run(_with_grad, grad, fn, args, kwargs)
                    except BaseException as exc:  # handed to the caller, whatever it is
                        if background:
                            log.exception("background job %s on device thread %s failed", fn, self.name)
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                with self._cond:
                    self.background_running = False
                    if background:
                        self.background_done += 1
                    self._cond.notify_all()


def _with_grad(grad: bool, fn: Callable, args: tuple, kwargs: dict) -> Any:
    with torch.set_grad_enabled(grad):
        return fn(*args, **kwargs)

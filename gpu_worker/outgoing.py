"""A worker's data-plane sends, done in order on one thread of their own (staged transfers).

The compute thread stages a message (its device-to-host copies queued on the side stream) and
hands the rest to ``Outgoing``: waiting for the copies, then the zero-copy hand-over to the
transport. The compute thread goes on with what the schedule has next (the outer ring's second
half after sending the core's input, the scheduler step after sending a prediction), so the
copy overlaps that compute; at the end of the step it ``flush``es, waiting only for what has
not finished by then (docs/design.md section 9, "Transfers"). One thread keeps the
messages in the order they were sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from hybridiff.errors import PeerTimeout

_STOP = object()


class Outgoing:
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[Future] = []
        self._thread = threading.Thread(target=self._run, name=f"send-{name}", daemon=True)
        self._thread.start()

    def submit(self, send: Callable[[], Any]) -> None:
        """Run ``send`` after every send submitted before it; ``flush`` gives its result."""
        future: Future = Future()
        self._pending.append(future)
        self._queue.put((send, future))

    def flush(self, timeout: float) -> list[Any]:
        """The results of the sends submitted since the last flush, in order, once all are done;
        the first error any of them raised; ``PeerTimeout`` when they take over ``timeout``."""
        pending, self._pending = self._pending, []
        deadline = time.monotonic() + timeout
        results, error = [], None
        for future in pending:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise PeerTimeout(f"{len(pending)} data-plane sends not done within {timeout:.1f}s") from None
            except BaseException as exc:  # every send still ends: each releases its own buffer
                error = error or exc
        if error is not None:
            raise error
        return results

    def discard(self) -> None:
        """Forget sends of a step that failed before its flush: they end (or fail) on their own."""
        self._pending = []

    def drain(self, timeout: float) -> bool:
        """Wait until every send submitted so far has ended (their results and errors dropped);
        False when they did not within ``timeout``."""
        self._pending = []
        marker: Future = Future()
        self._queue.put((lambda: None, marker))
        try:
            marker.result(timeout=timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self._queue.put((_STOP, None))

    def _run(self) -> None:
        while True:
            send, future = self._queue.get()
            if send is _STOP:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(send())
            except BaseException as exc:
                future.set_exception(exc)

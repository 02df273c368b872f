"""The admission queue: requests waiting for workers, first come first served per model, with a
capacity over all models together (docs/design.md section 10).

It is bookkeeping only — no lock, no clock, no workers: the pool (``coordinator.pool``) drives it
under its own lock with real workers, and the pool simulator (``hybridiff_tools/bench/poolsim.py``) drives
the same class with simulated ones, so both admit by one rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.allocation import PoolView
from hybridiff.errors import QueueFull

# Decides a waiting request's width again from the pool as it is when the request reaches the
# head: (want, accept_one). AUTO requests have one (coordinator.allocation.admission).
Readmit = Callable[[PoolView], tuple[int, bool]]


@dataclass(eq=False)
class Ticket:
    """One waiting request: the workers it wants (one or two), and whether it takes one alone."""

    model: str
    want: int
    accept_one: bool
    number: int = field(default=0)
    resuming: bool = False  # a request whose worker failed, back at the head with its checkpoint

    @property
    def takes_one(self) -> bool:
        return self.want == 1 or self.accept_one


class AdmissionQueue:
    def __init__(self, capacity: int | None) -> None:
        """``capacity``: the most requests waiting, all models together (None: no limit)."""
        self.capacity = capacity
        self._waiting: dict[str, list[Ticket]] = {}
        self._numbers = itertools.count()

    def enqueue(self, model: str, want: int, accept_one: bool) -> Ticket:
        """A ticket at the tail of ``model``'s queue; ``QueueFull`` at once when the queue is full."""
        if self.capacity is not None and self.depth >= self.capacity:
            raise QueueFull(f"admission queue is full ({self.capacity} waiting)")
        ticket = Ticket(model, want, accept_one, next(self._numbers))
        self._waiting.setdefault(model, []).append(ticket)
        return ticket

    def enqueue_resuming(self, model: str, want: int, accept_one: bool) -> Ticket:
        """A ticket for a request that lost a worker mid-way: ahead of every new request (behind
        those resuming before it), and never refused for a full queue — it was admitted once."""
        ticket = Ticket(model, want, accept_one, next(self._numbers), resuming=True)
        queue = self._waiting.setdefault(model, [])
        queue.insert(sum(t.resuming for t in queue), ticket)
        return ticket

    def remove(self, ticket: Ticket) -> None:
        """Take ``ticket`` out (admitted, refused or given up)."""
        queue = self._waiting.get(ticket.model, [])
        if ticket in queue:
            queue.remove(ticket)
        if not queue:
            self._waiting.pop(ticket.model, None)

    def is_head(self, ticket: Ticket) -> bool:
        queue = self._waiting.get(ticket.model)
        return bool(queue) and queue[0] is ticket

    def head(self, model: str) -> Ticket | None:
        queue = self._waiting.get(model)
        return queue[0] if queue else None

    def readmit(self, ticket: Ticket, idle: int, readmit: Readmit | None) -> None:
        """At the head: decide ``ticket``'s width again from the pool behind it (AUTO)."""
        if readmit is not None:
            ticket.want, ticket.accept_one = readmit(self.view(ticket.model, idle, behind=ticket))

    def view(self, model: str, idle: int, behind: Ticket | None = None) -> PoolView:
        """The pool as a request of ``model`` sees it: ``idle`` workers free, and the requests
        waiting (with ``behind``: only those after that ticket)."""
        queue = self._waiting.get(model, [])
        if behind is not None:
            queue = queue[queue.index(behind) + 1 :]
        return PoolView(idle=idle, waiting=len(queue), waiting_takes_one=bool(queue) and queue[0].takes_one)

    @property
    def depth(self) -> int:
        """Requests waiting, all models together."""
        return sum(len(q) for q in self._waiting.values())

    def wanted(self) -> int:
        """Workers the waiting requests want, all models together."""
        return sum(t.want for q in self._waiting.values() for t in q)


def workers_to_take(ticket: Ticket, idle: int) -> int:
    """How many of ``idle`` free workers the head ``ticket`` takes now: all it wants, or one alone
    if it accepts one; 0: it waits."""
    if idle >= ticket.want:
        return ticket.want
    return 1 if ticket.accept_one and idle else 0

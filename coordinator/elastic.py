"""The adaptive policy at work on one running request: at each step boundary it asks the pool
(``allocation.at_boundary``) whether to shrink or grow, and makes the change on its lease
(``driver.Elastic``). Every change is counted in ``hybridiff_elastic_events_total{kind}``."""

from __future__ import annotations

from collections.abc import Callable

from coordinator.allocation import CostBook, Decision, Policy, at_boundary
from coordinator.driver import ELASTIC_LOOKAHEAD, WorkerHandle
from coordinator.pool import Lease


class ElasticLease:
    def __init__(
        self,
        lease: Lease,
        policy: Policy,
        costs: CostBook,
        num_steps: int,
        on_event: Callable[[Decision], None],
        lookahead: int = ELASTIC_LOOKAHEAD,
    ) -> None:
        """``lookahead``: the steps the driver has issued past a boundary (``ELASTIC_LOOKAHEAD``)."""
        self.lease, self.policy, self.costs, self.num_steps = lease, policy, costs, num_steps
        self.on_event, self.lookahead = on_event, lookahead

    def decide(self, next_step: int, used: list[WorkerHandle]) -> Decision:
        view = self.lease.view()
        # A change decided now takes effect once the steps already issued have completed: only the
        # steps after those gain from it (a grow decided with one step in flight and one to go
        # bought a single paired step with a new session on two workers).
        after = self.num_steps - next_step - self.lookahead
        return at_boundary(self.policy, len(used) == 2, view, after, self.costs.costs(self.lease.model))

    def apply(self, decision: Decision, used: list[WorkerHandle]) -> list[WorkerHandle] | None:
        """Make the change if the pool still calls for it (it may have moved while the step in
        flight completed): a shrink keeps worker U and hands C to the pool's head waiter; a grow
        takes an idle worker as C."""
        view = self.lease.view()
        if decision == Decision.SHRINK and len(used) == 2 and view.waiting and not view.idle:
            self.lease.give_back(used[1].name)
        elif decision == Decision.GROW and len(used) == 1 and self.lease.take_one() is not None:
            pass
        else:
            return None
        self.on_event(decision)
        return self.lease.handles()

"""The adaptive policy on one running request (coordinator.elastic.ElasticLease): a change it
decides at a step boundary takes effect only once the steps already issued have completed, so
it weighs only the steps after those."""

from coordinator.allocation import CostBook, Decision, Policy, PoolView
from coordinator.driver import ELASTIC_LOOKAHEAD
from coordinator.elastic import ElasticLease


class _Lease:
    model = "m"

    def __init__(self, view: PoolView) -> None:
        self._view = view

    def view(self) -> PoolView:
        return self._view


def _elastic(view: PoolView, num_steps: int = 12) -> ElasticLease:
    book = CostBook()
    for kind, seconds in (("single", 1.0), ("paired", 0.6), ("switch", 0.3)):  # a grow saves 0.4 s a step
        book.observe("m", kind, seconds)
    return ElasticLease(_Lease(view), Policy.ADAPTIVE, book, num_steps, on_event=lambda d: None)


def test_a_grow_pays_only_over_the_steps_after_the_one_in_flight():
    assert ELASTIC_LOOKAHEAD == 1
    alone, idle = ["u"], _elastic(PoolView(idle=1, waiting=0))
    # Decided before step 9: step 9 is in flight, 10 and 11 run paired: 2 x 0.4 s > 2 switches of 0.3 s.
    assert idle.decide(9, alone) == Decision.GROW
    # Decided before step 10: only step 11 would run paired (0.4 s), not worth two switches.
    assert idle.decide(10, alone) == Decision.KEEP


def test_no_change_is_decided_where_none_could_take_effect():
    waiting = _elastic(PoolView(idle=0, waiting=1))
    assert waiting.decide(10, ["u", "c"]) == Decision.SHRINK  # after step 10, the waiter gets C for step 11
    assert waiting.decide(11, ["u", "c"]) == Decision.KEEP  # step 11, the last, is in flight already

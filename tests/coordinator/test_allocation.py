"""The allocation policies' decisions (coordinator.allocation), against views of a pool."""

import pytest

from coordinator.allocation import (
    Admission,
    CostBook,
    Decision,
    Policy,
    PolicyCosts,
    PoolView,
    admission,
    at_boundary,
)
from hybridiff.protocol import Mode

FREE = PoolView(idle=2, waiting=0)
ONE_FREE = PoolView(idle=1, waiting=0)
BUSY_WITH_QUEUE = PoolView(idle=0, waiting=1)
COSTS = PolicyCosts(single=1.0, paired=0.6, switch=0.3)  # a CPU-like device: b2/b1 = 1.67


@pytest.mark.parametrize(
    "policy,pool,expected",
    [
        (Policy.LATENCY, FREE, Admission(2, True)),
        (Policy.LATENCY, ONE_FREE, Admission(2, True)),  # AUTO still takes a lone worker rather than wait
        (Policy.THROUGHPUT, FREE, Admission(1, False)),
        (Policy.ADAPTIVE, FREE, Admission(2, True)),
        (Policy.ADAPTIVE, ONE_FREE, Admission(1, False)),
        (Policy.ADAPTIVE, PoolView(idle=2, waiting=1), Admission(1, False)),  # someone waits: leave them one
    ],
)
def test_admission_of_auto(policy, pool, expected):
    assert admission(policy, Mode.AUTO, guided=True, pool=pool) == expected


@pytest.mark.parametrize("policy", list(Policy))
def test_explicit_modes_get_what_they_name(policy):
    assert admission(policy, Mode.HYBRID, True, FREE) == Admission(2, False)
    assert admission(policy, Mode.CFG_PARALLEL, True, BUSY_WITH_QUEUE) == Admission(2, False)
    assert admission(policy, Mode.SINGLE, True, FREE) == Admission(1, False)
    assert admission(policy, Mode.AUTO, False, FREE) == Admission(1, False)  # one branch: nothing to split
    assert admission(policy, Mode.PIPELINE, False, FREE) == Admission(2, False)


def test_adaptive_shrinks_only_for_a_waiter_that_can_start_alone():
    assert at_boundary(Policy.ADAPTIVE, True, BUSY_WITH_QUEUE, 10, COSTS) == Decision.SHRINK
    assert (
        at_boundary(Policy.ADAPTIVE, True, PoolView(0, 1, waiting_takes_one=False), 10, COSTS)
        == Decision.KEEP
    )
    assert at_boundary(Policy.ADAPTIVE, True, PoolView(1, 1), 10, COSTS) == Decision.KEEP  # a worker is free
    assert at_boundary(Policy.ADAPTIVE, True, FREE, 10, COSTS) == Decision.KEEP
    assert at_boundary(Policy.ADAPTIVE, False, BUSY_WITH_QUEUE, 10, COSTS) == Decision.KEEP


def test_adaptive_grows_when_idle_nothing_waits_and_the_steps_left_pay():
    assert at_boundary(Policy.ADAPTIVE, False, ONE_FREE, 10, COSTS) == Decision.GROW
    # 0.4 s saved per step must repay two 0.3 s switches: 1 step does not, 2 steps do
    assert at_boundary(Policy.ADAPTIVE, False, ONE_FREE, 1, COSTS) == Decision.KEEP
    assert at_boundary(Policy.ADAPTIVE, False, ONE_FREE, 2, COSTS) == Decision.GROW
    assert at_boundary(Policy.ADAPTIVE, False, PoolView(1, 1), 10, COSTS) == Decision.KEEP
    assert at_boundary(Policy.ADAPTIVE, False, ONE_FREE, 10, None) == Decision.KEEP  # costs unknown: no guess


def test_a_device_where_batch_two_is_free_never_grows():
    launch_bound = PolicyCosts(single=1.0, paired=1.02, switch=0.01)  # b2/b1 ~ 1: a pair saves nothing
    assert at_boundary(Policy.ADAPTIVE, False, ONE_FREE, 50, launch_bound) == Decision.KEEP


@pytest.mark.parametrize("policy", [Policy.LATENCY, Policy.THROUGHPUT])
def test_static_policies_never_change_a_running_request(policy):
    for paired, pool in ((True, BUSY_WITH_QUEUE), (False, ONE_FREE)):
        assert at_boundary(policy, paired, pool, 10, COSTS) == Decision.KEEP


def test_the_cost_book_learns_from_measured_steps():
    book = CostBook(weight=0.5)
    assert book.costs("m") is None
    book.observe("m", "single", 1.0)
    assert book.costs("m") is None  # no paired step seen yet
    book.observe("m", "paired", 0.8)
    book.observe("m", "paired", 0.4)
    book.observe("m", "switch", 0.2)
    costs = book.costs("m")
    assert (costs.single, costs.paired, costs.switch) == pytest.approx((1.0, 0.6, 0.2))
    assert book.costs("other") is None


def test_where_a_pair_costs_no_more_worker_time_adaptive_pairs_like_latency():
    free_pairs = PolicyCosts(single=1.0, paired=0.52, switch=0.01)  # 2 x 0.52 / 1.0 = 1.04 <= 1.10
    assert not free_pairs.pair_spends_capacity() and COSTS.pair_spends_capacity()
    assert admission(Policy.ADAPTIVE, Mode.AUTO, True, ONE_FREE, free_pairs) == Admission(2, True)
    assert admission(Policy.ADAPTIVE, Mode.AUTO, True, PoolView(2, 1), free_pairs) == Admission(2, True)
    assert at_boundary(Policy.ADAPTIVE, True, BUSY_WITH_QUEUE, 10, free_pairs) == Decision.KEEP
    assert admission(Policy.ADAPTIVE, Mode.AUTO, True, ONE_FREE, COSTS) == Admission(1, False)

"""The allocation policy (docs/design.md section 10): how many workers a request gets,
at admission and again at every step boundary.

- ``latency``: a pair whenever two workers are free, kept to the end (one request's latency).
- ``throughput``: one worker per request (the pool's capacity: batch 2 costs less than two batch-1
  forwards on every device measured).
- ``adaptive``: decided at admission and again at every step boundary. A paired request gives a
  worker up when another request waits and none is free (shrink); a single request takes an
  idle worker when nothing waits and the steps left pay for the switch (grow). The costs are the
  ones the workers measured, so the same rule serves a CPU, an H200 or an RTX 3090.

Pure: a decision depends only on the view of the pool and the measured costs passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hybridiff.protocol import Mode


class Policy(str, Enum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    ADAPTIVE = "adaptive"


class Decision(str, Enum):
    KEEP = "keep"
    SHRINK = "shrink"  # hand one worker of the pair to a waiting request, go on alone
    GROW = "grow"  # take an idle worker, go on as a pair


@dataclass(frozen=True)
class PoolView:
    """What the pool looks like to one request of a model at one instant."""

    idle: int  # idle workers serving the model
    waiting: int  # requests of the model waiting in the admission queue
    waiting_takes_one: bool = True  # the head of the queue would start on a lone worker


# A pair that costs at most this much more worker time than one worker alone counts as free.
# Simulated on measured H200 costs (hybridiff_tools/bench/poolsim.py): SDXL pairs cost 1.29x (adaptive pays),
# SD3 1.05x and a 2x-batch device 1.01x (adaptive must pair like ``latency`` there).
PAIR_OVERHEAD_TOLERANCE = 1.10


@dataclass(frozen=True)
class PolicyCosts:
    """Measured seconds of one step: alone (both branches, batch 2) and paired (one branch each,
    batch 1, plus the exchange), and what a switch costs (a new session: prompt encoding and a
    control round trip)."""

    single: float
    paired: float
    switch: float

    @property
    def pair_overhead(self) -> float:
        """Worker-seconds of a paired step over a step alone: above 1, a pair spends capacity."""
        return 2 * self.paired / self.single

    def pair_spends_capacity(self) -> bool:
        """Whether a pair costs the pool more worker time than one worker alone, by more than
        ``PAIR_OVERHEAD_TOLERANCE``. Where it does not (a device whose batch of 2 costs about 2
        batches of 1, or a pipelined window cheaper than the batch), pairing is free capacity-wise
        and the adaptive policy pairs whenever it can, like ``latency``."""
        return self.pair_overhead > PAIR_OVERHEAD_TOLERANCE

    def grow_pays(self, steps_left: int, margin: float = 2.0) -> bool:
        """Growing saves ``single - paired`` per step left; it must repay ``margin`` switches."""
        return steps_left * (self.single - self.paired) > margin * self.switch


@dataclass(frozen=True)
class Admission:
    want: int  # workers to wait for
    accept_one: bool  # start on a lone worker rather than wait for the second


def admission(
    policy: Policy, mode: Mode, guided: bool, pool: PoolView, costs: PolicyCosts | None = None
) -> Admission:
    """How many workers a new request asks the pool for. Explicit modes get what they name;
    the policy decides for AUTO (adaptive: with the measured ``costs``, once known)."""
    if mode == Mode.SINGLE or (not guided and mode != Mode.PIPELINE):
        return Admission(1, False)
    if mode != Mode.AUTO:
        return Admission(2, False)
    if policy == Policy.THROUGHPUT:
        return Admission(1, False)
    pairs_are_free = costs is not None and not costs.pair_spends_capacity()
    if policy == Policy.ADAPTIVE and not pairs_are_free and (pool.waiting > 0 or pool.idle < 2):
        return Admission(1, False)  # do not hold a second worker that someone else could use
    return Admission(2, True)


def at_boundary(
    policy: Policy, paired: bool, pool: PoolView, steps_left: int, costs: PolicyCosts | None
) -> Decision:
    """What an elastic (AUTO, guided) request does at its next step boundary."""
    if policy != Policy.ADAPTIVE or steps_left <= 0:
        return Decision.KEEP
    spends = costs is None or costs.pair_spends_capacity()
    if paired and spends and pool.waiting > 0 and pool.idle == 0 and pool.waiting_takes_one:
        return Decision.SHRINK
    if (
        not paired
        and pool.idle > 0
        and pool.waiting == 0
        and costs is not None
        and costs.grow_pays(steps_left)
    ):
        return Decision.GROW
    return Decision.KEEP


class CostBook:
    """Step costs per model as the workers measured them (moving averages of completed steps):
    a step alone (Phase.SINGLE with guidance: the CFG batch), a step as a pair (one branch each plus
    the exchange), and a switch (a new session: encoding and a round trip).

    Once cost-aware AUTO priced a request of the model (``predicted``), a step alone and a step
    as a pair are the schedule model's (coordinator.auto_mode): the mean step of one worker and
    of the paired schedule AUTO chose, so shrink, grow and admission weigh the schedule the
    request would run, not plain CFG splitting."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self._costs: dict[str, dict[str, float]] = {}
        self._predicted: dict[str, tuple[float, float]] = {}

    def predicted(self, model: str, single: float, paired: float) -> None:
        """The schedule model's mean step alone and as AUTO's chosen pair, for ``model``."""
        self._predicted[model] = (single, paired)

    def observe(self, model: str, kind: str, seconds: float) -> None:
        """``kind``: "single", "paired" or "switch"."""
        book = self._costs.setdefault(model, {})
        old = book.get(kind)
        book[kind] = seconds if old is None else (1 - self.weight) * old + self.weight * seconds

    def costs(self, model: str) -> PolicyCosts | None:
        """The model's costs once both step kinds were seen (no guess before: no grow)."""
        book = self._costs.get(model, {})
        if model in self._predicted:
            single, paired = self._predicted[model]
            return PolicyCosts(single=single, paired=paired, switch=book.get("switch", 0.0))
        if "single" not in book or "paired" not in book:
            return None
        return PolicyCosts(single=book["single"], paired=book["paired"], switch=book.get("switch", 0.0))

"""Choose the stage cut by measured cost so both stages take about the same time (DESIGN section 1).

The cut must be the same on both workers of a pair, so it is decided once, on one worker
(``SplitPlanner``, behind the control API's ``MeasureSplit``), and handed to both by the
coordinator. ``choose_cut`` is the one rule, also used by the GPU profile.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from gpu_worker.adapters.base import ModelAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitPlan:
    cut: int
    stage1_seconds: float
    stage2_seconds: float
    unit_seconds: dict[str, float]

    @property
    def ratio(self) -> float:
        """Slower stage over faster stage (1.0 = perfectly balanced; the target is <= 1.10)."""
        lo, hi = sorted((self.stage1_seconds, self.stage2_seconds))
        return hi / lo if lo > 0 else float("inf")


def device_clock(device: torch.device):
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


@torch.no_grad()
def measure_unit_costs(
    adapter: ModelAdapter, height: int, width: int, batch: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds per unit of a denoiser forward at ``height`` x ``width`` (random inputs)."""
    cond = adapter.encode("a photograph", None, guidance=batch == 2, height=height, width=width)
    inputs = cond.for_branches("both" if batch == 2 else "cond")
    timeline = adapter.new_timeline(10, 0, height, width)
    latents = adapter.initial_latents(timeline, height, width)
    t = timeline.timesteps[len(timeline.timesteps) // 2]
    sample = adapter.model_input(timeline, latents, t)
    split = adapter.make_split()
    clock = device_clock(adapter.device)
    runs = [split.unit_costs(sample, t, inputs, clock) for _ in range(repeats + 1)][1:]  # first run warms up
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


def stage_costs(stage1_units: Iterable[str], unit_seconds: dict[str, float]) -> tuple[float, float]:
    """Summed unit costs of stage 1 (the named units) and stage 2 (the rest)."""
    stage1 = set(stage1_units)
    s1 = sum(v for k, v in unit_seconds.items() if k in stage1)
    return s1, sum(unit_seconds.values()) - s1


def plan_for_cut(adapter: ModelAdapter, unit_seconds: dict[str, float], cut: int) -> SplitPlan:
    return SplitPlan(cut, *stage_costs(adapter.make_split(cut).stage1_units(), unit_seconds), unit_seconds)


def valid_cuts(adapter: ModelAdapter) -> range:
    split = adapter.make_split()
    return range(1, split.num_units + 1) if split.topology == "nested" else range(1, split.num_units)


def choose_cut(cuts: Iterable[int], stage_seconds: Callable[[int], tuple[float, float]]) -> int:
    """The cut whose two stages are closest in cost (the smaller cut on a tie)."""

    def imbalance(cut: int) -> tuple[float, int]:
        lo, hi = sorted(stage_seconds(cut))
        return (hi / lo if lo > 0 else float("inf"), cut)

    return min(cuts, key=imbalance)


def balanced_plan(adapter: ModelAdapter, unit_seconds: dict[str, float]) -> SplitPlan:
    """The plan of the cut whose two stages are closest in measured cost."""
    plans = {cut: plan_for_cut(adapter, unit_seconds, cut) for cut in valid_cuts(adapter)}
    cut = choose_cut(plans, lambda c: (plans[c].stage1_seconds, plans[c].stage2_seconds))
    return plans[cut]


class SplitPlanner:
    """The one place a worker chooses and caches its balanced cut per size (the control API's
    ``MeasureSplit`` and the in-process pair both ask it; measured once per size)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._plans: dict[tuple[int, int], SplitPlan] = {}
        self._lock = threading.Lock()

    def plan(self, height: int, width: int) -> SplitPlan:
        with self._lock:
            if (height, width) not in self._plans:
                plan = balanced_plan(self.adapter, measure_unit_costs(self.adapter, height, width))
                log.info(
                    "split at %dx%d: cut %d, stages %.4fs / %.4fs (ratio %.3f)",
                    width,
                    height,
                    plan.cut,
                    plan.stage1_seconds,
                    plan.stage2_seconds,
                    plan.ratio,
                )
                self._plans[(height, width)] = plan
            return self._plans[(height, width)]

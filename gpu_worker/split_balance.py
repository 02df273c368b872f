"""Choose the stage cut by measured cost so both stages take about the same time (DESIGN section 1).

The cut must be the same on both workers of a pair, so it is decided once (by the coordinator
or the in-process engine, from one worker's measurement) and handed to both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from gpu_worker.adapters.base import ModelAdapter


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
def measure_unit_costs(adapter: ModelAdapter, height: int, width: int, batch: int = 1, repeats: int = 3) -> dict[str, float]:
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


def plan_for_cut(adapter: ModelAdapter, unit_seconds: dict[str, float], cut: int) -> SplitPlan:
    split = adapter.make_split(cut)
    stage1 = set(split.stage1_units())
    s1 = sum(v for k, v in unit_seconds.items() if k in stage1)
    s2 = sum(v for k, v in unit_seconds.items() if k not in stage1)
    return SplitPlan(cut, s1, s2, unit_seconds)


def valid_cuts(adapter: ModelAdapter) -> range:
    split = adapter.make_split()
    return range(1, split.num_units + 1) if split.topology == "nested" else range(1, split.num_units)


def balanced_plan(adapter: ModelAdapter, unit_seconds: dict[str, float]) -> SplitPlan:
    """The cut whose two stages are closest in measured cost."""
    plans = [plan_for_cut(adapter, unit_seconds, cut) for cut in valid_cuts(adapter)]
    return min(plans, key=lambda p: (p.ratio, p.cut))

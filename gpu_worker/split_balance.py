"""Choose the stage cut by measured cost so both stages take about the same time (docs/design.md section 7).

Eager, the cut comes from per-unit costs. Compiled (``adapter.compiler`` set), eager timing
misleads (compilation removes launch overhead and fuses unevenly), so the cut comes from the
compiled stage callables themselves, each timed after its first (compiling) call: starting from
the eager cut, it moves one cut at a time toward the cheaper stage while the balance improves.

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
from dataclasses import dataclass, field, replace

import torch

from gpu_worker.adapters.base import ModelAdapter, StageSplit, Topology
from gpu_worker.compiled import on_device

log = logging.getLogger(__name__)

# The compiled functions of each topology's stages (as the adapters name them, before "@cut").
STAGES = {Topology.NESTED: ("stage1_pre", "stage2", "stage1_post"), Topology.SEQUENTIAL: ("stage1", "stage2")}


@dataclass(frozen=True)
class BatchCosts:
    """Seconds of a forward and of its two stages at one batch size (nested: stage 1's parts
    before and after the core too), summed from measured per-unit costs."""

    forward: float
    stage1: float
    stage2: float
    pre: float = 0.0
    post: float = 0.0


def batch_costs(split: StageSplit, unit_seconds: dict[str, float]) -> BatchCosts:
    """A forward's and the stages' seconds at ``split``'s cut: stage 1's units before the first
    stage-2 unit (in forward order) are the nested ring's way in, the others its way out."""
    stage1 = set(split.stage1_units())
    s1, s2 = stage_costs(stage1, unit_seconds)
    pre = post = 0.0
    if split.topology == Topology.NESTED:
        order = [n for n in split.unit_names() if n in unit_seconds]
        first_core = next((i for i, n in enumerate(order) if n not in stage1), len(order))
        pre = sum(unit_seconds[n] for n in order[:first_core] if n in stage1)
        post = s1 - pre
    return BatchCosts(s1 + s2, s1, s2, pre, post)


@dataclass(frozen=True)
class SplitPlan:
    cut: int
    stage1_seconds: float
    stage2_seconds: float
    unit_seconds: dict[str, float]
    # Per batch (1: a branch, 2: the CFG batch): what AUTO's schedule model prices a step with.
    costs: dict[int, BatchCosts] = field(default_factory=dict)

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
    sample, t, inputs = _request_inputs(adapter, height, width, batch)
    split = adapter.make_split()
    clock = device_clock(adapter.device)
    runs = [split.unit_costs(sample, t, inputs, clock) for _ in range(repeats + 1)][1:]  # first run warms up
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


def _request_inputs(adapter: ModelAdapter, height: int, width: int, batch: int, num_images: int = 1):
    """Inputs of a forward at ``batch`` = 1 (a branch) or 2 (the CFG batch), per image."""
    cond = adapter.encode("a photograph", None, batch == 2, height, width, num_images)
    inputs = cond.for_branches("both" if batch == 2 else "cond")
    timeline = adapter.new_timeline(10, 0, height, width)
    latents = adapter.initial_latents(timeline, height, width, num_images)
    t = timeline.timesteps[len(timeline.timesteps) // 2]
    return adapter.model_input(timeline, latents, t), t, inputs


def through_stages(
    split, sample: torch.Tensor, t: torch.Tensor, inputs, clock=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, float]:
    """One full forward as stage 1 then stage 2, through the engine's own stage API (compiled when
    the adapter compiles): what a fill step computes. Gives the prediction, what the next
    pipeline step re-uses (stage 1's output when sequential, the core's output when nested) and,
    with a ``clock``, the seconds of stage 1 and stage 2 (else 0, 0: no clock, no device sync)."""
    tick = clock or (lambda: 0.0)
    if split.topology == Topology.NESTED:
        start = tick()
        core_in, state = split.stage1_pre(sample, t, inputs)
        pre = tick()
        core_out = split.stage2(core_in, sample, t, inputs)
        core = tick()
        out = split.stage1_post(core_out, state)
        return out, core_out, pre - start + tick() - core, core - pre
    start = tick()
    boundary = split.stage1(sample, t, inputs)
    mid = tick()
    out = split.stage2(boundary, sample, t, inputs)
    return out, boundary, mid - start, tick() - mid


def run_stages(split, sample: torch.Tensor, t: torch.Tensor, inputs, clock) -> tuple[float, float]:
    """Seconds of stage 1 and stage 2 of one forward (``through_stages``)."""
    return through_stages(split, sample, t, inputs, clock)[2:]


@torch.no_grad()
def measure_stage_costs(
    adapter: ModelAdapter, height: int, width: int, cut: int, batch: int = 1, repeats: int = 3
) -> tuple[float, float]:
    """Median seconds of stage 1 and stage 2 at ``cut``, after one warm-up (compiling) run."""
    sample, t, inputs = _request_inputs(adapter, height, width, batch)
    split, clock = adapter.make_split(cut), device_clock(adapter.device)
    runs = [run_stages(split, sample, t, inputs, clock) for _ in range(repeats + 1)][1:]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _imbalance(seconds: tuple[float, float]) -> float:
    lo, hi = sorted(seconds)
    return hi / lo if lo > 0 else float("inf")


def compiled_plan(
    adapter: ModelAdapter, height: int, width: int, unit_seconds: dict[str, float], repeats: int = 3
) -> SplitPlan:
    """The balanced cut by compiled stage timings, searched from the eager cut (each cut measured
    costs a compilation of its stages, so only the cuts on the way are)."""
    cuts = valid_cuts(adapter)
    measured: dict[int, tuple[float, float]] = {}

    def stages(cut: int) -> tuple[float, float]:
        if cut not in measured:
            measured[cut] = measure_stage_costs(adapter, height, width, cut, repeats=repeats)
        return measured[cut]

    cut = balanced_plan(adapter, unit_seconds).cut
    while True:
        s1, s2 = stages(cut)
        step = cut - 1 if s1 > s2 else cut + 1
        if step not in cuts or step in measured or _imbalance(stages(step)) >= _imbalance((s1, s2)):
            break
        cut = step
    best = choose_cut(measured, stages)
    return SplitPlan(best, *measured[best], unit_seconds)


def stage_costs(stage1_units: Iterable[str], unit_seconds: dict[str, float]) -> tuple[float, float]:
    """Summed unit costs of stage 1 (the named units) and stage 2 (the rest)."""
    stage1 = set(stage1_units)
    s1 = sum(v for k, v in unit_seconds.items() if k in stage1)
    return s1, sum(unit_seconds.values()) - s1


def plan_for_cut(adapter: ModelAdapter, unit_seconds: dict[str, float], cut: int) -> SplitPlan:
    return SplitPlan(cut, *stage_costs(adapter.make_split(cut).stage1_units(), unit_seconds), unit_seconds)


def valid_cuts(adapter: ModelAdapter) -> range:
    split = adapter.make_split()
    return range(1, split.num_units + 1) if split.topology == Topology.NESTED else range(1, split.num_units)


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
    ``MeasureSplit`` and the in-process pair both ask it; measured once per size).

    Compiled, the measurement runs on the device thread (it enters compiled graphs). A compiling
    worker that serves (``compiler.background``) answers a size it has not measured compiled with
    the eager plan at once and measures the compiled one behind the device thread's work: the
    compiles never count against ``MeasureSplit``'s deadline; later questions get the compiled plan."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._plans: dict[tuple[int, int], SplitPlan] = {}
        self._eager: dict[tuple[int, int], SplitPlan] = {}  # answered while the compiled one is measured
        self._lock = threading.Lock()

    def plan(self, height: int, width: int) -> SplitPlan:
        compiler = self.adapter.compiler
        if compiler is not None and compiler.background and not compiler.device_thread.on_thread():
            with self._lock:
                size = (height, width)
                if size in self._plans:
                    return self._plans[size]
                if size not in self._eager:
                    units = measure_unit_costs(self.adapter, height, width)
                    self._eager[size] = self._log(
                        size,
                        self._with_costs(balanced_plan(self.adapter, units), height, width),
                        "eager, compiled in the background",
                    )
                    compiler.device_thread.background(self._measure_later, height, width)
                return self._eager[size]
        with self._lock:
            if (height, width) not in self._plans:
                self._plans[(height, width)] = on_device(self.adapter, self._measure, height, width)
            return self._plans[(height, width)]

    def _measure_later(self, height: int, width: int) -> None:
        """On the device thread, in the background: measured without the lock, which a
        ``MeasureSplit`` meanwhile takes to answer the eager plan."""
        plan = self._measure(height, width)
        with self._lock:
            self._plans.setdefault((height, width), plan)

    def _measure(self, height: int, width: int) -> SplitPlan:
        units = measure_unit_costs(self.adapter, height, width)
        if self.adapter.compiler is None:
            plan = self._with_costs(balanced_plan(self.adapter, units), height, width)
            return self._log((height, width), plan, "eager")
        plan = self._with_costs(compiled_plan(self.adapter, height, width, units), height, width)
        return self._log((height, width), plan, f"compiled, {self.adapter.compile_mode}")

    def _with_costs(self, plan: SplitPlan, height: int, width: int) -> SplitPlan:
        """``plan`` with its cut's costs at batch 1 and 2, from eager per-unit timings (a compiled
        worker's steps cost less: the coordinator refines them from the steps it runs)."""
        split = self.adapter.make_split(plan.cut)
        units_b2 = measure_unit_costs(self.adapter, height, width, batch=2)
        costs = {1: batch_costs(split, plan.unit_seconds), 2: batch_costs(split, units_b2)}
        return replace(plan, costs=costs)

    @staticmethod
    def _log(size: tuple[int, int], plan: SplitPlan, how: str) -> SplitPlan:
        log.info(
            "split at %dx%d (%s): cut %d, stages %.4fs / %.4fs (ratio %.3f)",
            size[1],
            size[0],
            how,
            plan.cut,
            plan.stage1_seconds,
            plan.stage2_seconds,
            plan.ratio,
        )
        return plan


def request_functions(
    split: StageSplit | None, solo: bool, guided: bool, full_cfg: bool, speculative: bool = False
) -> dict[int, list[str]]:
    """The compiled functions a request runs, by batch per image: alone, the forward at batch 1
    (a branch) and, guided, 2 (SINGLE's CFG batch); a pair, its data-parallel steps at batch 1
    and, with a stage cut (``split``: HYBRID, PIPELINE), its window's stages at the window
    policy's batch; ``speculative`` steps (HYBRID) also run a branch through the stages."""
    if solo:
        return {1: ["forward"], 2: ["forward"]} if guided else {1: ["forward"]}
    if split is None:
        return {1: ["forward"]}
    stages = [f"{name}@cut{split.cut}" for name in STAGES[split.topology]]
    if guided and full_cfg:
        return {1: ["forward", *stages], 2: stages} if speculative else {1: ["forward"], 2: stages}
    return {1: ["forward", *stages]}


@torch.no_grad()
def compile_request_shapes(
    adapter: ModelAdapter,
    height: int,
    width: int,
    num_images: int = 1,
    split: StageSplit | None = None,
    solo: bool = False,
    guided: bool = True,
    full_cfg: bool = False,
    speculative: bool = False,
) -> int:
    """With compile on, compile what a request at this size runs (``request_functions``) and is
    not compiled yet, on random inputs. Called before the request's first step (at Begin): no step
    then compiles while its peer waits with a timeout sized for compiled steps. The number of
    graphs compiled."""
    compiler = adapter.compiler
    if compiler is None:
        return 0
    before = compiler.compilations
    scale = adapter.vae_scale_factor
    for per_image, names in request_functions(split, solo, guided, full_cfg, speculative).items():
        shape = (per_image * num_images, height // scale, width // scale)
        if all(compiler.warm((f"{adapter.arch}.{n}", *shape)) for n in names):
            continue
        sample, t, inputs = _request_inputs(adapter, height, width, per_image, num_images)
        if "forward" in names:
            adapter.forward(sample, t, inputs)
        if split is not None and any("@cut" in n for n in names):
            run_stages(split, sample, t, inputs, time.perf_counter)
    return compiler.compilations - before


def prepare_request_shapes(adapter: ModelAdapter, *args, **kwargs) -> None:
    """``compile_request_shapes`` on the device thread: at once (the caller waits), or behind its
    work when the compile cache compiles in the background (the request's calls run eager until
    their shapes are warm)."""
    compiler = adapter.compiler
    if compiler is None:
        return
    if compiler.background and not compiler.device_thread.on_thread():
        compiler.device_thread.background(compile_request_shapes, adapter, *args, **kwargs)
    else:
        on_device(adapter, compile_request_shapes, adapter, *args, **kwargs)


def warm_up(adapter: ModelAdapter, planner: SplitPlanner, height: int, width: int) -> SplitPlan:
    """Compile before the first request what one at ``height`` x ``width`` runs in any mode: the
    balanced plan (its stages measured compiled), then the forward and that cut's stages at a
    branch's batch and the CFG batch; on the device thread."""
    return on_device(adapter, _warm_up, adapter, planner, height, width)


@torch.no_grad()
def _warm_up(adapter: ModelAdapter, planner: SplitPlanner, height: int, width: int) -> SplitPlan:
    plan = planner.plan(height, width)
    split = adapter.make_split(plan.cut)
    compile_request_shapes(adapter, height, width, 1, solo=True)
    compile_request_shapes(adapter, height, width, 1, split, full_cfg=True)
    compile_request_shapes(adapter, height, width, 1, split, full_cfg=False)
    return plan

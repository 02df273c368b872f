"""``hybridiff poolsim``: the allocation policies on pools of many workers, simulated
(docs/design.md sections 4 and 10).

A discrete-event simulation (a heap of events, no ticking) of N workers serving one model under
open-loop Poisson arrivals of AUTO guided requests. Every decision is the service's own code:
``coordinator.allocation.admission`` when a request arrives and again when it reaches the head of
the queue, and, for the adaptive policy, ``coordinator.elastic.ElasticLease.decide`` /
``apply`` (so ``allocation.at_boundary`` and the re-check before a change) at every step
boundary. What the simulator adds is the driver's timing (``coordinator/driver.py``):

- one FIFO admission queue of bounded length (``--queue-per-worker``, 2 per worker by default;
  the service's ``--queue-size``): a full queue rejects at once (``QueueFull``); the head takes
  ``want`` idle workers, or one when ``accept_one``;
- a request that starts (or switches) begins a session: ``switch`` seconds (prompt encoding and
  a control round trip), then its steps back to back;
- an elastic request decides when a step completes, while the steps issued ahead are in flight
  (the driver's ``ELASTIC_LOOKAHEAD``, ``--lookahead``): the change is applied when they have
  completed, if the pool still calls for it (a shrink hands worker C to the head waiter at
  once), then a new session begins; a decision on the last boundary is never applied;
- a step alone is the CFG batch of 2; a step as a pair is the step of the HYBRID replay of
  ``hybridiff_tools.bench.perfmodel`` at that index (a pair that resumes inside the window starts with the
  window's synchronous fill step). The window stays where the nominal schedule puts it;
- the rule sees the costs a warm ``CostBook`` holds: the step alone, the median data-parallel
  step of a pair, and a begin as the switch.

Device costs come from the committed H200 profiles (``gpu_profile.compute_times``) and a "2x-batch
device" built from the SDXL profile with every batch-2 time set to twice batch 1 (b2/b1 = 2.0, as
on the paper's RTX 3090s). Prompt encoding and VAE decoding are not in the profiles: encoding is
``ENCODE_S`` per session, decoding (the same for every policy) is left out.

    hybridiff poolsim --out-dir docs/benchmarks/load
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.admission_queue import AdmissionQueue, Ticket, workers_to_take
from coordinator.allocation import CostBook, Decision, Policy, PolicyCosts, PoolView, admission
from coordinator.driver import ELASTIC_LOOKAHEAD
from coordinator.elastic import ElasticLease
from hybridiff.errors import QueueFull
from hybridiff.protocol import Mode, Phase
from hybridiff_tools.bench import gpu_profile
from hybridiff_tools.bench.perfmodel import ComputeTimes, LinkModel, ScheduleParams, StageTimes, simulate
from hybridiff_tools.pyplot import headless_pyplot

PROFILE_DIR = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
ENCODE_S = 0.005  # prompt encoding of a new session (not profiled: CLIP/T5 at fp16, a few ms on an H200)
STEPS = 50
LOADS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
POLICIES = (Policy.LATENCY, Policy.THROUGHPUT, Policy.ADAPTIVE)
# name -> (profile file, model, batch 2 = 2x batch 1)
DEVICES = {
    "h200-sdxl": ("gpu_profile_h200_fp16_cudagraphs.json", "sdxl", False),
    "h200-sd3": ("gpu_profile_h200_fp16_cudagraphs.json", "sd3", False),
    "2x-batch": ("gpu_profile_h200_fp16_cudagraphs.json", "sdxl", True),
}
MODEL = "m"


# --- device costs -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceCosts:
    """Seconds of one request's pieces on one device: ``single`` a step alone (the CFG batch of 2),
    ``paired[i]`` step i as a pair in the HYBRID schedule, whose pipeline ``window`` is (first,
    last) step (the first is the synchronous fill), ``switch`` the begin of a session."""

    name: str
    single: float
    paired: tuple[float, ...]
    window: tuple[int, int] | None
    switch: float
    description: str = ""

    @property
    def steps(self) -> int:
        return len(self.paired)

    @property
    def alone_latency(self) -> float:
        return self.switch + self.steps * self.single

    @property
    def pair_latency(self) -> float:
        return self.switch + sum(self.paired)

    def pair_step(self, i: int, first: int) -> float:
        """Step ``i`` of a pair whose session began at step ``first``: one that resumes inside the
        window runs the window's fill step first (PIPELINE_FILL: the new pair has no stale state)."""
        w = self.window
        if i == first and w is not None and w[0] < i <= w[1]:
            return self.paired[w[0]]
        return self.paired[i]

    def rule_costs(self) -> PolicyCosts:
        """What the service's ``CostBook`` holds once warm: the median data-parallel step as the
        paired cost (``DiffusionService._learn_costs``), a begin as the switch."""
        w = self.window
        dp = [t for i, t in enumerate(self.paired) if w is None or not w[0] <= i <= w[1]]
        return PolicyCosts(
            single=self.single, paired=statistics.median(dp or self.paired), switch=self.switch
        )


def scaled_to_2x(ct: ComputeTimes) -> ComputeTimes:
    """The same batch-1 times, every batch-2 time twice batch 1 (b2/b1 = 2.0)."""
    s = ct.stages_b1
    b2 = (
        StageTimes.nested(2 * s.pre, 2 * s.stage2, 2 * s.post)
        if ct.topology == "nested"
        else StageTimes(2 * s.stage1, 2 * s.stage2)
    )
    return ComputeTimes(ct.topology, ct.forward_b1, 2 * ct.forward_b1, s, b2, ct.update)


def device_costs(name: str, steps: int = STEPS, profile_dir: Path = PROFILE_DIR) -> DeviceCosts:
    """A device of ``DEVICES`` from its committed profile, through ``gpu_profile``'s own readers."""
    file, model, doubled = DEVICES[name]
    profile = json.loads((profile_dir / file).read_text())
    entry = profile["models"][model]
    ct = gpu_profile.compute_times(entry)
    if doubled:
        ct = scaled_to_2x(ct)
    link = LinkModel(**profile["link"])
    sched = entry["schedule"]
    params = ScheduleParams(
        num_steps=steps,
        tau1=min(sched["tau1"], steps - 1) if steps > 1 else 1,
        k=sched["k"],
        tau1_source=sched["tau1_source"],
        hybrid_window_batch=sched["hybrid_window_batch"],
    )
    phases = params.phases(Mode.HYBRID)
    tb = gpu_profile.tensor_bytes(entry)
    hybrid = simulate(phases, ct, tb, link, params.hybrid_window_batch)
    single = simulate([Phase.SINGLE], ct, tb, link).step_seconds[0]
    what = f"{profile['device']['name']} {model.upper()} 1024x1024 fp16, CUDA graphs ({file})"
    if doubled:
        what = f"2x-batch device: {what} batch-1 times, batch 2 = 2.0 x batch 1"
    return DeviceCosts(
        name=name,
        single=single,
        paired=tuple(hybrid.step_seconds),
        window=params.schedule(Mode.HYBRID).window(),
        switch=ENCODE_S + 2 * link.latency,  # encoding + the control round trip of a begin
        description=what,
    )


# --- the simulator ------------------------------------------------------------------------
class _Worker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


SOLO, PAIR = [_Worker("u")], [_Worker("u"), _Worker("c")]


@dataclass(eq=False)
class Request:
    """One arrival and what happened to it (times in seconds from the start)."""

    index: int
    arrival: float
    start: float | None = None
    done: float | None = None
    rejected: bool = False
    start_workers: int = 0
    workers: int = 0
    shrinks: int = 0
    grows: int = 0
    paired_steps: int = 0
    first: int = 0  # first step of the current session
    intent: Decision | None = None
    intent_at: int = 0  # the step after which the intent is applied (the last one in flight)
    elastic: ElasticLease | None = None

    @property
    def latency(self) -> float:
        return self.done - self.arrival


class _Lease:
    """What ``ElasticLease`` needs of ``coordinator.pool.Lease``, on the simulated pool."""

    __slots__ = ("pool", "model", "req")

    def __init__(self, pool: PoolSim, req: Request) -> None:
        self.pool, self.model, self.req = pool, MODEL, req

    def view(self) -> PoolView:
        return self.pool.view()

    def handles(self) -> list[_Worker]:
        return PAIR if self.req.workers == 2 else SOLO

    def give_back(self, worker_id: str) -> None:
        self.pool.give_back(self.req)

    def take_one(self) -> bool | None:
        return self.pool.take_one(self.req)


ARRIVAL, STEP_DONE, DONE = 0, 1, 2


class PoolSim:
    """N workers, one admission queue, one policy; ``run`` replays a stream of arrival times."""

    def __init__(
        self,
        device: DeviceCosts,
        policy: Policy,
        workers: int,
        queue_capacity: int | None = None,
        lookahead: int = ELASTIC_LOOKAHEAD,
    ) -> None:
        """``lookahead``: how far ahead of the step completing an elastic request's steps are
        issued (the driver's ``ELASTIC_LOOKAHEAD``): a change waits for that many steps."""
        self.device, self.policy, self.workers, self.lookahead = device, policy, workers, lookahead
        self.idle = workers
        self.queue = AdmissionQueue(queue_capacity)  # the pool's own queue, driven by the simulation
        self._waiting: dict[Ticket, Request] = {}
        self.costs = CostBook()
        rule = device.rule_costs()
        for kind in ("single", "paired", "switch"):  # warm, as after the first requests
            self.costs.observe(MODEL, kind, getattr(rule, kind))
        self.events: dict[str, int] = {d.value: 0 for d in (Decision.SHRINK, Decision.GROW)}
        self._heap: list[tuple[float, int, int, Request | None, int]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self._track, self._resolved = sys.maxsize, 0

    # the pool as the service's WorkerPool shows it
    def view(self, model: str = MODEL) -> PoolView:
        return self.queue.view(model, self.idle)

    def give_back(self, req: Request) -> None:
        req.workers -= 1
        self.idle += 1
        self._dispatch()  # the head waiter takes it

    def take_one(self, req: Request) -> bool | None:
        if self.queue.depth or not self.idle:
            return None
        self.idle -= 1
        req.workers += 1
        return True

    def _push(self, t: float, kind: int, req: Request | None, step: int = 0) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, req, step))

    def _dispatch(self) -> None:
        """``WorkerPool.acquire`` for the head, again and again: its width decided again
        (AUTO) from the pool behind it; it takes ``want`` idle workers, or one if ``accept_one``."""
        while (head := self.queue.head(MODEL)) is not None:
            self.queue.readmit(head, self.idle, self._admission)
            take = workers_to_take(head, self.idle)
            if not take:
                return
            self.queue.remove(head)
            self._start(self._waiting.pop(head), take)

    def _admission(self, view: PoolView) -> tuple[int, bool]:
        """An AUTO request's width from the pool as it sees it (as the request runner decides it)."""
        adm = admission(self.policy, Mode.AUTO, True, view, self.costs.costs(MODEL))
        return adm.want, adm.accept_one

    def _start(self, req: Request, take: int) -> None:
        self.idle -= take
        req.start, req.start_workers, req.workers = self.now, take, take
        dev = self.device
        if self.policy != Policy.ADAPTIVE:  # resolved once: HYBRID on a pair, SINGLE alone
            req.paired_steps = dev.steps if take == 2 else 0
            self._push(self.now + (dev.pair_latency if take == 2 else dev.alone_latency), DONE, req)
            return
        req.elastic = ElasticLease(
            _Lease(self, req), self.policy, self.costs, dev.steps, self._count, self.lookahead
        )
        self._push(self.now + dev.switch + self._step_cost(req, 0), STEP_DONE, req, 0)

    def _count(self, decision: Decision) -> None:
        self.events[decision.value] += 1  # hybridiff_elastic_events_total{kind}

    def _step_cost(self, req: Request, i: int) -> float:
        return self.device.single if req.workers == 1 else self.device.pair_step(i, req.first)

    def _step_done(self, req: Request, s: int) -> None:
        """Step ``s`` of an elastic request completed (step s + 1 is in flight unless a change waits)."""
        if req.workers == 2:
            req.paired_steps += 1
        if s == self.device.steps - 1:
            self._finish(req)
            return
        nxt, begin = s + 1, self.now
        used = PAIR if req.workers == 2 else SOLO
        if req.intent is not None and s < req.intent_at:
            pass  # the steps issued before the decision are still in flight
        elif req.intent is not None:  # the steps in flight at the decision are done
            decision, req.intent = req.intent, None
            if req.elastic.apply(decision, used) is not None:
                if decision == Decision.SHRINK:
                    req.shrinks += 1
                else:
                    req.grows += 1
                req.first, begin = nxt, self.now + self.device.switch  # a new session
        else:
            decision = req.elastic.decide(nxt, used)
            if decision != Decision.KEEP:
                req.intent, req.intent_at = decision, s + self.lookahead
        self._push(begin + self._step_cost(req, nxt), STEP_DONE, req, nxt)

    def _finish(self, req: Request) -> None:
        req.done = self.now
        self.idle += req.workers
        req.workers = 0
        self._resolved += req.index < self._track
        self._dispatch()

    def run(self, arrivals: Iterable[float], track: int | None = None) -> list[Request]:
        """Serve ``arrivals`` (increasing times) until the first ``track`` of them (all, if None)
        completed or were rejected; returns those requests in arrival order."""
        source: Iterator[float] = iter(arrivals)
        tracked: list[Request] = []
        self._track = sys.maxsize if track is None else track
        self._resolved = 0
        for index in itertools.count():  # one arrival at a time waits in the heap
            t = next(source, None)
            if t is not None:
                self._push(t, ARRIVAL, Request(index, t))
            if not self._serve_until_arrival(tracked):
                return tracked
        return tracked  # not reached: the count is endless

    def _serve_until_arrival(self, tracked: list[Request]) -> bool:
        """Process events up to and including the next arrival (True), or until nothing is left to
        do or every tracked request is resolved (False)."""
        while self._heap and self._resolved < self._track:
            self.now, _, kind, req, step = heapq.heappop(self._heap)
            if kind == STEP_DONE:
                self._step_done(req, step)
            elif kind == DONE:
                self._finish(req)
            else:
                self._arrive(req, tracked)
                return True
        return False

    def _arrive(self, req: Request, tracked: list[Request]) -> None:
        if req.index < self._track:
            tracked.append(req)
        want, accept_one = self._admission(self.view())  # decided on arrival, and again at the head
        try:
            ticket = self.queue.enqueue(MODEL, want, accept_one)
        except QueueFull:
            req.rejected = True  # at once
            self._resolved += req.index < self._track
            return
        self._waiting[ticket] = req
        self._dispatch()


def poisson(rate: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


# --- one load point -------------------------------------------------------------------------
def summarize(requests: list[Request], warmup: int, slo: float, steps: int) -> dict[str, Any]:
    """Statistics of the arrivals after ``warmup``: latency percentiles (completed requests),
    throughput (completions of any request between the first and last measured arrival), SLO
    attainment (completed within ``slo`` over all measured arrivals, rejections count as misses)."""
    measured = requests[warmup:]
    done = [r for r in measured if not r.rejected]
    lat = sorted(r.latency for r in done)
    t0, t1 = measured[0].arrival, measured[-1].arrival
    completions = sum(1 for r in requests if r.done is not None and t0 <= r.done <= t1)
    n = len(measured)
    if len(lat) < 2:
        raise ValueError(f"{len(lat)} of {n} measured requests completed: too few for statistics")
    return {
        "arrivals": n,
        "completed": len(done),
        "rejected": n - len(done),
        "p50_s": statistics.median(lat),
        "p95_s": statistics.quantiles(lat, n=100, method="inclusive")[94],
        "mean_s": statistics.fmean(lat),
        "queued_mean_s": statistics.fmean(r.start - r.arrival for r in done),
        "throughput_rps": completions / (t1 - t0) if t1 > t0 else 0.0,
        "slo_attainment": sum(1 for x in lat if x <= slo) / n,
        "started_paired": sum(r.start_workers == 2 for r in done) / len(done),
        "paired_step_fraction": sum(r.paired_steps for r in done) / (len(done) * steps),
        "shrinks_per_request": sum(r.shrinks for r in done) / len(done),
        "grows_per_request": sum(r.grows for r in done) / len(done),
        "requests_shrunk": sum(r.shrinks > 0 for r in done) / len(done),
        "requests_grown": sum(r.grows > 0 for r in done) / len(done),
    }


def load_point(
    device: DeviceCosts,
    policy: Policy,
    workers: int,
    fraction: float,
    requests: int,
    warmup: int,
    seed: int | str,
    queue_capacity: int | None,
    slo: float,
    lookahead: int = ELASTIC_LOOKAHEAD,
) -> dict[str, Any]:
    """One point: Poisson arrivals at ``fraction`` of the throughput policy's capacity."""
    capacity = workers / device.alone_latency
    rate = fraction * capacity
    sim = PoolSim(device, policy, workers, queue_capacity, lookahead)
    reqs = sim.run(poisson(rate, random.Random(seed)), track=warmup + requests)
    return {"load_fraction": fraction, "offered_rps": rate} | summarize(reqs, warmup, slo, device.steps)


# --- the sweep ------------------------------------------------------------------------------
def compare(policies: dict[str, list[dict[str, Any]]], tolerance: float = 0.05) -> list[dict[str, Any]]:
    """Per load: adaptive's mean and p95 over the better static policy's. Verdict: "beats both"
    (ratio < 0.99), "within" (ratio <= 1 + ``tolerance``) or "worse"."""
    rows = []
    for i, point in enumerate(policies["adaptive"]):
        row: dict[str, Any] = {"load_fraction": point["load_fraction"]}
        for stat in ("mean_s", "p95_s"):
            best = min(("latency", "throughput"), key=lambda p: policies[p][i][stat])
            ratio = point[stat] / policies[best][i][stat]
            verdict = "beats both" if ratio < 0.99 else "within" if ratio <= 1 + tolerance else "worse"
            row[stat] = {"best_static": best, "ratio": ratio, "verdict": verdict}
        rows.append(row)
    return rows


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema": "hybridiff.poolsim/1",
        "settings": {
            "steps": args.steps,
            "requests": args.requests,
            "warmup": args.warmup,
            "seed": args.seed,
            "loads": args.loads,
            "queue_per_worker": args.queue_per_worker,
            "slo_factor": args.slo_factor,
            "slo": "slo_factor x the latency of one request alone on one worker (alone_latency_s)",
            "encode_s": ENCODE_S,
            "lookahead": args.lookahead,
            "arrivals": "Poisson; the same arrival times for every policy at a load point",
        },
        "devices": {},
    }
    for name in args.devices:
        dev = device_costs(name, args.steps)
        slo = args.slo_factor * dev.alone_latency
        rec: dict[str, Any] = {
            "description": dev.description,
            "single_step_s": dev.single,
            "pair_step_mean_s": (dev.pair_latency - dev.switch) / dev.steps,
            "switch_s": dev.switch,
            "alone_latency_s": dev.alone_latency,
            "pair_latency_s": dev.pair_latency,
            "slo_s": slo,
            "rule_costs": vars(dev.rule_costs()),
            "pools": {},
        }
        for workers in args.pool_sizes:
            pool: dict[str, Any] = {
                "workers": workers,
                "capacity_rps": workers / dev.alone_latency,
                "queue_capacity": args.queue_per_worker * workers or None,  # None: unbounded
                "policies": {},
            }
            for policy in POLICIES:
                pool["policies"][policy.value] = [
                    load_point(
                        dev,
                        policy,
                        workers,
                        fraction,
                        args.requests,
                        args.warmup,
                        f"{args.seed}/{name}/{workers}/{fraction}",  # one stream for every policy
                        pool["queue_capacity"],
                        slo,
                        args.lookahead,
                    )
                    for fraction in args.loads
                ]
            pool["adaptive_vs_static"] = compare(pool["policies"])
            rec["pools"][str(workers)] = pool
        result["devices"][name] = rec
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Rows: devices; per pool size, p95 latency and SLO attainment against offered load."""
    plt = headless_pyplot()
    devices = result["devices"]
    sizes = list(next(iter(devices.values()))["pools"])
    fig, axes = plt.subplots(
        len(devices), 2 * len(sizes), figsize=(4.2 * 2 * len(sizes), 3.2 * len(devices)), squeeze=False
    )
    for row, (name, dev) in zip(axes, devices.items()):
        for j, size in enumerate(sizes):
            pool = dev["pools"][size]
            lat_ax, slo_ax = row[2 * j], row[2 * j + 1]
            for policy, points in pool["policies"].items():
                x = [p["load_fraction"] * 100 for p in points]
                lat_ax.plot(x, [p["p95_s"] for p in points], marker="o", ms=3, label=policy)
                slo_ax.plot(x, [p["slo_attainment"] * 100 for p in points], marker="o", ms=3, label=policy)
            lat_ax.axhline(dev["slo_s"], color="gray", ls="--", lw=0.8, label="SLO")
            lat_ax.set_title(f"{name}, {size} workers: p95 latency", fontsize=9)
            slo_ax.set_title(f"{name}, {size} workers: SLO {dev['slo_s']:.2f} s met", fontsize=9)
            lat_ax.set_ylabel("s")
            slo_ax.set_ylabel("%")
            slo_ax.set_ylim(-2, 102)
            for ax in (lat_ax, slo_ax):
                ax.set_xlabel("offered load (% of throughput capacity)", fontsize=8)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(
        f"poolsim: Poisson AUTO guided requests, {s['steps']} steps, {s['requests']} measured per point; "
        f"SLO = {s['slo_factor']:g} x one request alone"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(result: dict[str, Any]) -> str:
    lines = []
    for name, dev in result["devices"].items():
        lines.append(
            f"{name}: alone {dev['alone_latency_s']:.3f} s, pair {dev['pair_latency_s']:.3f} s, "
            f"SLO {dev['slo_s']:.2f} s"
        )
        for size, pool in dev["pools"].items():
            lines.append(f"  {size} workers (capacity {pool['capacity_rps']:.2f} req/s)")
            for i, load in enumerate(result["settings"]["loads"]):
                cells = []
                for policy, points in pool["policies"].items():
                    p = points[i]
                    cells.append(
                        f"{policy[:3]} p95 {p['p95_s']:6.2f} mean {p['mean_s']:5.2f} "
                        f"SLO {p['slo_attainment'] * 100:3.0f}%"
                    )
                cmp = pool["adaptive_vs_static"][i]
                lines.append(
                    f"    {load * 100:4.0f}%  " + " | ".join(cells) + f" | ada/best mean "
                    f"{cmp['mean_s']['ratio']:.2f} p95 {cmp['p95_s']['ratio']:.2f}"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff poolsim", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks/load"))
    p.add_argument("--requests", type=int, default=2000, help="measured arrivals per load point")
    p.add_argument("--warmup", type=int, default=400, help="arrivals simulated first and not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", nargs="+", choices=sorted(DEVICES), default=list(DEVICES))
    p.add_argument("--pool-sizes", nargs="+", type=int, default=[8, 64])
    p.add_argument(
        "--loads", nargs="+", type=float, default=list(LOADS), help="fractions of the throughput capacity"
    )
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument(
        "--queue-per-worker",
        type=int,
        default=2,
        help="admission queue length per worker; a full queue rejects (0: unbounded)",
    )
    p.add_argument("--slo-factor", type=float, default=2.0, help="SLO = this x one request alone")
    p.add_argument(
        "--lookahead",
        type=int,
        default=ELASTIC_LOOKAHEAD,
        help="steps an elastic request issues ahead of the one completing (a change waits for them)",
    )
    args = p.parse_args(argv)
    if args.requests < 2 or args.warmup < 0 or args.steps < 2 or args.queue_per_worker < 0:
        p.error("--requests >= 2, --warmup >= 0, --steps >= 2, --queue-per-worker >= 0")
    if any(n < 2 for n in args.pool_sizes) or any(f <= 0 for f in args.loads) or args.lookahead < 1:
        p.error("--pool-sizes must be >= 2, --loads > 0 and --lookahead >= 1")
    args.loads = sorted(args.loads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = sweep(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "poolsim.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out_dir / "poolsim.png")
    print(_summary(result))
    print(f"wrote {args.out_dir}/poolsim.json and poolsim.png in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

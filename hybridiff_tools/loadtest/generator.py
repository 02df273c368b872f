"""A bounded load generator over the public gRPC API (``hybridiff loadtest``).

Open loop (``rate``): Poisson arrivals, each request on its own thread with its own deadline, so a
slow service does not slow the arrivals down. Closed loop (``concurrency``): that many clients,
each sending its next request when the last one ends. Requests issued during ``warmup`` seconds
are run but not counted. The run ends by itself: no request starts after ``duration`` seconds,
at most ``max_requests`` start, and every request has a deadline.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from hybridiff.client import DiffusionClient
from hybridiff.errors import HybridiffError
from hybridiff.protocol import Mode, label
from hybridiff.v1 import diffusion_pb2 as pb


class LoadConfigError(ValueError):
    """A load test asked for something impossible (a rate of 0, a negative duration...)."""


@dataclass(frozen=True)
class LoadConfig:
    rate: float | None = None  # requests per second (open loop, Poisson arrivals)
    concurrency: int | None = None  # clients (closed loop)
    duration: float = 60.0  # seconds during which requests start (warm-up included)
    warmup: float = 0.0  # seconds at the start whose requests are not counted
    steps: int = 10
    width: int | None = None
    height: int | None = None
    mode: Mode = Mode.AUTO
    prompt: str = "a red circle on the left"
    seed_base: int = 0
    slo: float = 10.0  # seconds
    timeout: float = 300.0  # each request's deadline
    max_requests: int = 10_000
    arrival_seed: int = 0

    def check(self) -> LoadConfig:
        if (self.rate is None) == (self.concurrency is None):
            raise LoadConfigError("give exactly one of --rate (open loop) and --concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise LoadConfigError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadConfigError(f"--concurrency must be >= 1, got {self.concurrency}")
        if not self.duration > 0:
            raise LoadConfigError(f"--duration must be > 0 s, got {self.duration}")
        if not 0 <= self.warmup < self.duration:
            raise LoadConfigError(f"--warmup must be in [0, duration), got {self.warmup}")
        if self.steps < 1 or self.slo <= 0 or self.timeout <= 0 or self.max_requests < 1:
            raise LoadConfigError("--steps, --slo, --timeout and the request cap must be positive")
        return self


@dataclass
class RequestRecord:
    index: int
    sent_at: float  # seconds since the start of the run
    latency_s: float
    code: str  # gRPC status name
    warmup: bool
    queue_s: float | None = None
    mode_used: str = ""
    workers: list[str] = field(default_factory=list)
    elastic: list[str] = field(default_factory=list)  # the run's shrink / grow notes
    # Where the request's denoising went, summed over its steps (each step's slowest worker):
    # compute, control (between the coordinator and the workers) and the workers' waits for
    # their next command; None for a failed request.
    denoising_s: float | None = None
    compute_s: float | None = None
    control_s: float | None = None
    command_wait_s: float | None = None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], config: LoadConfig, wall: float) -> dict:
    """Latency percentiles of the completed requests, throughput over the measured window, SLO
    attainment over every counted request (a failure misses the SLO), errors by code."""
    counted = [r for r in records if not r.warmup]
    ok = [r.latency_s for r in counted if r.code == "OK"]
    window = max(1e-9, wall - config.warmup)
    return {
        "requests": len(counted),
        "completed": len(ok),
        "p50_s": percentile(ok, 0.50),
        "p95_s": percentile(ok, 0.95),
        "p99_s": percentile(ok, 0.99),
        "mean_s": statistics.fmean(ok) if ok else float("nan"),
        "throughput_rps": len(ok) / window,
        "offered_rps": config.rate if config.rate is not None else len(counted) / window,
        "slo_s": config.slo,
        "slo_attainment": sum(latency <= config.slo for latency in ok) / len(counted)
        if counted
        else float("nan"),
        "errors": dict(Counter(r.code for r in counted if r.code != "OK")),
        "elastic_events": dict(Counter(n.split(" ", 1)[0] for r in counted for n in r.elastic)),
        # completed requests by how they ran: on a pair throughout, alone throughout, or switched
        "ran": dict(
            Counter(
                "switched" if r.elastic else {1: "alone", 2: "paired"}.get(len(r.workers), "unknown")
                for r in counted
                if r.code == "OK"
            )
        ),
        **{
            f"mean_{name}": _mean(getattr(r, name) for r in counted if r.code == "OK")
            for name in ("queue_s", "denoising_s", "compute_s", "control_s", "command_wait_s")
        },
    }


def _mean(values) -> float:
    """The mean of the values that are known (nan when none is)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else float("nan")


class LoadTest:
    def __init__(
        self,
        client: DiffusionClient,
        config: LoadConfig,
        on_done: Callable[[RequestRecord], None] | None = None,
    ):
        self.client, self.config, self.on_done = client, config.check(), on_done
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._count = 0

    def _request(self, index: int) -> pb.GenerateRequest:
        c = self.config
        req = pb.GenerateRequest(
            prompt=c.prompt, num_inference_steps=c.steps, seed=c.seed_base + index, mode=c.mode
        )
        if c.width:
            req.width = c.width
        if c.height:
            req.height = c.height
        return req

    def _one(self, index: int, start: float) -> None:
        sent = time.perf_counter()
        record = RequestRecord(index, sent - start, 0.0, "OK", warmup=sent - start < self.config.warmup)
        try:
            resp = self.client.generate_request(self._request(index), timeout=self.config.timeout)
            record.queue_s = resp.stats.queued_seconds
            record.mode_used = label(Mode(resp.stats.mode_used))
            record.workers = list(resp.stats.workers)
            record.elastic = [n for n in resp.stats.notes if n.startswith(("shrink", "grow"))]
            if hasattr(resp.stats, "steps"):  # the gRPC API's stats (the HTTP API's carry no steps)
                self._timings(record, resp.stats)
        except HybridiffError as exc:
            record.code = exc.code.name
        record.latency_s = time.perf_counter() - sent
        with self._lock:
            self.records.append(record)
        if self.on_done:
            self.on_done(record)

    @staticmethod
    def _timings(record: RequestRecord, stats: pb.GenerateStats) -> None:
        steps = stats.steps
        record.denoising_s = stats.denoising_seconds
        record.compute_s = sum(s.critical_compute_seconds for s in steps)
        record.control_s = sum(s.control_seconds for s in steps)
        record.command_wait_s = sum(
            max((w.command_wait_seconds for w in s.workers), default=0.0) for s in steps
        )

    def _next_index(self) -> int | None:
        with self._lock:
            if self._count >= self.config.max_requests:
                return None
            self._count += 1
            return self._count - 1

    def run(self) -> dict:
        """Drive the load; the summary (records in ``self.records``)."""
        c, start = self.config, time.perf_counter()
        threads: list[threading.Thread] = []
        if c.rate is not None:
            rng = random.Random(c.arrival_seed)
            at = 0.0
            while True:
                at += rng.expovariate(c.rate)
                if at >= c.duration or (index := self._next_index()) is None:
                    break
                time.sleep(max(0.0, start + at - time.perf_counter()))
                threads.append(threading.Thread(target=self._one, args=(index, start), daemon=True))
                threads[-1].start()
        else:

            def client_loop() -> None:
                while time.perf_counter() - start < c.duration and (index := self._next_index()) is not None:
                    self._one(index, start)

            threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(c.concurrency)]
            for t in threads:
                t.start()
        for t in threads:
            t.join(c.timeout + c.duration + 30)
        wall = time.perf_counter() - start
        self.records.sort(key=lambda r: r.index)
        return summarize(self.records, c, wall)

    def report(self, summary: dict) -> dict:
        return {
            "config": {**asdict(self.config), "mode": label(self.config.mode)},
            "summary": summary,
            "requests": [asdict(r) for r in self.records],
        }

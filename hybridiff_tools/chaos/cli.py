"""``hybridiff chaos``: a load test (hybridiff_tools/loadtest) against a local cluster of several workers and
two coordinators while a fault injector kills (-9) and restarts, stops (SIGSTOP) and resumes,
and partitions random workers and one coordinator; every request is seeded and its image
checked against the fault-free image of its seed, computed before the faults begin.

Topology: each worker's control port and each coordinator's public port sit behind a TCP
forwarder (``hybridiff_tools.chaos.forwarder``), so a partition cuts a process off without killing it, and
a restarted worker (new ports) is reached at the same address. Half the requests start on each
coordinator, through a client given both (``hybridiff.client`` retries a request that failed
with UNAVAILABLE on the other).
Only coordinator 1 is faulted; coordinator 0 is the survivor the clients fail over to.

The report: requests sent, completed, failed by code, lost (failed before their deadline, or
with a code a retry cannot cure), images differing, p50/p99 latency, and each fault with its
recovery time (until every coordinator sees the worker serving again, or the coordinator
answers health SERVING again). JSON with ``--json``; a one-screen summary on stdout. Exit 1 when
a request was lost or an image differed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, labels, parse
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_tools.chaos.forwarder import TcpForwarder
from hybridiff_tools.loadtest.generator import LoadConfig, LoadTest, percentile

FAULTS = ("kill", "stop", "partition")
SERVING = ("idle", "busy", "elsewhere", "aborting")
RETRYABLE_AT_DEADLINE = ("DEADLINE_EXCEEDED", "UNAVAILABLE")


@dataclass
class Fault:
    kind: str  # kill | stop | partition
    target: str  # worker2, coordinator1
    started_s: float  # since the load began
    healed_s: float = 0.0  # restarted, resumed or healed
    recovered_s: float | None = None  # serving again (None: not within the bound)

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_s is None else self.recovered_s - self.healed_s


def digest(response: pb.GenerateResponse) -> str:
    return hashlib.sha256(b"".join(i.data for i in response.images)).hexdigest()


class SeededLoad(LoadTest):
    """The load test with seeds drawn from a small set (each has its fault-free image) and a
    request id per request; the response's image digest is kept per request."""

    def __init__(self, client, config: LoadConfig, seeds: int) -> None:
        self.seeds = seeds
        self.digests: dict[int, str] = {}
        super().__init__(_Recording(client, self), config)

    def _request(self, index: int) -> pb.GenerateRequest:
        request = super()._request(index)
        request.seed = index % self.seeds
        request.request_id = f"chaos-{index}"
        return request


class _Recording:
    """Clients that keep each response's image digest by its request's index; request i goes
    through client i mod n (one per coordinator, each failing over to the others)."""

    def __init__(self, clients: list[DiffusionClient], load: SeededLoad) -> None:
        self.clients, self.load = clients, load

    def generate_request(self, request, timeout=None, on_progress=None):
        index = int(request.request_id.split("-")[1])
        client = self.clients[index % len(self.clients)]
        response = client.generate_request(request, timeout=timeout, on_progress=on_progress)
        self.load.digests[index] = digest(response)
        return response


class Chaos:
    """The cluster, its forwarders, and the fault injector."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        from hybridiff_launch.local_cluster import LocalCluster  # deferred: the roles' imports are heavy

        self.args = args
        self.rng = random.Random(args.seed)
        self.worker_fronts: dict[int, TcpForwarder] = {}
        self.cluster = LocalCluster(
            args.model,
            workers=args.workers,
            coordinators=2,
            log_dir=log_dir,
            queue_size=64,
            worker_route=self._route,
            verbose=True,
        )
        self.coordinator_fronts: list[TcpForwarder] = []
        self.faults: list[Fault] = []
        self.stop = threading.Event()
        self.t0 = 0.0

    def _route(self, i: int, control: str) -> str:
        host, port = control.rsplit(":", 1)
        if i not in self.worker_fronts:
            self.worker_fronts[i] = TcpForwarder((host, int(port))).start()
        return self.worker_fronts[i].host_port

    def start(self) -> None:
        self.cluster.start(timeout=600)
        self.coordinator_fronts = [TcpForwarder(("127.0.0.1", port)).start() for port in self.cluster.ports]

    @property
    def targets(self) -> list[str]:
        return [f.host_port for f in self.coordinator_fronts]

    def close(self) -> None:
        for f in [*self.worker_fronts.values(), *self.coordinator_fronts]:
            f.close()
        for proc in self.cluster.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        self.cluster.stop()

    # --- observing -----------------------------------------------------------------------
    def _worker_serving(self, i: int) -> bool:
        """Every coordinator sees worker i serving (asked at its own port, not its front)."""
        address = self.worker_fronts[i].host_port
        for port in self.cluster.ports:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    status = diffusion_pb2_grpc.DiffusionServiceStub(channel).ClusterStatus(
                        pb.ClusterStatusRequest(), timeout=2
                    )
            except grpc.RpcError:
                return False
            if not any(w.address == address and w.state in SERVING for w in status.workers):
                return False
        return True

    def _coordinator_serving(self, i: int) -> bool:
        try:
            with grpc.insecure_channel(self.coordinator_fronts[i].host_port) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="hybridiff.v1.DiffusionService"), timeout=2
                )
            return status.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _await_recovery(self, fault: Fault, serving) -> None:
        deadline = time.monotonic() + self.args.recovery_bound
        while time.monotonic() < deadline:
            if serving():
                fault.recovered_s = time.monotonic() - self.t0
                return
            time.sleep(0.2)

    # --- faults ---------------------------------------------------------------------------
    def inject(self, until: float) -> None:
        """Faults one at a time, each held ``--hold`` seconds (random within), until ``until``."""
        while not self.stop.is_set():
            if self.stop.wait(self.rng.uniform(0.5, 1.5) * self.args.fault_interval):
                return
            if time.monotonic() >= until:
                return
            on_coordinator = self.rng.random() < self.args.coordinator_share
            kind = self.rng.choice(FAULTS)
            hold = self.rng.uniform(0.5, 1.5) * self.args.hold
            if on_coordinator:
                self._fault_coordinator(kind, hold)
            else:
                self._fault_worker(self.rng.randrange(self.args.workers), kind, hold)

    def _fault_worker(self, i: int, kind: str, hold: float) -> None:
        fault = Fault(kind, f"worker{i}", time.monotonic() - self.t0)
        self.faults.append(fault)
        proc = self.cluster.worker_procs[i]
        front = self.worker_fronts[i]
        print(f"[{fault.started_s:6.1f}s] {kind} worker{i} for {hold:.1f}s", flush=True)
        if kind == "kill":
            proc.kill()
            proc.wait()
            time.sleep(hold)
            ready = self.cluster.spawn_worker(i)
            ports = self.cluster.await_worker(ready, timeout=300)
            host, port = ports["control"].rsplit(":", 1)
            front.retarget((host, int(port)))
        elif kind == "stop":
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(hold)
            os.kill(proc.pid, signal.SIGCONT)
        else:
            front.blackhole()
            time.sleep(hold)
            front.heal()
        fault.healed_s = time.monotonic() - self.t0
        self._await_recovery(fault, lambda: self._worker_serving(i))

    def _fault_coordinator(self, kind: str, hold: float, i: int = 1) -> None:
        fault = Fault(kind, f"coordinator{i}", time.monotonic() - self.t0)
        self.faults.append(fault)
        proc = self.cluster.coordinator_procs[i]
        print(f"[{fault.started_s:6.1f}s] {kind} coordinator{i} for {hold:.1f}s", flush=True)
        if kind == "kill":
            proc.kill()
            proc.wait()
            time.sleep(hold)
            self.cluster.start_coordinator(i, timeout=120)
        elif kind == "stop":
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(hold)
            os.kill(proc.pid, signal.SIGCONT)
        else:
            self.coordinator_fronts[i].blackhole()
            time.sleep(hold)
            self.coordinator_fronts[i].heal()
        fault.healed_s = time.monotonic() - self.t0
        self._await_recovery(fault, lambda: self._coordinator_serving(i))


def fault_free(targets: str, config: LoadConfig, seeds: int) -> dict[int, str]:
    """The image digest of every seed, one request at a time on an undisturbed cluster."""
    probe = SeededLoad(None, config, seeds)
    with DiffusionClient(targets) as client:
        return {
            seed: digest(client.generate_request(probe._request(seed), timeout=config.timeout))
            for seed in range(seeds)
        }


def report(load: SeededLoad, chaos: Chaos, expected: dict[int, str], wall: float, timeout: float) -> dict:
    records = load.records
    ok = [r for r in records if r.code == "OK"]
    failed: dict[str, int] = {}
    for r in records:
        if r.code != "OK":
            failed[r.code] = failed.get(r.code, 0) + 1
    lost = [
        r.index
        for r in records
        if r.code != "OK" and not (r.code in RETRYABLE_AT_DEADLINE and r.latency_s >= timeout - 1.0)
    ]
    differing = [r.index for r in ok if load.digests.get(r.index) != expected[r.index % load.seeds]]
    latencies = [r.latency_s for r in ok]
    faults = [asdict(f) | {"recovery_s": f.recovery_s} for f in chaos.faults]
    by_kind: dict[str, list[float]] = {}
    for f in chaos.faults:
        if f.recovery_s is not None:
            by_kind.setdefault(f"{f.kind} {f.target.rstrip('0123456789')}", []).append(f.recovery_s)
    return {
        "config": {k: v for k, v in vars(chaos.args).items() if k != "func"},
        "wall_s": wall,
        "sent": len(records),
        "completed": len(ok),
        "failed": failed,
        "lost": lost,
        "images_differing": differing,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "max_s": max(latencies, default=float("nan")),
        "faults": faults,
        "recovery_s": {
            k: {"count": len(v), "median": percentile(v, 0.5), "max": max(v)} for k, v in by_kind.items()
        },
        "unrecovered": [f"{f.kind} {f.target}" for f in chaos.faults if f.recovered_s is None],
    }


def summary_text(r: dict) -> str:
    c = r["config"]
    lines = [
        f"hybridiff chaos: {c['workers']} workers, 2 coordinators, {c['duration']:g} s of load "
        f"({c['concurrency']} clients, {c['mode']}, {c['steps']} steps), {len(r['faults'])} faults",
        f"requests: {r['sent']} sent, {r['completed']} completed, failed {r['failed'] or 'none'}, "
        f"lost {len(r['lost'])}, images differing {len(r['images_differing'])}",
        f"latency: p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, max {r['max_s']:.2f} s",
        "recovery (healed -> serving again):",
    ]
    for kind, s in sorted(r["recovery_s"].items()):
        lines.append(f"  {kind:22s} x{s['count']:<3d} median {s['median']:.1f} s, max {s['max']:.1f} s")
    if r["unrecovered"]:
        lines.append(f"not recovered within the bound: {', '.join(r['unrecovered'])}")
    lines.append("PASS" if not r["lost"] and not r["images_differing"] else "FAIL")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: a tiny random SDXL, made here)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load under faults")
    p.add_argument("--concurrency", type=int, default=6, help="closed-loop clients")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mode", choices=labels(Mode), default="cfg-parallel")
    p.add_argument("--seeds", type=int, default=6, help="distinct seeds (each with its fault-free image)")
    p.add_argument("--timeout", type=float, default=120.0, help="each request's deadline (s)")
    p.add_argument("--fault-interval", type=float, default=10.0, help="mean seconds between faults")
    p.add_argument("--hold", type=float, default=4.0, help="mean seconds a fault lasts")
    p.add_argument("--coordinator-share", type=float, default=0.3, help="share of faults on coordinator 1")
    p.add_argument("--recovery-bound", type=float, default=90.0, help="seconds to wait for a recovery")
    p.add_argument("--seed", type=int, default=0, help="the fault injector's random seed")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--log-dir", default=None, help="the processes' logs (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("workers", "concurrency", "steps", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("duration", "timeout", "fault_interval", "hold", "recovery_bound"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.workers < 2:
        p.error("--workers must be at least 2 (pairs, and a spare while one is faulted)")
    if not 0 <= args.coordinator_share <= 1:
        p.error("--coordinator-share must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hybridiff-chaos-"))
    if args.model is None:
        from hybridiff_launch.tiny_model import write_tiny_model  # deferred: torch and diffusers, slow

        args.model = str(write_tiny_model("sdxl", work / "model"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    config = LoadConfig(
        concurrency=args.concurrency,
        duration=args.duration,
        steps=args.steps,
        mode=parse(Mode, args.mode),
        timeout=args.timeout,
    )
    chaos = Chaos(args, log_dir)
    try:
        chaos.start()
        targets = ",".join(chaos.targets)
        expected = fault_free(targets, config, args.seeds)
        print(f"fault-free images of {args.seeds} seeds computed; load with faults for {args.duration:g} s")
        # The load starts on both coordinators, half on each (each client fails over to the other).
        with DiffusionClient(chaos.targets) as first, DiffusionClient(chaos.targets[::-1]) as second:
            load = SeededLoad([first, second], config, args.seeds)
            chaos.t0 = time.monotonic()
            injector = threading.Thread(
                target=chaos.inject, args=(chaos.t0 + args.duration,), name="faults", daemon=True
            )
            injector.start()
            load.run()
            wall = time.monotonic() - chaos.t0
            chaos.stop.set()
            injector.join(args.recovery_bound + 600)
        result = report(load, chaos, expected, wall, args.timeout)
    finally:
        chaos.stop.set()
        chaos.close()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(summary_text(result))
    print(f"logs: {log_dir}", file=sys.stderr)
    return 0 if not result["lost"] and not result["images_differing"] else 1


if __name__ == "__main__":
    sys.exit(main())

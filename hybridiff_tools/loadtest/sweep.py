"""``hybridiff load-sweep``: latency and SLO attainment against offered load, for each allocation
policy, on a local cluster (docs/design.md section 4, "Under load").

For each policy and load point a fresh local cluster (each worker pinned to its own cores, as on
the benchmark) serves open-loop Poisson load at a fraction of the ``throughput`` policy's
capacity, which is measured first: workers / the latency of one request alone on one worker.
The same arrival seeds are used for every policy, so the policies see the same request stream.

Closed loop (``--concurrency C [C ...]``): one point per concurrency instead, C clients each
sending its next request when the last one ended (no capacity to measure first); the points of
each policy alternate with the other policies' (C1 of every policy, then C2 ...), so a drift of
the machine does not land on one policy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, label
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_tools.bench.runner import bench_model_dir
from hybridiff_tools.loadtest.generator import LoadConfig, LoadTest
from hybridiff_tools.loadtest.plots import plot_sweep

POLICIES = ("latency", "throughput", "adaptive")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff load-sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="model to serve (default: the SDXL-shaped bench model)")
    p.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    p.add_argument("--size", type=int, default=256, help="image width and height")
    p.add_argument(
        "--loads",
        type=float,
        nargs="+",
        default=[0.1, 0.4, 0.7, 1.0, 1.2],
        help="offered loads as fractions of the throughput policy's capacity",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="closed loop instead: one point per concurrency (clients, one request at a time each)",
    )
    p.add_argument(
        "--slo-seconds",
        type=float,
        default=10.0,
        help="closed loop: the latency objective in seconds (no capacity is measured for it)",
    )
    p.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals per load point")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument(
        "--slo-factor",
        type=float,
        default=2.0,
        help="the SLO: this many times the latency of one request alone on one worker",
    )
    p.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks/load"))
    args = p.parse_args(argv)
    if args.duration <= 0 or any(f <= 0 for f in args.loads) or args.workers < 2 or args.steps < 1:
        p.error("--duration and --loads must be > 0, --workers >= 2, --steps >= 1")
    if args.concurrency is not None and (min(args.concurrency) < 1 or not args.slo_seconds > 0):
        p.error("--concurrency must be >= 1 and --slo-seconds > 0")
    return args


def _probe_request(args: argparse.Namespace, mode: Mode) -> pb.GenerateRequest:
    """The request a point's cluster is measured and warmed with, alone."""
    return pb.GenerateRequest(
        prompt="a red circle on the left",
        num_inference_steps=args.steps,
        seed=1,
        width=args.size,
        height=args.size,
        mode=mode,
    )


def _alone_latency(client: DiffusionClient, args: argparse.Namespace, mode: Mode, repeats: int = 3) -> float:
    request = _probe_request(args, mode)
    client.generate_request(request)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.generate_request(request)
        times.append(time.perf_counter() - start)
    return statistics.median(times) if times else 0.0


# Each point's cluster first runs one request alone, one paired and one AUTO: the step costs its
# policy weighs are known, and AUTO's once-per-size measurement of the stage cut is behind it.
WARM_UP_MODES = (Mode.SINGLE, Mode.CFG_PARALLEL, Mode.AUTO)


def _warm_up(client: DiffusionClient, args: argparse.Namespace, mode: Mode) -> dict:
    """One request in ``mode`` on the idle cluster: its latency, its mode and its median step."""
    request = _probe_request(args, mode)
    start = time.perf_counter()
    response = client.generate_request(request)
    steps = [s.wall_seconds for s in response.stats.steps[1:]] or [0.0]
    return {
        "latency_s": time.perf_counter() - start,
        "mode_used": label(Mode(response.stats.mode_used)),
        "median_step_s": statistics.median(steps),
    }


def _point(
    policy: str,
    model_dir: str,
    args: argparse.Namespace,
    i: int,
    fraction: float,
    capacity: float,
    slo: float,
) -> dict:
    """One open-loop load point (Poisson arrivals at ``fraction`` of ``capacity``)."""
    load = {"rate": fraction * capacity, "arrival_seed": i}
    summary = _run_point(policy, model_dir, args, i, f"{policy}-{int(fraction * 100)}", load, slo)
    summary["load_fraction"] = fraction
    return summary


def _run_point(
    policy: str, model_dir: str, args: argparse.Namespace, i: int, name: str, load: dict, slo: float
) -> dict:
    """One point on a fresh cluster (the coordinator's costs and queue start empty), warmed with
    one request alone and one paired so that its step costs are known; its records in NAME.json."""
    with (
        LocalCluster(
            model_dir, workers=args.workers, policy=policy, log_dir=args.out_dir / "logs" / name
        ) as cluster,
        DiffusionClient(cluster.address) as client,
    ):
        warmup = {label(mode): _warm_up(client, args, mode) for mode in WARM_UP_MODES}
        config = LoadConfig(
            duration=args.duration,
            steps=args.steps,
            width=args.size,
            height=args.size,
            slo=slo,
            seed_base=1000 * i,
            timeout=600.0,
            **load,
        )
        test = LoadTest(client, config)
        before = cluster_cpu_seconds(cluster)
        summary = test.run()
        used = cluster_cpu_seconds(cluster)
    done = max(summary["completed"], 1)
    # CPU each process spent per request (user + system): on 2 cores shared by the workers, the
    # coordinator and this client, what the others spend is taken from the workers' forwards.
    summary["cpu_s_per_request"] = {
        name: round((used[name] - before.get(name, 0.0)) / done, 4) for name in used
    }
    summary["policy"] = policy
    summary["warmup"] = warmup
    (args.out_dir / f"{name}.json").write_text(json.dumps(test.report(summary), indent=2))
    return summary


def cluster_cpu_seconds(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system) so far of each of the cluster's processes by name, and of this
    load client's."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"load-client": sum(os.times()[:2])}
    for proc in cluster.procs:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone (a killed worker); its seconds are not counted
            continue
        out[cluster.process_name(proc.pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def closed_loop(model_dir: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every policy at every concurrency, the policies alternating point by point."""
    results: dict[str, list[dict]] = {p: [] for p in args.policies}
    points = [(i, c, p) for i, c in enumerate(args.concurrency) for p in args.policies]
    for i, clients, policy in tqdm(points, desc="closed loop", unit="point"):
        load = {"concurrency": clients}
        summary = _run_point(policy, model_dir, args, i, f"{policy}-c{clients}", load, args.slo_seconds)
        summary["concurrency"] = clients
        results[policy].append(summary)
        print(_line(policy, summary), file=sys.stderr, flush=True)
    return results


def sweep_policy(
    policy: str, model_dir: str, args: argparse.Namespace, capacity: float | None, baseline: dict
) -> tuple[float, list[dict]]:
    if capacity is None:
        with LocalCluster(
            model_dir, workers=args.workers, policy=policy, log_dir=args.out_dir / "logs" / "alone"
        ) as c:
            with DiffusionClient(c.address) as client:
                baseline["single_s"] = _alone_latency(client, args, Mode.SINGLE)
                baseline["pair_s"] = _alone_latency(client, args, Mode.HYBRID)
        capacity = args.workers / baseline["single_s"]
    slo = args.slo_factor * baseline["single_s"]
    points = [
        _point(policy, model_dir, args, i, f, capacity, slo)
        for i, f in enumerate(tqdm(args.loads, desc=policy, unit="point"))
    ]
    return capacity, points


def _line(policy: str, s: dict) -> str:
    point = (
        f"load {s['load_fraction'] * 100:4.0f}%"
        if "load_fraction" in s
        else f"concurrency {s['concurrency']}"
    )
    return (
        f"{policy:10s} {point}: {s['completed']} done, p50 {s['p50_s']:.2f}s p95 {s['p95_s']:.2f}s "
        f"mean {s['mean_s']:.2f}s {s['throughput_rps']:.3f} req/s "
        f"SLO {s['slo_attainment'] * 100:.0f}% elastic {s['elastic_events']} ran {s['ran']}; per request: "
        f"denoising {s['mean_denoising_s']:.2f}s, control {s['mean_control_s']:.3f}s, "
        f"command waits {s['mean_command_wait_s']:.3f}s; CPU s "
        + ", ".join(f"{name} {sec:.3f}" for name, sec in s.get("cpu_s_per_request", {}).items())
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = str(args.model_dir or bench_model_dir())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.concurrency is not None:
        started = time.perf_counter()
        report = {
            "workers": args.workers,
            "steps": args.steps,
            "size": args.size,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "slo_s": args.slo_seconds,
            "policies": closed_loop(model_dir, args),
            "wall_s": time.perf_counter() - started,
        }
        out = args.out_dir / f"closed_loop-c{'-'.join(map(str, args.concurrency))}.json"
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
        return 0
    order = ["throughput"] + [p for p in args.policies if p != "throughput"]  # capacity comes first
    capacity, baseline, results, started = None, {}, {}, time.perf_counter()
    for policy in order:
        capacity, results[policy] = sweep_policy(policy, model_dir, args, capacity, baseline)
    report = {
        "workers": args.workers,
        "steps": args.steps,
        "size": args.size,
        "duration_s": args.duration,
        "capacity_rps": capacity,
        "alone": baseline,
        "slo_s": args.slo_factor * baseline["single_s"],
        "policies": {p: results[p] for p in args.policies},
        "wall_s": time.perf_counter() - started,
    }
    (args.out_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    plot_sweep(
        report["policies"],
        args.out_dir / "sweep.png",
        f"{args.workers} workers, bench model {args.size}px, {args.steps} steps; capacity "
        f"{capacity:.2f} req/s; SLO {report['slo_s']:.1f} s",
    )
    for policy in args.policies:
        for s in results[policy]:
            print(_line(policy, s), file=sys.stderr)
    print(f"wrote {args.out_dir}/sweep.json and sweep.png")
    return 0

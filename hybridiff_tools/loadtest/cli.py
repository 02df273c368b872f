"""``hybridiff loadtest --target HOST:PORT [--api grpc|http] (--rate R | --concurrency C) ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from hybridiff.client import DiffusionClient, default_target
from hybridiff.protocol import Mode, labels, parse
from hybridiff_tools.loadtest.generator import LoadConfig, LoadConfigError, LoadTest
from hybridiff_tools.loadtest.http_client import HttpImagesClient
from hybridiff_tools.loadtest.plots import plot_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff loadtest", description=__doc__)
    p.add_argument("--target", default=default_target(), help="HOST:PORT (default: $HYBRIDIFF_TARGET)")
    p.add_argument(
        "--api",
        choices=("grpc", "http"),
        default="grpc",
        help="the public gRPC API, or the OpenAI-compatible HTTP API (--target: the coordinator's "
        "--http-port; token: $HYBRIDIFF_AUTH_TOKEN)",
    )
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    load.add_argument("--concurrency", type=int, help="closed loop: this many clients, one request at a time")
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which requests start")
    p.add_argument(
        "--warmup", type=float, default=0.0, help="seconds at the start whose requests are not counted"
    )
    p.add_argument("--steps", type=int, default=10, help="denoising steps of every request")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--mode", choices=labels(Mode), default="auto", help="the requests' mode")
    p.add_argument("--seed-base", type=int, default=0, help="request i uses seed SEED_BASE + i")
    p.add_argument(
        "--slo", type=float, default=10.0, help="latency objective in seconds (for SLO attainment)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="each request's deadline in seconds")
    p.add_argument("--max-requests", type=int, default=10_000, help="start at most this many requests")
    p.add_argument("--json", default=None, help="write every request and the summary here")
    p.add_argument("--plot", default=None, help="write a PNG of latency over the run here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = LoadConfig(
            rate=args.rate,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            steps=args.steps,
            width=args.width,
            height=args.height,
            mode=parse(Mode, args.mode),
            seed_base=args.seed_base,
            slo=args.slo,
            timeout=args.timeout,
            max_requests=args.max_requests,
        ).check()
    except LoadConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    expected = round(args.rate * args.duration) if args.rate else None
    if args.api == "http":
        connect = HttpImagesClient(
            args.target, timeout=args.timeout, token=os.environ.get("HYBRIDIFF_AUTH_TOKEN")
        )
    else:
        connect = DiffusionClient(args.target, timeout=args.timeout)
    with (
        connect as client,
        tqdm(total=expected, unit="req", disable=args.quiet) as bar,
    ):
        client.list_models()  # fail fast (exit 3) when the target cannot be reached
        test = LoadTest(client, config, on_done=lambda r: bar.update(1))
        summary = test.run()
    summary["api"] = args.api
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(test.report(summary), indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_run(test.records, summary, args.plot)
        print(f"wrote {args.plot}")
    return 0

"""The demo's requests and its summary (``scripts/demo.sh``): one prompt through a running
cluster in HYBRID, then the same request (same seed) on one worker alone, side by side.

Prints a few plain lines: where the image is and its size in pixels, each mode's latency (the
client's wall time of the call) and what the pair saved, and where to look next. A warm-up
request first, so neither timed request pays for the first call's one-off work (the stage cut's
measurement)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hybridiff.client import DiffusionClient, Generation
from hybridiff.protojson import response_json

PROMPT = "a red circle on the left"


def timed(client: DiffusionClient, mode: str, args: argparse.Namespace) -> tuple[Generation, float]:
    start = time.perf_counter()
    result = client.generate(args.prompt, steps=args.steps, seed=args.seed, mode=mode)
    return result, time.perf_counter() - start


def window(result: Generation) -> str:
    if result.tau1 is None:
        return "no pipeline window"
    return f"pipeline window at steps {result.tau1}-{result.tau2}"


def speedup_line(t_hybrid: float, t_single: float) -> str:
    ratio = t_single / t_hybrid
    if ratio > 1:
        return f"speedup  {ratio:.2f}x: the pair finished the same request that much sooner than one worker"
    return (
        f"speedup  {ratio:.2f}x: not faster here; on a busy CPU host the two workers compete for the "
        "same cores (BENCHMARKS.md has measured speedups)"
    )


def summary(
    args: argparse.Namespace, hybrid: Generation, t_hybrid: float, single: Generation, t_single: float
) -> str:
    width, height = hybrid.images[0].size
    lines = [
        f"image    {args.out} ({width}x{height} px: the default model draws coloured shapes at 32 px)",
        f'request  "{args.prompt}", {args.steps} steps, seed {hybrid.seed}',
        f"hybrid   {t_hybrid:.2f} s on {len(hybrid.stats.workers)} workers ({window(hybrid)})",
        f"single   {t_single:.2f} s on 1 worker, the same request (saved as {args.single_out})",
        speedup_line(t_hybrid, t_single),
        "next     README.md (call it from Python, curl or the OpenAI SDK) and docs/api.md",
    ]
    lines += [
        "         keep a cluster running: .venv/bin/hybridiff local (gRPC on 127.0.0.1:50051), then",
        "         the playground at http://127.0.0.1:8000/ and the OpenAI-compatible API at",
        "         http://127.0.0.1:8000/v1/images/generations",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the running coordinator")
    parser.add_argument("--prompt", default=PROMPT, help="what to draw")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--seed", type=int, default=7, help="the seed of both timed requests")
    parser.add_argument("--out", default="out/demo.png", help="the hybrid image")
    parser.add_argument("--single-out", default="out/demo-single.png", help="the single-worker image")
    parser.add_argument("--stats-json", default="out/demo-stats.json", help="the hybrid request's stats")
    args = parser.parse_args(argv)
    with DiffusionClient(args.target) as client:
        client.generate(args.prompt, steps=4, seed=args.seed, mode="hybrid")  # warm-up
        hybrid, t_hybrid = timed(client, "hybrid", args)
        single, t_single = timed(client, "single", args)
    for path, result in ((args.out, hybrid), (args.single_out, single)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(result.data[0])
    Path(args.stats_json).write_text(json.dumps(response_json(hybrid.response), indent=2))
    print(summary(args, hybrid, t_hybrid, single, t_single))
    return 0


if __name__ == "__main__":
    sys.exit(main())

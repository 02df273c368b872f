"""What speculative steps save (docs/design.md section 1): two local clusters side by side, one with the
coordinator's ``--speculative-steps on`` and one ``off``, the same HYBRID requests sent to each in
turn (alternating which goes first). Per request: latency, the denoising steps' control seconds
(what the step's wall time spent between coordinator and workers) inside the speculative zone
(after L, up to the window's fill step) and outside it, the workers' waits for a command or a
resolution, and whether the two images are identical. Writes JSON and a plot of the workers'
per-step wait on the coordinator (PNG, next to it) and prints the summary.

    python -m hybridiff_tools.bench.speculation [--model-dir models/shapes-sdxl] [--requests 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, Phase
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_launch.model_dirs import default_model_dir
from hybridiff_tools.pyplot import headless_pyplot

PROMPT = "a red circle above a blue square"


def zone(stats, l_slope: int) -> list:
    """The steps that went out speculatively with speculation on: after L, up to the fill."""
    fill = next((s.step for s in stats.steps if s.phase == Phase.PIPELINE_FILL), len(stats.steps) - 1)
    return [s for s in stats.steps if l_slope < s.step <= fill]


def measure(client: DiffusionClient, seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    gen = client.generate(PROMPT, seed=seed, steps=args.steps, mode=Mode.HYBRID, timeout=600)
    latency = time.perf_counter() - start
    stats = gen.stats
    inside = zone(stats, args.l_slope)
    outside = [s for s in stats.steps if s not in inside]

    def waits(steps) -> float:
        return sum(max(w.command_wait_seconds + w.resolve_wait_seconds for w in s.workers) for s in steps)

    return {
        "seed": seed,
        "latency_seconds": latency,
        # per step: the longest a worker waited on the coordinator (its command, its resolution)
        "step_waits_ms": [
            1000 * max(w.command_wait_seconds + w.resolve_wait_seconds for w in s.workers)
            for s in stats.steps
        ],
        "zone": [s.step for s in inside],
        "tau1": stats.tau1,
        "zone_steps": len(inside),
        "zone_control_seconds": sum(s.control_seconds for s in inside),
        "zone_worker_waits_seconds": waits(inside),
        "other_control_seconds": sum(s.control_seconds for s in outside),
        "zone_compute_seconds": sum(s.critical_compute_seconds for s in inside),
        "image": gen.data[0],
    }


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, rows in runs.items():
        steps = sum(r["zone_steps"] for r in rows)
        out[name] = {
            "requests": len(rows),
            "median_latency_seconds": statistics.median(r["latency_seconds"] for r in rows),
            "zone_steps": steps,
            "zone_control_ms_per_step": 1000 * sum(r["zone_control_seconds"] for r in rows) / max(1, steps),
            "zone_worker_wait_ms_per_step": 1000
            * sum(r["zone_worker_waits_seconds"] for r in rows)
            / max(1, steps),
            "zone_compute_ms_per_step": 1000 * sum(r["zone_compute_seconds"] for r in rows) / max(1, steps),
        }
    out["identical_images"] = all(
        a["image"] == b["image"] for a, b in zip(runs["on"], runs["off"], strict=True)
    )
    return out


def plot(runs: dict[str, list[dict]], l_slope: int, path: Path) -> None:
    """Per step, the workers' wait on the coordinator, median over the requests, on and off."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, color in (("off", "tab:red"), ("on", "tab:blue")):
        rows = runs[name]
        steps = range(min(len(r["step_waits_ms"]) for r in rows))
        ax.plot(
            list(steps),
            [statistics.median(r["step_waits_ms"][i] for r in rows) for i in steps],
            color=color,
            label=f"speculative steps {name}",
        )
    fills = [max(r["zone"]) for r in runs["on"] if r["zone"]]
    last = max(fills, default=l_slope)
    ax.axvspan(l_slope + 0.5, last + 0.5, color="0.9", label="speculative zone (L..fill)")
    ax.set_xlabel("step")
    ax.set_ylabel("worker wait on the coordinator, ms (median)")
    ax.set_title("HYBRID, embedded model, 50 steps: waits for the command or the resolution")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speculation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the embedded default model")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--l-slope", type=int, default=None, help="the model's L (default: read from the model)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/speculation/speculation.json"))
    args = p.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    if args.l_slope is None:
        defaults = json.loads((Path(model_dir) / "hybridiff.json").read_text())["defaults"]
        args.l_slope = defaults["hybrid"]["l_slope"]
    clusters = {
        "on": LocalCluster(model_dir, workers=2, verbose=False),
        "off": LocalCluster(
            model_dir, workers=2, verbose=False, coordinator_args=["--speculative-steps", "off"]
        ),
    }
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        for c in clusters.values():
            c.start()
        clients = {name: DiffusionClient(c.address) for name, c in clusters.items()}
        for name, client in clients.items():  # warm-up: the cut, the first request's costs
            client.generate(PROMPT, seed=99, steps=args.steps, mode=Mode.HYBRID, timeout=600)
        for i in range(args.requests):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                runs[name].append(measure(clients[name], i, args))
                r = runs[name][-1]
                print(
                    f"{name:>3} seed {i}: {r['latency_seconds']:.2f} s, tau1 {r['tau1']}, "
                    f"{r['zone_steps']} zone steps, control {1000 * r['zone_control_seconds']:.1f} ms there",
                    flush=True,
                )
    finally:
        for c in clusters.values():
            c.stop()
    result = summarize(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = {k: [{f: v for f, v in r.items() if f != "image"} for r in rs] for k, rs in runs.items()}
    args.out.write_text(json.dumps({"summary": result, "runs": rows}, indent=2) + "\n")
    plot(runs, args.l_slope, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

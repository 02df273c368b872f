"""``hybridiff frontier``: quality against speed of every window policy at every window length.

Runs ``hybridiff_tools.bench.frontier`` on a local cluster (two workers, each pinned to its own
core): the default model's held-out prompts (PSNR, SSIM, prompt adherence, measured CPU speedup,
speedup predicted from the committed H200 profiles and for a device without batching gain), then
the PSNR of a tiny SD3-shaped model. Writes ``frontier.json``, one PNG per device and prints the
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, WindowGuidance, label, parse
from hybridiff.request import request_from_names
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_launch.model_dirs import add_model_flags, default_model_dir, resolve_model, tiny_model_cache
from hybridiff_tools.bench import plots
from hybridiff_tools.bench.frontier import (
    GENERIC_PROMPTS,
    Case,
    DeviceCosts,
    Generate,
    Measurement,
    batch_linear,
    format_table,
    frontier,
    measure,
    parse_lengths,
    policies,
    profile_device,
    run_from,
)
from hybridiff_tools.shapes.adherence import check
from hybridiff_tools.shapes.evaluate import EVAL_SEEDS
from hybridiff_tools.shapes.grammar import held_out_prompts

PROFILES = Path("docs/benchmarks")
DEVICES = {  # name -> (profile JSON, batch-linear variant of it)
    "h200-eager": ("gpu_profile_h200_fp16.json", False),
    "h200-cudagraphs": ("gpu_profile_h200_fp16_cudagraphs.json", False),
    "2x-batch": ("gpu_profile_h200_fp16.json", True),
}


def devices(profile_dir: Path) -> list[DeviceCosts]:
    out = []
    for name, (file, linear) in DEVICES.items():
        device = profile_device(profile_dir / file, name)
        out.append(batch_linear(device, name) if linear else device)
    return out


def held_out_cases(prompts: int, seeds: int) -> list[Case]:
    return [
        Case(c.text, s, lambda png, c=c: check(png, c).adheres)
        for s in EVAL_SEEDS[:seeds]  # seed-major: a run cut short still covers every prompt
        for c in held_out_prompts()[:prompts]
    ]


def generic_cases(prompts: int, seeds: int) -> list[Case]:
    return [Case(p, s) for s in EVAL_SEEDS[:seeds] for p in GENERIC_PROMPTS[:prompts]]


def cluster_generate(client: DiffusionClient, timeout: float) -> Generate:
    def generate(request):
        response = client.generate_request(request, timeout=timeout)
        return run_from(response.images[0].data, response.stats)

    return generate


def _nothing_to_generate(request):
    raise AssertionError("every case was in the resumed run")


def run_on_cluster(model_dir: Path, log_dir: Path, cases: list[Case], bar: tqdm, **kwargs):
    done = kwargs.get("done")
    if done is not None and all((c.prompt, c.seed) in done.exact for c in cases):
        # resumed with every case in: no cluster to start (measure still checks the settings and
        # keeps only the cases asked for; it generates nothing)
        return measure(_nothing_to_generate, cases, **kwargs)
    with LocalCluster(model_dir, workers=2, log_dir=log_dir) as cluster:
        client = DiffusionClient(cluster.address)
        try:
            generate = cluster_generate(client, 600.0)
            warm = cases[0]  # the first requests of each mode compile and allocate: discarded
            for mode in (Mode.SINGLE, Mode.CFG_PARALLEL, Mode.HYBRID):
                generate(request_from_names(warm.prompt, seed=warm.seed, steps=4, mode=mode))
            on_image = lambda what: (bar.set_postfix_str(what), bar.update(1))  # noqa: E731
            return measure(generate, cases, on_image=on_image, **kwargs)
        finally:
            client.close()


def partial_record(measured: Measurement, model_dir: Path, window_policies: list[WindowGuidance]) -> dict:
    """What ``frontier.partial.json`` holds: the cases so far and what they were measured with."""
    return {
        "model_dir": str(model_dir.resolve()),
        "policies": [label(p) for p in window_policies],
        "raw": measured.to_json(),
    }


def resumed(partial: Path, model_dir: Path, window_policies: list[WindowGuidance]) -> Measurement:
    """The cases of a partial run, refused when it measured another model or other policies (its
    steps, guidance and lengths are checked by ``measure``)."""
    record = json.loads(partial.read_text())
    if record.get("model_dir") != str(model_dir.resolve()) or record.get("policies") != [
        label(p) for p in window_policies
    ]:
        raise SystemExit(
            f"error: {partial} was measured on {record.get('model_dir')} with policies "
            f"{record.get('policies')}; run without --resume (or remove it) to start again"
        )
    return Measurement.from_json(record["raw"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff frontier", description=__doc__.split("\n\n")[0])
    add_model_flags(p, served_name=False)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default model) or generic ones")
    p.add_argument("--seeds", type=int, default=4, help=f"seeds per prompt (at most {len(EVAL_SEEDS)})")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument(
        "--lengths",
        default="1,2,4,6,8,10,13,16,all",
        help="window lengths k; all: every step after tau1 (the default: calibrate's ladder at 30 steps)",
    )
    p.add_argument("--policies", default=None, help="comma-separated window policies (default: every one)")
    p.add_argument(
        "--tiny-sd3-seeds", type=int, default=4, help="seeds x 2 prompts on a tiny SD3 model (0: skip)"
    )
    p.add_argument("--tiny-sd3-lengths", default="1,2,4,6,8,all")
    p.add_argument("--floor-db", type=float, default=45.0, help="the quality floor drawn on the plots")
    p.add_argument("--profiles", type=Path, default=PROFILES, help="folder of the committed GPU profiles")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no prompt/seed of the default-model pass after this (the ones done are reported)",
    )
    p.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks/frontier"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the cases of OUT_DIR/frontier.partial.json (saved after every case) and run the rest",
    )
    p.add_argument(
        "--from-json", type=Path, default=None, help="redraw the plots and tables of a saved frontier.json"
    )
    args = p.parse_args(argv)
    if not 1 <= args.seeds <= len(EVAL_SEEDS) or args.prompts < 1 or args.steps < 2:
        p.error(f"--seeds must be 1..{len(EVAL_SEEDS)}, --prompts >= 1, --steps >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.from_json.parent)
        return 0
    started = time.perf_counter()
    model_dir = resolve_model(args)[0] if args.model else default_model_dir()
    default_model = Path(model_dir).resolve() == default_model_dir().resolve()
    cases = (held_out_cases if default_model else generic_cases)(args.prompts, args.seeds)
    window_policies = (
        [parse(WindowGuidance, name.strip()) for name in args.policies.split(",")]
        if args.policies
        else policies()
    )
    lengths = parse_lengths(args.lengths, args.steps)
    tiny_cases = generic_cases(2, args.tiny_sd3_seeds) if args.tiny_sd3_seeds else []
    tiny_lengths = parse_lengths(args.tiny_sd3_lengths, 50)
    total = len(cases) * (3 + len(window_policies) * len(lengths))
    total += len(tiny_cases) * (1 + len(window_policies) * len(tiny_lengths))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial = args.out_dir / "frontier.partial.json"
    done = resumed(partial, Path(model_dir), window_policies) if args.resume and partial.is_file() else None
    bar = tqdm(total=total, unit="image", disable=args.quiet, desc="frontier")
    if done is not None:
        bar.update(
            sum(1 for c in cases if (c.prompt, c.seed) in done.exact)
            * (3 + len(window_policies) * len(lengths))
        )
    try:
        measured = run_on_cluster(
            Path(model_dir),
            args.out_dir / "logs",
            cases,
            bar,
            lengths=lengths,
            steps=args.steps,
            guidance=args.guidance,
            window_policies=window_policies,
            deadline=None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes,
            pipeline=True,
            done=done,
            on_case=lambda m: partial.write_text(
                json.dumps(partial_record(m, Path(model_dir), window_policies)) + "\n"
            ),
        )
        tiny = None
        if tiny_cases:
            from hybridiff_launch.tiny_model import write_tiny_model  # deferred: torch and diffusers

            tiny_dir = tiny_model_cache() / "tiny-sd3"
            if not (tiny_dir / "model_index.json").is_file():
                write_tiny_model("sd3", tiny_dir)
            tiny = run_on_cluster(
                tiny_dir,
                args.out_dir / "logs" / "tiny-sd3",
                tiny_cases,
                bar,
                lengths=tiny_lengths,
                steps=50,  # the SD3 defaults' (its tau_cap is 40)
                guidance=7.0,
                window_policies=window_policies,
                time_single=False,
            )
    finally:
        bar.close()
    costs = devices(args.profiles)
    result = frontier(measured, costs)
    result["floor_db"] = args.floor_db
    record = {
        "command": "hybridiff frontier " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_dir": str(model_dir),
        "held_out_prompts": default_model,
        "prompts": sorted({p for p, _ in measured.exact}),
        "seeds": sorted({s for _, s in measured.exact}),
        "cases": len(measured.exact),
        "cases_asked": len(cases),
        "steps": args.steps,
        "guidance": args.guidance,
        "devices": {
            name: {"profile": file, "batch_linear": linear} for name, (file, linear) in DEVICES.items()
        },
        "cores": sorted(os.sched_getaffinity(0)),
        "frontier": result,
        "raw": measured.to_json(),
    }
    if tiny is not None:
        record["tiny_sd3"] = {"frontier": frontier(tiny, []), "raw": tiny.to_json()}
    record["wall_seconds"] = time.perf_counter() - started
    (args.out_dir / "frontier.json").write_text(json.dumps(record, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    report(record, args.out_dir)
    print(f"wrote {args.out_dir / 'frontier.json'} and frontier_*.png ({record['wall_seconds']:.0f}s)")
    return 0


def report(record: dict, out_dir: Path) -> None:
    """One PNG per device (and the measured CPU speedup) and the tables, from a run's record."""
    result = record["frontier"]
    result.setdefault("steps", record["steps"])
    names = list(record["devices"])
    for name in [*names, "cpu"]:
        plots.frontier(
            result,
            name,
            out_dir / f"frontier_{name}.png",
            f"Window policies: quality vs speedup ({name})",
        )
    print(format_table(result, names, lengths_label(record["steps"])))
    if "tiny_sd3" in record:
        print("\ntiny SD3-shaped model:")
        tiny = record["tiny_sd3"]["frontier"]
        print(format_table(tiny, [], lengths_label(record["tiny_sd3"]["raw"]["steps"])))


def lengths_label(steps: int):
    return lambda k: "all" if k >= steps else str(k)


if __name__ == "__main__":
    sys.exit(main())

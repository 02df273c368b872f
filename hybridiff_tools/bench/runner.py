"""``hybridiff bench``: every mode side by side through the gRPC service (docs/design.md section 4).

Starts a local cluster (each worker pinned to its own core with one torch thread: the CPU
stand-in for one GPU each), or targets a running one, and for each prompt and seed runs
SINGLE, CFG_PARALLEL, PIPELINE and HYBRID (with both window-guidance policies), interleaved
and repeated so machine noise hits every mode alike, after one discarded warm-up per mode;
then the diffusers pipeline in-process on one core as the outside reference. It reports
latency (median, spread), speedup vs SINGLE, the schedule's ideal speedup from the measured
compute times (``perfmodel`` with a free link) and measured/ideal, per-step overhead (step
wall time minus compute), data-plane bytes, tau1/tau2, and PSNR/SSIM of every mode's image
against SINGLE (and of the hybrid policies against CFG_PARALLEL, the exact CFG). A second,
short pass on the trained default model measures prompt adherence per mode and policy
(``hybridiff_tools.bench.adherence``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.message import Message
from PIL import Image
from tqdm import tqdm

from gpu_worker.adapters.base import png_bytes
from gpu_worker.loader import detect_arch, load_adapter
from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, Phase, WindowGuidance, label
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_launch.model_dirs import add_model_flags, default_model_dir, resolve_model, tiny_model_cache
from hybridiff_launch.tiny_model import write_tiny_model
from hybridiff_tools.bench import plots
from hybridiff_tools.bench.adherence import Variant, adherence_by_variant, format_adherence
from hybridiff_tools.bench.perfmodel import (
    ComputeTimes,
    FixedCosts,
    LinkModel,
    StageTimes,
    TensorBytes,
    simulate,
)
from hybridiff_tools.quality import psnr, ssim
from hybridiff_tools.shapes.grammar import held_out_prompts

DEFAULT_PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle at the bottom",
    "a yellow star on the right",
)
# (label, mode, window guidance; None: the mode's default): the modes of docs/design.md section 4, the
# second window policy, and AUTO (its schedule chosen from the workers' costs and the model's
# calibration, section 10). The labels name the variants in the JSON, the table and the plots.
VARIANTS: tuple[Variant, ...] = (
    Variant("single", Mode.SINGLE),
    Variant("cfg-parallel", Mode.CFG_PARALLEL),
    Variant("pipeline", Mode.PIPELINE),
    Variant("hybrid", Mode.HYBRID, WindowGuidance.CONDITIONAL),
    Variant("hybrid-last-difference", Mode.HYBRID, WindowGuidance.LAST_DIFFERENCE),
    Variant("auto", Mode.AUTO),
)


@dataclass
class Run:
    label: str
    prompt: str
    seed: int
    latency: float
    stats: pb.GenerateStats
    image: bytes


_ENUMS = {"Mode": Mode, "Phase": Phase, "WindowGuidance": WindowGuidance}


def message_json(msg: Message) -> dict:
    """A public-API message (e.g. ``GenerateStats``) as JSON-ready data: every field by its name,
    enums by their edge names (``label``), unset optional fields and unspecified enums as None."""

    def value_of(field, value):
        if field.enum_type is not None:
            return label(_ENUMS[field.enum_type.name](value)) if value else None
        return message_json(value) if field.message_type is not None else value

    out = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.is_repeated:
            out[f.name] = [value_of(f, v) for v in value]
        elif f.has_presence and f.message_type is None and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = value_of(f, value)
    return out


def run_variant(
    client: DiffusionClient, variant: Variant, prompt: str, seed: int, args: argparse.Namespace
) -> Run:
    hybrid = {"l_slope": args.l_slope, "eps_slope": args.eps_slope, "k": args.k, "tau_cap": args.tau_cap}
    start = time.perf_counter()
    gen = client.generate(
        prompt,
        seed=seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        mode=variant.mode,
        hybrid=hybrid,
        window_guidance=variant.window_guidance or 0,
        timeout=args.request_timeout,
    )
    return Run(variant.label, prompt, seed, time.perf_counter() - start, gen.stats, gen.data[0])


def diffusers_reference(
    model_dir: str,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    core: int | None,
    variant: str | None = None,
) -> tuple[float, Image.Image]:
    """The diffusers pipeline in this process, on one core with one thread (the outside reference)."""
    affinity = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        pipe = load_adapter(model_dir, variant=variant).pipe
        start = time.perf_counter()
        with torch.no_grad():
            image = pipe(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
        return time.perf_counter() - start, image
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


# --- analysis ---------------------------------------------------------------------------
def window_batch(stats: pb.GenerateStats) -> int:
    """The stage batch of the run's pipeline window: 2 for FULL_CFG (both branches), else 1."""
    return 2 if stats.window_guidance == WindowGuidance.FULL_CFG else 1


def measured_compute(runs: list[Run]) -> dict[str, float]:
    """Median per-worker compute seconds of each kind of step, from the runs themselves."""
    buckets: dict[str, list[float]] = {
        "b2": [],
        "b1": [],
        "stage1_b1": [],
        "stage2_b1": [],
        "stage1_b2": [],
        "stage2_b2": [],
        "update": [],
    }
    for run in runs:
        for step in run.stats.steps:
            workers = step.workers
            phase = Phase(step.phase)
            if phase == Phase.SINGLE:
                buckets["b2"] += [w.compute_seconds for w in workers]
            elif phase == Phase.DATA_PARALLEL:
                buckets["b1"] += [w.compute_seconds for w in workers]
            elif phase == Phase.PIPELINE and len(workers) == 2:
                batch = f"b{window_batch(run.stats)}"
                u, c = workers  # the driver lists U first
                if u.compute_seconds > 0 and c.compute_seconds > 0:
                    buckets[f"stage1_{batch}"].append(u.compute_seconds)
                    buckets[f"stage2_{batch}"].append(c.compute_seconds)
    return {k: statistics.median(v) if v else 0.0 for k, v in buckets.items()}


def ideal_latency(run: Run, compute: dict[str, float], topology: str) -> float:
    """The run's own phase list replayed by the schedule model with measured compute and a free link."""

    def stages(b: str) -> StageTimes:
        s1, s2 = compute[f"stage1_{b}"], compute[f"stage2_{b}"]
        # Nested split: with a free link the steady pipelined step is max(pre+post, core), whatever
        # the pre/post proportion; half and half stands in for it.
        return StageTimes.nested(s1 / 2, s2, s1 / 2) if topology == "nested" else StageTimes(s1, s2)

    times = ComputeTimes(topology, compute["b1"], compute["b2"], stages("b1"), stages("b2"))
    phases = [Phase(s.phase) for s in run.stats.steps]
    fixed = FixedCosts(encode=run.stats.encoding_seconds, decode=run.stats.decoding_seconds)
    return simulate(
        phases, times, TensorBytes(prediction=0), LinkModel.ideal(), window_batch(run.stats), fixed
    ).latency


def critical_compute(step: pb.StepStat) -> float:
    """The compute on a step's critical path: the max of the workers', the sum of both on a fill
    step (where the stages run one after the other)."""
    comp = [w.compute_seconds for w in step.workers]
    if not comp:
        return 0.0
    return sum(comp) if step.phase == Phase.PIPELINE_FILL else max(comp)


def step_overheads(run: Run) -> list[float]:
    """Per step: wall time minus the compute on the critical path."""
    return [step.wall_seconds - critical_compute(step) for step in run.stats.steps if step.workers]


def compute_bound_latency(run: Run) -> float:
    """What the run would take if nothing but its own compute were on the critical path (its
    measured per-step compute, max of the workers, both on a fill step, plus encode and decode)."""
    return (
        run.stats.encoding_seconds
        + run.stats.decoding_seconds
        + sum(critical_compute(step) for step in run.stats.steps)
    )


def window_bounds(stats: pb.GenerateStats) -> tuple[int, int] | None:
    """(tau1, tau2) of the run's pipeline window; None when none was opened."""
    return (stats.tau1, stats.tau2) if stats.HasField("tau1") and stats.HasField("tau2") else None


def _similarity(runs: list[Run], against: dict[tuple[str, int], Run]) -> list[tuple[float, float]]:
    """(PSNR, SSIM) of each run's image against the image of the same prompt and seed in ``against``."""
    return [
        (psnr(r.image, against[key].image), ssim(r.image, against[key].image))
        for r in runs
        if (key := (r.prompt, r.seed)) in against
    ]


def _schedule_name(choice: pb.AutoChoice) -> str:
    name = label(Mode(choice.mode))
    if choice.window_guidance:
        name += f" {label(WindowGuidance(choice.window_guidance))} k={choice.k}"
    return name


def summarize(runs: list[Run], reference: list[tuple[str, int, float, bytes]], topology: str) -> dict:
    compute = measured_compute(runs)
    labels = [v.label for v in VARIANTS]
    by_label = {lab: [r for r in runs if r.label == lab] for lab in labels}
    singles = {(r.prompt, r.seed): r for r in by_label["single"]}
    exact = {(r.prompt, r.seed): r for r in by_label["cfg-parallel"]}
    modes: dict[str, dict] = {}
    for lab in labels:
        rs = by_label[lab]
        if not rs:
            continue
        lat = [r.latency for r in rs]
        ideal = [ideal_latency(r, compute, topology) for r in rs]
        over = [o for r in rs for o in step_overheads(r)]
        step_wall = [s.wall_seconds for r in rs for s in r.stats.steps]
        vs_single = _similarity(rs, singles)
        vs_exact = _similarity(rs, exact)
        bytes_req = [r.stats.data_plane_bytes for r in rs]
        per_phase_bytes: dict[str, list[int]] = {}
        for r in rs:
            for s in r.stats.steps:
                per_phase_bytes.setdefault(label(Phase(s.phase)), []).append(s.bytes_sent)
        windows = [window_bounds(r.stats) for r in rs]
        modes[lab] = {
            "runs": len(rs),
            "latency_median": statistics.median(lat),
            "latency_min": min(lat),
            "latency_max": max(lat),
            "latencies": lat,
            # the denoising loop alone (the stats' denoising_seconds): what the schedule changes
            "denoising_median": statistics.median(r.stats.denoising_seconds for r in rs),
            "ideal_latency_median": statistics.median(ideal),
            # per run, its own compute-bound time over its latency: the system's overhead, free of
            # the machine noise that moves whole runs (and so the ratios between modes)
            "system_efficiency": statistics.median(compute_bound_latency(r) / r.latency for r in rs),
            # the windows the runs opened (empty: none opened one)
            "tau1": sorted({w[0] for w in windows if w}),
            "tau2": sorted({w[1] for w in windows if w}),
            "tau1_source": sorted({r.stats.tau1_source for r in rs if r.stats.tau1_source}),
            "overhead_per_step_median_s": statistics.median(over) if over else 0.0,
            "step_wall_median_s": statistics.median(step_wall) if step_wall else 0.0,
            "bytes_per_request": statistics.median(bytes_req),
            "bytes_per_step_by_phase": {p: statistics.median(v) for p, v in per_phase_bytes.items()},
            "psnr_vs_single": min((p for p, _ in vs_single), default=None),
            "ssim_vs_single": min((s for _, s in vs_single), default=None),
            "psnr_vs_cfg_parallel": min((p for p, _ in vs_exact), default=None),
            "ssim_vs_cfg_parallel": min((s for _, s in vs_exact), default=None),
            # AUTO's choice (mode, window policy, k, predicted seconds) as its first run's stats say,
            # and how often each schedule was chosen (the costs are refined by every request)
            "auto_choice": (
                message_json(rs[0].stats.auto_choice) if rs[0].stats.HasField("auto_choice") else None
            ),
            "auto_choices": dict(
                Counter(_schedule_name(r.stats.auto_choice) for r in rs if r.stats.HasField("auto_choice"))
            ),
        }
    base = modes["single"]
    for rec in modes.values():
        rec["speedup"] = base["latency_median"] / rec["latency_median"]
        rec["denoising_speedup"] = (
            base["denoising_median"] / rec["denoising_median"] if rec["denoising_median"] else None
        )
        rec["ideal_speedup"] = base["ideal_latency_median"] / rec["ideal_latency_median"]
        rec["efficiency"] = rec["speedup"] / rec["ideal_speedup"]
        step = rec["step_wall_median_s"]
        rec["overhead_fraction_of_step"] = rec["overhead_per_step_median_s"] / step if step else 0.0
    result = {"compute_seconds": compute, "modes": modes}
    if reference:
        lat = [r[2] for r in reference]
        result["diffusers_reference"] = {
            "latency_median": statistics.median(lat),
            "latencies": lat,
            "speedup_vs_single": base["latency_median"] / statistics.median(lat) if lat else None,
            "psnr_vs_single": min(
                psnr(img, singles[(p, s)].image) for p, s, _, img in reference if (p, s) in singles
            ),
        }
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{'mode':24} {'median s':>9} {'spread s':>13} {'speedup':>8} {'denoise x':>9} {'ideal x':>8} "
        f"{'eff':>6} {'sys eff':>7} {'ovh/step':>9} {'KiB/req':>9} {'tau1,tau2':>10} {'PSNR/single':>11} "
        f"{'SSIM':>6} {'PSNR/cfg':>8}"
    ]
    for lab, m in result["modes"].items():
        psnr_s = "inf" if m["psnr_vs_single"] == float("inf") else f"{m['psnr_vs_single']:.1f}"
        exact = m["psnr_vs_cfg_parallel"]
        psnr_e = "-" if exact is None else "inf" if exact == float("inf") else f"{exact:.1f}"
        denoise = "-" if m["denoising_speedup"] is None else f"{m['denoising_speedup']:.2f}"
        taus = f"{m['tau1'][0]},{m['tau2'][0]}" if m["tau1"] else "-"
        lines.append(
            f"{lab:24} {m['latency_median']:9.2f} {m['latency_min']:6.2f}-{m['latency_max']:<6.2f} "
            f"{m['speedup']:8.2f} {denoise:>9} {m['ideal_speedup']:8.2f} {m['efficiency']:6.1%} "
            f"{m['system_efficiency']:7.1%} {m['overhead_per_step_median_s'] * 1e6:7.0f}us "
            f"{m['bytes_per_request'] / 1024:9.0f} {taus:>10} {psnr_s:>11} "
            f"{m['ssim_vs_single']:6.3f} {psnr_e:>8}"
        )
    for lab, m in result["modes"].items():
        if m.get("auto_choice"):
            c = m["auto_choice"]
            chosen = ", ".join(f"{name} x{n}" for name, n in m["auto_choices"].items())
            lines.append(f"{lab}: AUTO chose {chosen}; basis: {c['basis']}")
    ref = result.get("diffusers_reference")
    if ref:
        lines.append(
            f"{'diffusers (in-process)':24} {ref['latency_median']:9.2f} {'':13} "
            f"{ref['speedup_vs_single']:8.2f}   PSNR vs single {ref['psnr_vs_single']:.1f} dB"
        )
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff bench", description=__doc__.split("\n\n")[0])
    add_model_flags(p, served_name=False)  # default: the SDXL-shaped bench model (built once, ~30M params)
    p.add_argument(
        "--target", default=None, help="HOST:PORT of a running coordinator (default: start a local cluster)"
    )
    p.add_argument(
        "--prompts",
        type=int,
        default=1,
        help=f"how many of the built-in prompts (max {len(DEFAULT_PROMPTS)})",
    )
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of every mode per prompt and seed")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--l-slope", type=int, default=None)
    p.add_argument("--eps-slope", type=float, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--tau-cap", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the in-process diffusers reference")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--out-dir", type=Path, default=Path("out/bench"))
    p.add_argument(
        "--adherence-seeds",
        type=int,
        default=1,
        help="seeds per held-out prompt in the adherence pass on the trained default model (0: skip)",
    )
    p.add_argument("--adherence-steps", type=int, default=30)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(DEFAULT_PROMPTS) or args.seeds < 1 or args.repeats < 1 or args.steps < 1:
        p.error("--prompts must be 1..4; --seeds, --repeats and --steps >= 1")
    return args


def bench_model_dir() -> Path:
    cache = tiny_model_cache() / "bench-sdxl"
    if not (cache / "model_index.json").is_file():
        print(f"building the SDXL-shaped bench model in {cache}", file=sys.stderr)
        write_tiny_model("sdxl", cache, size="bench")
    return cache


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = str(resolve_model(args)[0] if args.model else bench_model_dir())
    topology = "nested" if detect_arch(model_dir) == "sdxl" else "sequential"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cluster = None
    if args.target is None:
        cluster = LocalCluster(
            model_dir, workers=2, log_dir=args.out_dir / "logs", variant=args.variant
        ).start()
    target = args.target or cluster.address
    client = DiffusionClient(target)
    pairs = [(p, s) for p in DEFAULT_PROMPTS[: args.prompts] for s in range(args.seeds)]
    adherence_runs = len(VARIANTS) * len(held_out_prompts()) * args.adherence_seeds
    total = len(VARIANTS) * (1 + args.repeats * len(pairs)) + (0 if args.no_reference else 1) + adherence_runs
    bar = tqdm(total=total, unit="run", disable=args.quiet, desc="bench")
    runs: list[Run] = []
    reference = []
    try:
        warm = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 4)})
        for variant in VARIANTS:  # warm-up (a few steps of every mode), discarded
            run_variant(client, variant, pairs[0][0], pairs[0][1], warm)
            bar.update(1)
        for r in range(args.repeats):
            for i, (prompt, seed) in enumerate(pairs):
                shift = (r + i) % len(VARIANTS)  # rotate the order: noise hits every mode alike
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    runs.append(run_variant(client, variant, prompt, seed, args))
                    bar.set_postfix_str(f"{variant.label} {runs[-1].latency:.1f}s")
                    bar.update(1)
        if not args.no_reference:  # once: it takes as long as SINGLE
            prompt, seed = pairs[0]
            latency, image = diffusers_reference(
                model_dir, prompt, seed, args.steps, args.guidance, core=0, variant=args.variant
            )
            reference.append((prompt, seed, latency, png_bytes(image)))
            bar.update(1)
        if cluster is not None:  # the timing cluster goes before the adherence pass starts its own
            cluster.stop()
            cluster = None
        if adherence_runs:
            adherence = adherence_by_variant(
                str(default_model_dir()),
                VARIANTS,
                args.adherence_seeds,
                args.adherence_steps,
                args.out_dir / "logs-adherence",
                on_run=lambda name: (bar.set_postfix_str(f"adherence {name}"), bar.update(1)),
            )
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.stop()
    result = summarize(runs, reference, topology)
    if adherence_runs:
        result["adherence"] = adherence
    result["config"] = {
        "model_dir": model_dir,
        "topology": topology,
        "steps": args.steps,
        "guidance": args.guidance,
        "prompts": [p for p, _ in pairs],
        "seeds": args.seeds,
        "repeats": args.repeats,
        "cores": sorted(os.sched_getaffinity(0)),
        "target": args.target or "local cluster, 2 workers",
    }
    result["wall_seconds"] = time.perf_counter() - started
    hybrid = next(r for r in runs if r.label == "hybrid")
    result["example_hybrid_stats"] = message_json(hybrid.stats)
    (args.out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plots.latency_bars(result, args.out_dir / "latency.png")
    exact = next(r for r in runs if r.label == "cfg-parallel")
    plots.rel_mae_curve(
        exact.stats,
        window_bounds(hybrid.stats),
        args.out_dir / "rel_mae.png",
        "rel-MAE per step (exact CFG run) and the hybrid window",
    )
    plots.timeline(
        hybrid.stats, args.out_dir / "timeline_hybrid.png", "One hybrid request: what each worker computed"
    )
    print(format_table(result))
    if adherence_runs:
        print(format_adherence(adherence))
    print(
        f"wrote {args.out_dir / 'bench.json'}, latency.png, rel_mae.png, timeline_hybrid.png "
        f"({result['wall_seconds']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Window-guidance policies against exact CFG on the trained default model (docs/design.md
section 7): PSNR/SSIM of each policy's image against the ``cfg-parallel`` image on the held-out
prompts, per window length, with the steps each runs at batch 1 pipelined, as fills and as data
parallel (so that its cost can be predicted).

Runs in one process, on the in-process pair (``hybridiff_launch.inprocess``), the same engines
and data-plane frames as a cluster::

    python -m hybridiff_tools.bench.window_policies --out window_policies.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridiff.protocol import Mode, Phase, WindowGuidance, label
from hybridiff.request import request_from_names
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_tools.quality import psnr, ssim
from hybridiff_tools.shapes.evaluate import EVAL_SEEDS, held_out_prompts

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-sdxl"


@dataclass(frozen=True)
class Variant:
    name: str
    mode: Mode
    policy: WindowGuidance | None = None
    hybrid: dict = field(default_factory=dict)


def default_variants() -> list[Variant]:
    h, never = Mode.HYBRID, 1000  # refresh_every past the window: only its first step measures
    ld, cond = WindowGuidance.LAST_DIFFERENCE, WindowGuidance.CONDITIONAL
    refreshing = {
        "refreshed": WindowGuidance.REFRESHED_DIFFERENCE,
        "extrapolated": WindowGuidance.EXTRAPOLATED_DIFFERENCE,
    }
    out = [Variant("cfg-parallel", Mode.CFG_PARALLEL), Variant("conditional k10", h, cond, {"k": 10})]
    out += [Variant(f"last-difference k{k}", h, ld, {"k": k}) for k in (5, 10, 15)]
    for name, policy in refreshing.items():
        out += [
            Variant(f"{name} fill-only k{k}", h, policy, {"k": k, "refresh_every": never}) for k in (10, 15)
        ]
        out += [
            Variant(f"{name} m{m} k{k}", h, policy, {"k": k, "refresh_every": m})
            for k, m in ((10, 3), (10, 5), (15, 4), (15, 5), (20, 5), (20, 7))
        ]
    return out


def run(
    model_dir: Path,
    variants: list[Variant],
    seeds: tuple[int, ...],
    steps: int,
    log=print,
    prompts: int | None = None,
) -> dict:
    """Every variant on the held-out prompts (the first ``prompts`` of them) x ``seeds``; the
    first variant is the reference the others are measured against."""
    engine = InProcessEngine(model_dir)
    images: dict[str, dict[tuple[str, int], bytes]] = {}
    counts: dict[str, list[dict]] = {}
    try:
        for v in variants:
            images[v.name], counts[v.name] = {}, []
            start = time.perf_counter()
            for caption in held_out_prompts()[:prompts]:
                for seed in seeds:
                    raw = request_from_names(
                        caption.text,
                        seed=seed,
                        steps=steps,
                        mode=v.mode,
                        window_guidance=v.policy,
                        hybrid=v.hybrid,
                    )
                    result = engine.generate(engine.resolve(raw))
                    images[v.name][(caption.text, seed)] = result.images[0]
                    phases = [s.phase for s in result.stats.steps]
                    counts[v.name].append(
                        {
                            "pipelined": phases.count(Phase.PIPELINE),
                            "fills": phases.count(Phase.PIPELINE_FILL),
                            "data_parallel": phases.count(Phase.DATA_PARALLEL),
                            "tau1": result.stats.tau1,
                        }
                    )
            log(f"{v.name}: {time.perf_counter() - start:.0f} s")
    finally:
        engine.close()
    exact = images[variants[0].name]
    rows = {}
    for v in variants:
        keys = sorted(images[v.name])
        p = [psnr(images[v.name][key], exact[key]) for key in keys]
        s = [ssim(images[v.name][key], exact[key]) for key in keys]
        c = counts[v.name]
        finite = [x for x in p if x != float("inf")] or [float("inf")]
        rows[v.name] = {
            "mode": label(v.mode),
            "policy": label(v.policy) if v.policy else None,
            "hybrid": v.hybrid,
            "psnr": p,
            "ssim": s,
            "psnr_mean": statistics.fmean(finite),
            "psnr_min": min(p),
            "ssim_mean": statistics.fmean(s),
            "ssim_min": min(s),
            **{k: statistics.fmean(x[k] for x in c) for k in ("pipelined", "fills", "data_parallel")},
        }
    return {"model_dir": str(model_dir), "steps": steps, "seeds": list(seeds), "variants": rows}


def format_table(result: dict) -> str:
    lines = [
        "| variant | PSNR mean / min (dB) | SSIM mean / min | pipelined (batch 1) | fills | data parallel |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        lines.append(
            f"| {name} | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} | {r['ssim_mean']:.4f} / "
            f"{r['ssim_min']:.4f} | {r['pipelined']:.1f} | {r['fills']:.1f} | {r['data_parallel']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--seeds", type=int, default=1, help="held-out seeds per prompt (of 11, 22, 33, 44)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (cfg-parallel always)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    variants = default_variants()
    if args.only:
        variants = [v for v in variants if v.name == "cfg-parallel" or v.name in args.only]
    result = run(args.model, variants, EVAL_SEEDS[: args.seeds], args.steps)
    print(format_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

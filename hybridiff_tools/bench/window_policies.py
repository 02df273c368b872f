"""Window-guidance policies against exact CFG on the trained default model (docs/design.md
section 7): PSNR/SSIM of each policy's image against the ``cfg-parallel`` image on the held-out
prompts, per window length, with the steps each runs at batch 1 pipelined, as fills and as data
parallel (so that its cost can be predicted).

Runs in one process, on the in-process pair (``hybridiff_launch.inprocess``), the same engines
and data-plane frames as a cluster::

    python -m hybridiff_tools.bench.window_policies --out window_policies.json

``extrapolated`` variants are a measurement only, not a served policy: they patch the engines
to carry the difference forward along the trend of its last two measurements (damped by
``rho`` per step), to record why that policy was not kept (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_worker import engine as engine_module
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
    rho: float | None = None  # extrapolated: the trend's damping per step (None: not extrapolated)


def default_variants() -> list[Variant]:
    ld, rd, cond = (
        WindowGuidance.LAST_DIFFERENCE,
        WindowGuidance.REFRESHED_DIFFERENCE,
        WindowGuidance.CONDITIONAL,
    )
    h = Mode.HYBRID
    out = [Variant("cfg-parallel", Mode.CFG_PARALLEL), Variant("conditional k10", h, cond, {"k": 10})]
    out += [Variant(f"last-difference k{k}", h, ld, {"k": k}) for k in (5, 10, 15)]
    out += [Variant("refreshed fill-only k10", h, rd, {"k": 10, "refresh_every": 1000})]
    out += [
        Variant(f"refreshed m{m} k{k}", h, rd, {"k": k, "refresh_every": m})
        for k in (10, 15)
        for m in (2, 3, 5)
    ]
    out += [Variant(f"extrapolated rho{r} k10", h, ld, {"k": 10}, rho=r) for r in (1.0, 0.7)]
    out += [Variant("extrapolated rho0.7 m3 k10", h, rd, {"k": 10, "refresh_every": 3}, rho=0.7)]
    out += [
        Variant(f"opening a{a} last-difference k10", h, ld, {"k": 10, "opening_window": a}) for a in (3, 5)
    ]
    out += [
        Variant(f"opening a{a} refreshed m3 k10", h, rd, {"k": 10, "opening_window": a, "refresh_every": 3})
        for a in (3, 5)
    ]
    return out


class _Extrapolation:
    """Patches the engines' window prediction: the difference measured at steps j0 < j1 carried
    to step j as d1 + (d1 - d0) / (j1 - j0) * sum(rho**n, n = 1..j - j1)."""

    def __init__(self) -> None:
        self.rho: float | None = None
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}  # by id(_Active)
        self.step: dict[int, int] = {}
        cls = engine_module.WorkerEngine
        self._orig = (cls._guided_update, cls._refreshed_fill_update, cls._window_prediction, cls.step)
        guided, refreshed, prediction, step = self._orig
        outer = self

        def _guided_update(eng, st, e_u, e_c, t):
            outer._record(st, t, e_c - e_u)
            return guided(eng, st, e_u, e_c, t)

        def _refreshed_fill_update(eng, st, cmd, last, e_u, e_c, kept, t):
            outer._record(st, t, e_c - e_u)
            return refreshed(eng, st, cmd, last, e_u, e_c, kept, t)

        def _step(eng, request_id, cmd, *args):
            outer.step[id(eng.active(request_id))] = cmd.step
            return step(eng, request_id, cmd, *args)

        def _window_prediction(eng, st, raw, policy):
            out = prediction(eng, st, raw, policy)
            hist = outer.history.get(id(st), [])
            if outer.rho is None or policy == WindowGuidance.CONDITIONAL or len(hist) < 2:
                return out
            (j0, d0), (j1, d1) = hist[-2], hist[-1]
            h = outer.step[id(st)] - j1
            gain = sum(outer.rho**n for n in range(1, h + 1))
            return out + (st.guidance_scale - 1.0) * gain * (d1 - d0) / (j1 - j0)

        cls._guided_update, cls._refreshed_fill_update = _guided_update, _refreshed_fill_update
        cls._window_prediction, cls.step = _window_prediction, _step

    def _record(self, st, t, difference) -> None:
        step = int((st.timeline.timesteps == t).nonzero()[0, 0])
        self.history.setdefault(id(st), []).append((step, difference))


def run(model_dir: Path, variants: list[Variant], seeds: tuple[int, ...], steps: int, log=print) -> dict:
    patch = _Extrapolation()
    engine = InProcessEngine(model_dir)
    images: dict[str, dict[tuple[str, int], bytes]] = {}
    counts: dict[str, list[dict]] = {}
    try:
        for v in variants:
            patch.rho = v.rho
            images[v.name], counts[v.name] = {}, []
            start = time.perf_counter()
            for caption in held_out_prompts():
                for seed in seeds:
                    patch.history.clear()
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
    exact = images["cfg-parallel"]
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
            "rho": v.rho,
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

"""The benchmark's quality pass on the trained default model: prompt adherence of every mode
and window-guidance policy on the held-out prompts, next to PSNR/SSIM against the exact CFG
(``cfg-parallel``) image, all through the gRPC service of a local cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, WindowGuidance
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_tools.quality import psnr, ssim
from hybridiff_tools.shapes.adherence import AdherenceReport
from hybridiff_tools.shapes.evaluate import EVAL_SEEDS, held_out_requests, run_adherence


@dataclass(frozen=True)
class Variant:
    """One way to run a request: its ``label`` names it in the JSON, the tables and the plots."""

    label: str
    mode: Mode
    window_guidance: WindowGuidance | None = None  # None: the mode's default


def adherence_by_variant(
    model_dir: str,
    variants: tuple[Variant, ...],
    seeds: int,
    steps: int,
    log_dir: Path,
    on_run: Callable[[str], None] = lambda _: None,
) -> dict:
    """For each variant: adherence accuracy (whole prompt and per attribute) over the held-out
    prompts x ``seeds`` seeds, and min PSNR/SSIM against ``cfg-parallel``."""
    images: dict[str, dict[tuple[str, int], bytes]] = {}
    results: dict[str, dict] = {}
    with LocalCluster(model_dir, workers=2, log_dir=log_dir) as cluster:
        client = DiffusionClient(cluster.address)
        try:
            for variant in variants:

                def generate(
                    req: pb.GenerateRequest, variant: Variant = variant
                ) -> tuple[bytes, pb.GenerateStats]:
                    req.mode, req.window_guidance = variant.mode, variant.window_guidance or 0
                    response = client.generate_request(req, timeout=300)
                    on_run(variant.label)
                    return response.images[0].data, response.stats

                requests = held_out_requests(EVAL_SEEDS[:seeds], steps=steps)
                report, samples = run_adherence(generate, requests)
                images[variant.label] = {(s.caption.text, s.seed): s.image_png for s in samples}
                results[variant.label] = _summary(report, [s.stats for s in samples])
        finally:
            client.close()
    exact = images.get("cfg-parallel", {})
    for name, by_key in images.items():
        pairs = [(img, exact[key]) for key, img in by_key.items() if key in exact]
        results[name]["psnr_vs_cfg_parallel"] = min((psnr(a, b) for a, b in pairs), default=None)
        results[name]["ssim_vs_cfg_parallel"] = min((ssim(a, b) for a, b in pairs), default=None)
    return {"model_dir": model_dir, "steps": steps, "seeds": list(EVAL_SEEDS[:seeds]), "variants": results}


def _summary(report: AdherenceReport, stats: list[pb.GenerateStats]) -> dict:
    decided = [s for s in stats if s.HasField("tau1")]
    return {
        **report.as_dict(),
        "tau1": sorted({s.tau1 for s in decided}),
        "tau1_by_slope": sum(s.tau1_source == "slope" for s in decided),
        "tau1_decided": len(decided),
    }


def format_adherence(result: dict) -> str:
    lines = [
        f"{'mode (default model)':24} {'adherence':>9} {'colour':>7} {'shape':>6} {'position':>8} "
        f"{'PSNR/cfg':>8} {'SSIM':>6} {'tau1 by slope':>13}"
    ]
    for name, r in result["variants"].items():
        a = r["attributes"]
        p = r["psnr_vs_cfg_parallel"]
        psnr_s = "-" if p is None else "inf" if p == float("inf") else f"{p:.1f}"
        ssim_s = "-" if r["ssim_vs_cfg_parallel"] is None else f"{r['ssim_vs_cfg_parallel']:.3f}"
        slope = f"{r['tau1_by_slope']}/{r['tau1_decided']}" if r["tau1_decided"] else "-"
        lines.append(
            f"{name:24} {r['accuracy']:9.0%} {a.get('colour', 0):7.0%} {a.get('shape', 0):6.0%} "
            f"{a.get('position', 0):8.0%} {psnr_s:>8} {ssim_s:>6} {slope:>13}"
        )
    return "\n".join(lines)

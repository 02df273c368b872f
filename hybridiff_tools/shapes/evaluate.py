"""Evaluate the default model: prompt adherence over the fixed held-out prompts and seeds,
and its rel-MAE curve with the tau1 the slope rule finds (``hybridiff adherence``).

Generation goes through any ``generate(GenerateRequest) -> (png, stats)`` callable, so the same
evaluation runs on the in-process engine here and through the gRPC service in the benchmark.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from coordinator.schedule import DiscrepancyMonitor
from gpu_worker.loader import detect_arch, read_model_defaults
from hybridiff.protocol import Mode
from hybridiff.request import HybridParams, request_from_names
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_tools.pyplot import headless_pyplot
from hybridiff_tools.shapes.adherence import AdherenceReport, Verdict, check
from hybridiff_tools.shapes.grammar import Caption, held_out_prompts

EVAL_SEEDS = (11, 22, 33, 44)  # fixed: with the 8 held-out prompts, 32 images per setting

# A request -> (its first image as PNG, the run's stats: the driver's ``GenerationStats`` in
# process, the public API's ``GenerateStats`` through the service).
Generate = Callable[[pb.GenerateRequest], tuple[bytes, object]]


@dataclass
class Sample:
    caption: Caption
    seed: int
    image_png: bytes
    stats: object
    verdict: Verdict


def held_out_requests(
    seeds: tuple[int, ...] = EVAL_SEEDS, **request: object
) -> list[tuple[Caption, pb.GenerateRequest]]:
    """One request per held-out prompt and seed; ``request`` sets the other fields."""
    return [(c, request_from_names(c.text, seed=s, **request)) for c in held_out_prompts() for s in seeds]


def run_adherence(
    generate: Generate,
    requests: list[tuple[Caption, pb.GenerateRequest]],
    on_sample: Callable[[Sample], None] | None = None,
) -> tuple[AdherenceReport, list[Sample]]:
    samples = []
    for caption, raw in requests:
        png, stats = generate(raw)
        sample = Sample(caption, raw.seed, png, stats, check(png, caption))
        samples.append(sample)
        if on_sample:
            on_sample(sample)
    return AdherenceReport([s.verdict for s in samples]), samples


def slope_rule_outcomes(curves: list[list[float]], params: HybridParams) -> list[tuple[int, str]]:
    """(tau1, source) the discrepancy monitor finds on each rel-MAE curve with ``params``."""
    out = []
    for curve in curves:
        monitor = DiscrepancyMonitor(params)
        for value in curve:
            monitor.observe(value)
            if monitor.tau1 is not None:
                break
        out.append((monitor.tau1 if monitor.tau1 is not None else -1, monitor.tau1_source or "none"))
    return out


def rel_mae_section(
    curves: dict[str, list[float]], params: HybridParams, guidance: float, plot: Path
) -> dict:
    """Where the slope rule puts tau1 on each curve with ``params``, plotted to ``plot``."""
    outcomes = slope_rule_outcomes(list(curves.values()), params)
    by_slope = sum(s == "slope" for _, s in outcomes)
    steps = max(len(c) for c in curves.values())
    plot_rel_mae(
        curves,
        {label: t for label, (t, _) in zip(curves, outcomes)},
        plot,
        f"default model, {steps} steps, guidance {guidance:g}: rel-MAE per step;\n"
        f"tau1 (dotted) by the slope rule (L={params.l_slope}, eps={params.eps_slope:g}) on "
        f"{by_slope}/{len(outcomes)}, else tau_cap={params.tau_cap}",
    )
    return {
        "steps": steps,
        "params": vars(params),
        "curves": curves,
        "tau1": [t for t, _ in outcomes],
        "tau1_source": [s for _, s in outcomes],
        "by_slope": by_slope,
    }


def plot_rel_mae(curves: dict[str, list[float]], tau1: dict[str, int], out: Path, title: str) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        (line,) = ax.plot(range(len(curve)), curve, lw=1.2, label=label)
        if tau1.get(label, -1) >= 0:
            ax.axvline(tau1[label], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("rel-MAE(e_c, e_u)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_training_losses(log: dict, out: Path) -> None:
    """The logged losses of both training stages (``training_log.json``)."""
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, stage, title in zip(axes, ("vae", "denoiser"), ("autoencoder", "denoiser + text encoders")):
        rows = [r for r in log["losses"] if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{title} ({rows[-1]['elapsed_s'] / 60:.0f} min in)" if rows else title)
    axes[0].set_ylabel("training loss (mean of 50 steps)")
    fig.suptitle(
        f"default model training: {log['seconds'] / 60:.1f} min on {log['config']['threads']} CPU threads"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def save_grid(samples: list[Sample], out: Path, columns: int, scale: int = 3) -> None:
    """The images in a grid (rows in ``samples`` order), a thin red border marking misses."""
    images = [Image.open(io.BytesIO(s.image_png)).convert("RGB") for s in samples]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w * scale, rows * h * scale), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, s) in enumerate(zip(images, samples)):
        x, y = (i % columns) * w * scale, (i // columns) * h * scale
        grid.paste(img.resize((w * scale, h * scale), Image.NEAREST), (x, y))
        if not s.verdict.adheres:
            draw.rectangle([x, y, x + w * scale - 1, y + h * scale - 1], outline=(255, 0, 0))
    grid.save(out)


def in_process_generate(model_dir: str | Path) -> tuple[Generate, Callable[[], None]]:
    """A ``Generate`` over the in-process engine, and its ``close``."""
    engine = InProcessEngine(model_dir)

    def generate(raw: pb.GenerateRequest) -> tuple[bytes, object]:
        result = engine.generate(engine.resolve(raw))
        return result.images[0], result.stats

    return generate, engine.close


def study(
    model_dir: str | Path,
    out_dir: str | Path,
    steps: int = 30,
    curve_steps: int = 50,
    guidances: tuple[float, ...] = (5.0, 1.0),
    progress: Callable[[str], None] = print,
) -> dict:
    """Adherence at each guidance (exact CFG), the rel-MAE curves over ``curve_steps`` steps
    and the slope rule's tau1 on them, written to ``out_dir`` (JSON and PNGs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generate, close = in_process_generate(model_dir)
    defaults = read_model_defaults(model_dir, detect_arch(model_dir))
    record: dict = {"model_dir": str(model_dir), "steps": steps, "seeds": list(EVAL_SEEDS), "adherence": {}}
    try:
        for g in guidances:
            report, samples = run_adherence(
                generate, held_out_requests(steps=steps, guidance_scale=g, mode=Mode.CFG_PARALLEL)
            )
            record["adherence"][str(g)] = report.as_dict()
            progress(f"guidance {g}: adherence {report.accuracy:.0%} {report.attribute_accuracy()}")
            save_grid(samples, out / f"held_out_guidance_{g:g}.png", columns=len(EVAL_SEEDS))
        curves: dict[str, list[float]] = {}
        for caption, raw in held_out_requests(
            seeds=EVAL_SEEDS[:2],
            steps=curve_steps,
            guidance_scale=defaults.guidance_scale,
            mode=Mode.CFG_PARALLEL,
        ):
            _, stats = generate(raw)
            curves[f"{caption.text} (seed {raw.seed})"] = [s.rel_mae for s in stats.steps]
        record["rel_mae"] = rel_mae_section(
            curves, defaults.hybrid, defaults.guidance_scale, out / "rel_mae.png"
        )
        progress(
            f"rel-MAE: tau1 by the slope rule on {record['rel_mae']['by_slope']}/{len(curves)} curves "
            f"(tau1 {sorted(record['rel_mae']['tau1'])})"
        )
    finally:
        close()
    log = Path(model_dir) / "training_log.json"
    if log.is_file():
        plot_training_losses(json.loads(log.read_text()), out / "training_loss.png")
    (out / "evaluation.json").write_text(json.dumps(record, indent=1))
    return record

"""GPU profile of full-size SDXL / SD3 denoisers and the two-GPU latency it predicts
(docs/design.md section 4).

Builds the SDXL-base UNet and the SD3-medium transformer from the configs in ``configs/``
(random weights, no download), times at 1024x1024 a denoiser forward at batch 1 and 2, picks
the cut whose two stages are closest in measured per-unit cost, times each stage at batch 1
and 2 at that cut, measures the bytes that cross the link, and feeds all of it with a link
model into ``perfmodel`` to predict the latency and speedup of every mode. ``--device cpu
--tiny`` runs the same code on tiny configs of the same structure (what the tests use).

    python -m hybridiff_tools.bench.gpu_profile --out gpu_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from gpu_worker.adapters import dit_split, unet_split
from gpu_worker.split_balance import choose_cut, device_clock, stage_costs
from hybridiff_tools.bench.perfmodel import (
    ComputeTimes,
    LinkModel,
    ScheduleParams,
    StageTimes,
    TensorBytes,
    predict_modes,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PAPER_SPEEDUP = {"sdxl": 2.31, "sd3": 2.07}  # Jung et al., CVPR 2026: HYBRID vs one GPU, two RTX 3090s
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    config: str
    topology: str
    steps: int
    guidance: float
    tau1: int  # tau_cap fallback (no trained weights, so no rel-MAE curve to detect from)
    k: int
    latent: tuple[int, int, int]  # channels, height, width at 1024x1024
    text_len: int


MODELS = {
    "sdxl": ModelSpec("sdxl_base_unet.json", "nested", 50, 5.0, 15, 5, (4, 128, 128), 77),
    "sd3": ModelSpec("sd3_medium_transformer.json", "sequential", 50, 7.0, 40, 5, (16, 128, 128), 77 + 256),
}


# --- models and inputs ------------------------------------------------------------------
def load_config(name: str, tiny: bool) -> dict[str, Any]:
    cfg = json.loads((CONFIG_DIR / MODELS[name].config).read_text())
    if not tiny:
        return cfg
    if name == "sdxl":  # same blocks, layers and unit list; small widths
        cfg.update(
            block_out_channels=[32, 64, 64],
            attention_head_dim=[1, 2, 2],
            transformer_layers_per_block=[1, 1, 2],
            norm_num_groups=8,
            cross_attention_dim=32,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 16,
            sample_size=16,
        )
    else:
        cfg.update(
            num_layers=4,
            num_attention_heads=2,
            attention_head_dim=16,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            sample_size=16,
            pos_embed_max_size=16,
        )
    return cfg


def build_model(name: str, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # deferred: diffusers is slow to import

    cls = UNet2DConditionModel if name == "sdxl" else SD3Transformer2DModel
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: fast, and no 10 GB fp32 copy in host RAM
        model = cls.from_config(cfg)
    model = model.to(device)  # buffers built from numpy (e.g. SD3's positional table) start on the CPU
    # half()/bfloat16()/float() rather than to(dtype): the same cast, without diffusers' warning
    # about fp32-only modules (these models have none).
    cast = {torch.float16: model.half, torch.bfloat16: model.bfloat16, torch.float32: model.float}[dtype]
    return cast().eval().requires_grad_(False)


def make_inputs(
    name: str,
    cfg: dict[str, Any],
    spec_latent: tuple[int, int, int],
    text_len: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    g = torch.Generator("cpu").manual_seed(batch)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    sample = rand(batch, *spec_latent)
    if name == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).repeat(batch, 1).to(device, dtype)
        return {
            "sample": sample,
            "t": torch.tensor(500.0, device=device),
            "encoder_hidden_states": rand(batch, text_len, cfg["cross_attention_dim"]),
            "added_cond_kwargs": {"text_embeds": rand(batch, pooled), "time_ids": time_ids},
        }
    return {
        "sample": sample,
        "t": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": rand(batch, text_len, cfg["joint_attention_dim"]),
        "pooled": rand(batch, cfg["pooled_projection_dim"]),
    }


def tiny_shapes(name: str, cfg: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    side = cfg["sample_size"]
    return (MODELS[name].latent[0], side, side), 16


# --- timing -----------------------------------------------------------------------------
# With --cuda-graphs every timed call is captured once into a CUDA graph and replayed, which
# takes the host's kernel-launch cost out of the measurement (eager PyTorch on a fast GPU is
# launch-bound at batch 1; a serving worker would use graphs or torch.compile).
CUDA_GRAPHS = False


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_seconds(fn: Callable[[], Any], clock: Callable[[], float], warmup: int, repeats: int) -> float:
    if CUDA_GRAPHS:
        fn = _graphed(fn)
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = clock()
        fn()
        runs.append(clock() - start)
    return statistics.median(runs)


def nbytes(*tensors: torch.Tensor) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


# --- per-architecture profiles ----------------------------------------------------------
def _median_units(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _forward_times(
    forward, inputs: dict[int, dict[str, Any]], clock, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of a full forward at batch 1 and 2 (``forward_b1``, ``forward_b2``)."""
    for b in (1, 2):
        forward(inputs[b])  # first calls: kernel selection, allocator growth
    return {
        f"forward_b{b}": median_seconds(lambda b=b: forward(inputs[b]), clock, warmup, repeats)
        for b in (1, 2)
    }


def profile_unet(
    model, inputs: dict[int, dict[str, Any]], clock, warmup: int, repeats: int
) -> dict[str, Any]:
    def forward(x: dict[str, Any]) -> torch.Tensor:
        return model(
            x["sample"],
            x["t"],
            encoder_hidden_states=x["encoder_hidden_states"],
            added_cond_kwargs=x["added_cond_kwargs"],
            return_dict=False,
        )[0]

    times = _forward_times(forward, inputs, clock, warmup, repeats)
    probe = unet_split.NestedUNetSplit(model, 1)
    x1 = inputs[1]
    ctx1 = probe.context(x1["sample"], x1["t"], x1["encoder_hidden_states"], x1["added_cond_kwargs"])
    units = _median_units(
        [unet_split.time_units(probe, x1["sample"], ctx1, clock) for _ in range(repeats + 1)][1:]
    )
    cut = choose_cut(
        range(1, probe.num_units + 1),
        lambda c: stage_costs(unet_split.NestedUNetSplit(model, c).stage1_units(), units),
    )
    split = unet_split.NestedUNetSplit(model, cut)
    sizes: dict[str, int] = {"prediction": nbytes(forward(x1))}
    for b in (1, 2):
        x = inputs[b]

        def context(x=x):
            return split.context(x["sample"], x["t"], x["encoder_hidden_states"], x["added_cond_kwargs"])

        ctx = context()
        residuals = split.outer_pre(x["sample"], ctx)
        core_out = split.core(residuals[-1], ctx)
        # Each worker computes the (cheap) time/text embedding itself: counted in pre and in core.
        times[f"pre_b{b}"] = median_seconds(
            lambda: split.outer_pre(x["sample"], context()), clock, warmup, repeats
        )
        times[f"stage2_b{b}"] = median_seconds(
            lambda: split.core(residuals[-1], context()), clock, warmup, repeats
        )
        times[f"post_b{b}"] = median_seconds(
            lambda: split.outer_post(core_out, residuals, ctx), clock, warmup, repeats
        )
        times[f"stage1_b{b}"] = times[f"pre_b{b}"] + times[f"post_b{b}"]
        sizes[f"boundary_b{b}"] = nbytes(residuals[-1])
        sizes[f"stage_return_b{b}"] = nbytes(core_out)
    return {
        "topology": "nested",
        "cut": cut,
        "num_units": probe.num_units,
        "stage1_units": split.stage1_units(),
        "unit_seconds_b1": units,
        "times": times,
        "bytes": sizes,
    }


def profile_dit(model, inputs: dict[int, dict[str, Any]], clock, warmup: int, repeats: int) -> dict[str, Any]:
    def forward(x: dict[str, Any]) -> torch.Tensor:
        return model(
            hidden_states=x["sample"],
            timestep=x["t"],
            encoder_hidden_states=x["encoder_hidden_states"],
            pooled_projections=x["pooled"],
            return_dict=False,
        )[0]

    times = _forward_times(forward, inputs, clock, warmup, repeats)
    probe = dit_split.SequentialDiTSplit(model, 1)
    x1 = inputs[1]
    temb1 = probe.temb(x1["t"], x1["pooled"])
    units = _median_units(
        [
            dit_split.time_units(probe, x1["sample"], x1["encoder_hidden_states"], temb1, clock)
            for _ in range(repeats + 1)
        ][1:]
    )
    cut = choose_cut(
        range(1, probe.num_units),
        lambda c: stage_costs(dit_split.SequentialDiTSplit(model, c).stage1_units(), units),
    )
    split = dit_split.SequentialDiTSplit(model, cut)
    sizes: dict[str, int] = {"prediction": nbytes(forward(x1))}
    h, w = x1["sample"].shape[-2:]
    for b in (1, 2):
        x = inputs[b]

        def stage1(x=x):
            return split.front(x["sample"], x["encoder_hidden_states"], split.temb(x["t"], x["pooled"]))

        boundary = stage1()
        times[f"stage1_b{b}"] = median_seconds(stage1, clock, warmup, repeats)
        times[f"stage2_b{b}"] = median_seconds(
            lambda: split.back(boundary, split.temb(x["t"], x["pooled"]), h, w), clock, warmup, repeats
        )
        sizes[f"boundary_b{b}"] = nbytes(*boundary.values())
        sizes[f"stage_return_b{b}"] = 0
    return {
        "topology": "sequential",
        "cut": cut,
        "num_units": probe.num_units,
        "stage1_units": split.stage1_units(),
        "unit_seconds_b1": units,
        "times": times,
        "bytes": sizes,
    }


# --- prediction -------------------------------------------------------------------------
def compute_times(profile: dict[str, Any]) -> ComputeTimes:
    t = profile["times"]

    def stages(b: int) -> StageTimes:
        if profile["topology"] == "nested":
            return StageTimes.nested(t[f"pre_b{b}"], t[f"stage2_b{b}"], t[f"post_b{b}"])
        return StageTimes(t[f"stage1_b{b}"], t[f"stage2_b{b}"])

    return ComputeTimes(profile["topology"], t["forward_b1"], t["forward_b2"], stages(1), stages(2))


def tensor_bytes(profile: dict[str, Any]) -> TensorBytes:
    return TensorBytes(**profile["bytes"])


def schedule_for(name: str, steps: int, tau1: int | None, k: int | None, source: str) -> ScheduleParams:
    spec = MODELS[name]
    return ScheduleParams(
        num_steps=steps,
        tau1=spec.tau1 if tau1 is None else tau1,
        k=spec.k if k is None else k,
        tau1_source=source,
    )


def stage_checks(t: dict[str, float]) -> dict[str, Any]:
    """Per batch: the stages' sum over a full forward and the slower stage over the faster; and b2 over b1."""
    checks: dict[str, Any] = {}
    for b in (1, 2):
        s1, s2 = t[f"stage1_b{b}"], t[f"stage2_b{b}"]
        checks[f"b{b}"] = {
            "stage_sum_over_forward": (s1 + s2) / t[f"forward_b{b}"],
            "stage_ratio": max(s1, s2) / min(s1, s2),
        }
    return checks | {"b2_over_b1": t["forward_b2"] / t["forward_b1"]}


def profile_model(
    name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, link: LinkModel
) -> dict[str, Any]:
    spec = MODELS[name]
    start = time.perf_counter()
    cfg = load_config(name, args.tiny)
    model = build_model(name, cfg, device, dtype)
    latent, text_len = tiny_shapes(name, cfg) if args.tiny else (spec.latent, spec.text_len)
    inputs = {b: make_inputs(name, cfg, latent, text_len, b, device, dtype) for b in (1, 2)}
    clock = device_clock(device)
    run = profile_unet if name == "sdxl" else profile_dit
    with torch.inference_mode():
        profile = run(model, inputs, clock, args.warmup, args.repeats)
    sched = schedule_for(name, args.steps, args.tau1.get(name), args.k, args.tau1_source)
    t = profile["times"]
    profile.update(
        config=str(Path("hybridiff_tools/bench/configs") / spec.config),
        tiny=args.tiny,
        parameters=sum(p.numel() for p in model.parameters()),
        latent_shape=list(latent),
        text_len=text_len,
        guidance_scale=spec.guidance,
        checks=stage_checks(t),
        schedule=asdict(sched) | {"tau2": sched.tau2},
        modes=predict_modes(compute_times(profile), tensor_bytes(profile), link, sched),
        paper_hybrid_speedup=PAPER_SPEEDUP[name],
        profile_seconds=time.perf_counter() - start,
    )
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return profile


# --- report -----------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']['name']} ({result['device']['dtype']}); link: "
        f"{result['link']['bandwidth'] / 1e9:.1f} GB/s x{result['link']['copies']} copies, "
        f"{result['link']['latency'] * 1e6:.0f} us/message"
    ]
    for name, p in result["models"].items():
        t, s, c = p["times"], p["schedule"], p["checks"]
        lines += [
            "",
            f"{name}: {p['parameters'] / 1e6:,.1f}M params, {p['topology']} split at cut "
            f"{p['cut']}/{p['num_units']}, "
            f"{s['num_steps']} steps, tau1={s['tau1']} ({s['tau1_source']}), tau2={s['tau2']}, k={s['k']}",
            f"  forward b1 {t['forward_b1'] * 1e3:.2f} ms, b2 {t['forward_b2'] * 1e3:.2f} ms "
            f"(b2/b1 {c['b2_over_b1']:.3f}); "
            f"stages b1 {t['stage1_b1'] * 1e3:.2f}/{t['stage2_b1'] * 1e3:.2f} ms, "
            f"b2 {t['stage1_b2'] * 1e3:.2f}/{t['stage2_b2'] * 1e3:.2f} ms",
            f"  {'mode':<13}{'latency s':>11}{'speedup':>9}{'ideal s':>10}{'ideal x':>9}{'MB/request':>12}",
        ]
        for mode, rec in p["modes"].items():
            lines.append(
                f"  {mode:<13}{rec['predicted']['latency']:>11.3f}{rec['speedup']:>9.3f}"
                f"{rec['ideal']['latency']:>10.3f}{rec['ideal_speedup']:>9.3f}"
                f"{rec['predicted']['link_bytes'] / 1e6:>12.1f}"
            )
        lines.append(f"  paper (HYBRID, 2x RTX 3090): {p['paper_hybrid_speedup']:.2f}x")
    return "\n".join(lines)


def _tau1_pairs(values: list[str]) -> dict[str, int]:
    out = {}
    for v in values:
        name, _, n = v.partition("=")
        if name not in MODELS or not n.isdigit():
            raise argparse.ArgumentTypeError(
                f"--tau1 expects MODEL=N with MODEL in {sorted(MODELS)}, got {v!r}"
            )
        out[name] = int(n)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff gpu-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sdxl,sd3", help="comma-separated subset of: sdxl, sd3")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on a GPU, float32 on CPU"
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same structure (CPU tests)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs before each measurement (default 3; tiny 1)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median taken (default 10; tiny 3)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--tau1",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="window start per model (default: tau_cap fallback, sdxl=15, sd3=40)",
    )
    p.add_argument("--tau1-source", choices=("tau_cap", "slope"), default="tau_cap")
    p.add_argument("--k", type=int, default=None, help="window length after tau1 (default 5)")
    p.add_argument(
        "--link-gbps",
        type=float,
        default=25.0,
        help="effective bandwidth of one copy in GB/s (default 25: PCIe 4.0 x16 with pinned buffers)",
    )
    p.add_argument(
        "--link-latency-us", type=float, default=250.0, help="per-message latency (default 250 us)"
    )
    p.add_argument(
        "--link-copies",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: staged through host memory (device->host->device), 1: peer-to-peer",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA-graph replays (no kernel-launch overhead) instead of eager calls",
    )
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    try:
        args.tau1 = _tau1_pairs(args.tau1)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 10)
    if args.cuda_graphs and not args.device.startswith("cuda"):
        p.error("--cuda-graphs needs a CUDA device")
    if args.warmup < 0 or args.repeats < 1 or args.steps < 1:
        p.error("--warmup must be >= 0, --repeats and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-profile: CUDA is not available (use --device cpu --tiny for a CPU run)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    link = LinkModel(
        bandwidth=args.link_gbps * 1e9, latency=args.link_latency_us * 1e-6, copies=args.link_copies
    )
    start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": "hybridiff.gpu_profile/1",
        "device": {
            "type": device.type,
            "dtype": str(dtype).removeprefix("torch."),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "diffusers": version("diffusers"),
            "cuda": torch.version.cuda,
        },
        "link": asdict(link),
        "cuda_graphs": args.cuda_graphs,
        "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median"},
        "models": {},
    }
    for name in args.models:
        result["models"][name] = profile_model(name, args, device, dtype, link)
    result["wall_seconds"] = time.perf_counter() - start
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

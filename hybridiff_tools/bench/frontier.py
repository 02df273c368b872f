"""The window frontier: what each window-guidance policy costs in quality, and buys in speed, at
each pipeline-window length (docs/design.md sections 1 and 7).

For every prompt and seed the exact-CFG image (``cfg-parallel``) is the reference; every policy
(every member of ``WindowGuidance``) then runs HYBRID at every window length ``k`` (the window is
steps tau1+1 .. tau1+k when the slope rule finds tau1, clamped to the last step), and each image
is scored against the reference (PSNR, SSIM) and, for the default model's held-out prompts, by
the prompt-adherence checker. Speed is measured (denoising seconds against SINGLE, one worker,
on the same cluster) and predicted by the schedule model (``hybridiff_tools.bench.perfmodel``)
from a GPU profile, at each image's own tau1.

The measurement is shared with ``hybridiff calibrate``, which records its PSNRs in the model's
``hybridiff.json`` (``hybridiff.calibration``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.schedule import PIPELINE_WARMUP_STEPS
from hybridiff.protocol import REFRESHING_POLICIES, Mode, Phase, WindowGuidance, label
from hybridiff.request import request_from_names
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_tools.bench import perfmodel
from hybridiff_tools.bench.gpu_profile import compute_times, tensor_bytes
from hybridiff_tools.bench.runner import window_batch
from hybridiff_tools.quality import psnr, ssim

# Identical images have infinite PSNR; averaged and recorded, they count as this (the largest
# finite PSNR of two 8-bit images is 10*log10(255^2 * N) for one differing value in N: ~92 dB at
# 512x512x3, so 100 dB reads "identical" at any size this service makes).
IDENTICAL_DB = 100.0
GENERIC_PROMPTS = (
    "a photograph of a red fox in the snow",
    "a lighthouse on a cliff at sunset",
    "a bowl of fruit on a wooden table",
    "an astronaut riding a horse",
)
WINDOW_PHASES = (Phase.PIPELINE_FILL, Phase.PIPELINE)


def policies() -> list[WindowGuidance]:
    """Every window policy this version knows."""
    return list(WindowGuidance)


def default_lengths(steps: int) -> list[int]:
    """A few steps up to about 60% of the steps, then every step after tau1 (``steps``: the
    schedule clamps the window to the last step)."""
    ladder = [n for n in (1, 2, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40) if n < 0.6 * steps]
    return ladder + [steps]


def parse_lengths(text: str, steps: int) -> list[int]:
    """``2,4,8,all`` -> [2, 4, 8, steps] (``all``: every step after tau1)."""
    lengths = sorted(
        {steps if part.strip() == "all" else int(part) for part in text.split(",") if part.strip()}
    )
    if not lengths or lengths[0] < 1:
        raise ValueError("window lengths must be >= 1")
    return lengths


@dataclass(frozen=True)
class Case:
    """One prompt and seed; ``check``: its adherence checker (held-out prompts only)."""

    prompt: str
    seed: int
    check: Callable[[bytes], bool] | None = None


@dataclass
class Run:
    """One generated image and what the run says about its schedule and time."""

    png: bytes
    tau1: int | None
    tau1_source: str
    window_steps: int
    window_batch: int
    denoise: float
    refresh_every: int = 0  # a refreshing policy's period, read off its fills; 0 otherwise


Generate = Callable[[pb.GenerateRequest], Run]


def run_from(png: bytes, stats: Any) -> Run:
    """A ``Run`` from the public API's ``GenerateStats`` or the driver's ``GenerationStats``."""
    if isinstance(stats, pb.GenerateStats):
        tau1 = stats.tau1 if stats.HasField("tau1") else None
    else:
        tau1 = stats.tau1
    return Run(
        png=png,
        tau1=tau1,
        tau1_source=stats.tau1_source,
        window_steps=sum(s.phase in WINDOW_PHASES for s in stats.steps),
        window_batch=window_batch(stats),
        denoise=stats.denoising_seconds,
        refresh_every=refresh_period(stats),
    )


def refresh_period(stats: Any) -> int:
    """The period of a refreshing policy's window fills (the steps from its first fill to the next;
    one fill: the window's length, which prices the same); 0 for a policy that does not refresh."""
    if stats.window_guidance not in REFRESHING_POLICIES:
        return 0
    fills = [i for i, s in enumerate(stats.steps) if s.phase == Phase.PIPELINE_FILL]
    if not fills:
        return 0
    return fills[1] - fills[0] if len(fills) > 1 else sum(s.phase in WINDOW_PHASES for s in stats.steps)


@dataclass
class ScoredImage:
    """One HYBRID image scored against its case's exact-CFG image."""

    prompt: str
    seed: int
    policy: str
    k: int
    psnr_db: float
    ssim: float
    adheres: bool | None
    tau1: int | None
    tau1_source: str
    window_steps: int
    window_batch: int
    denoise: float
    refresh_every: int = 0


@dataclass
class Measurement:
    steps: int
    guidance: float
    lengths: list[int]
    images: list[ScoredImage] = field(default_factory=list)
    exact: dict[tuple[str, int], dict] = field(default_factory=dict)  # cfg-parallel and single, per case

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "lengths": self.lengths,
            "references": [{"prompt": p, "seed": s, **r} for (p, s), r in self.exact.items()],
            "images": [vars(i) for i in self.images],
        }

    @classmethod
    def from_json(cls, raw: dict) -> Measurement:
        """The measurement ``to_json`` wrote (a saved or partial ``frontier.json``'s ``raw``)."""
        exact = {
            (r["prompt"], r["seed"]): {k: v for k, v in r.items() if k not in ("prompt", "seed")}
            for r in raw["references"]
        }
        images = [ScoredImage(**im) for im in raw["images"]]
        return cls(raw["steps"], raw["guidance"], list(raw["lengths"]), images, exact)


def measure(
    generate: Generate,
    cases: Iterable[Case],
    lengths: list[int],
    steps: int,
    guidance: float,
    window_policies: list[WindowGuidance] | None = None,
    time_single: bool = True,
    on_image: Callable[[str], None] = lambda _: None,
    deadline: float | None = None,
    pipeline: bool = False,
    done: Measurement | None = None,
    on_case: Callable[[Measurement], None] = lambda _: None,
) -> Measurement:
    """Every policy at every window length on every case, scored against exact CFG (and PIPELINE
    when ``pipeline``); with a ``deadline`` (``time.monotonic()``), no case starts after it (the
    cases done are kept). ``done``: an earlier partial run of the same settings, whose cases are
    kept and not run again; ``on_case`` sees the measurement after each case (to save it)."""
    out = Measurement(steps, guidance, list(lengths))
    if done is not None:
        if (done.steps, done.guidance, sorted(done.lengths)) != (steps, guidance, sorted(lengths)):
            raise ValueError("the partial run to resume was measured with other steps, guidance or lengths")
        wanted = {(c.prompt, c.seed) for c in cases}  # a case not asked for now is not kept
        out.exact = {key: ref for key, ref in done.exact.items() if key in wanted}
        out.images = [im for im in done.images if (im.prompt, im.seed) in wanted]
    for case in cases:
        if (case.prompt, case.seed) in out.exact:
            continue
        if deadline is not None and time.monotonic() > deadline:
            break

        def request(mode: Mode, case: Case = case, **fields: Any) -> pb.GenerateRequest:
            return request_from_names(
                case.prompt, seed=case.seed, steps=steps, guidance_scale=guidance, mode=mode, **fields
            )

        exact = generate(request(Mode.CFG_PARALLEL))
        on_image("cfg-parallel")
        reference = {
            "cfg_parallel_denoise": exact.denoise,
            "adheres": case.check(exact.png) if case.check else None,
        }
        if time_single:
            reference["single_denoise"] = generate(request(Mode.SINGLE)).denoise
            on_image("single")
        if pipeline:
            stale = generate(request(Mode.PIPELINE))
            reference["pipeline_psnr_db"] = min(psnr(stale.png, exact.png), IDENTICAL_DB)
            reference["pipeline_ssim"] = ssim(stale.png, exact.png)
            reference["pipeline_adheres"] = case.check(stale.png) if case.check else None
            reference["pipeline_denoise"] = stale.denoise
            on_image("pipeline")
        images = []
        for policy in window_policies or policies():
            for k in lengths:
                run = generate(request(Mode.HYBRID, window_guidance=policy, hybrid={"k": k}))
                db = psnr(run.png, exact.png)
                images.append(
                    ScoredImage(
                        prompt=case.prompt,
                        seed=case.seed,
                        policy=label(policy),
                        k=k,
                        psnr_db=min(db, IDENTICAL_DB),
                        ssim=ssim(run.png, exact.png),
                        adheres=case.check(run.png) if case.check else None,
                        tau1=run.tau1,
                        tau1_source=run.tau1_source,
                        window_steps=run.window_steps,
                        window_batch=run.window_batch,
                        denoise=run.denoise,
                        refresh_every=run.refresh_every,
                    )
                )
                on_image(f"{label(policy)} k={k}")
        out.exact[(case.prompt, case.seed)] = reference  # a case counts once every image of it is in
        out.images.extend(images)
        on_case(out)
    return out


def _psnr_by(measurement: Measurement, over: Callable[[list[float]], float]) -> dict[str, dict[int, float]]:
    by: dict[str, dict[int, list[float]]] = {}
    for im in measurement.images:
        by.setdefault(im.policy, {}).setdefault(im.k, []).append(im.psnr_db)
    return {p: {k: over(v) for k, v in sorted(ks.items())} for p, ks in by.items()}


def mean_psnr(measurement: Measurement) -> dict[str, dict[int, float]]:
    """Mean PSNR against exact CFG per policy and window length (identical counts as IDENTICAL_DB)."""
    return _psnr_by(measurement, statistics.fmean)


def worst_pipeline_psnr(measurement: Measurement) -> float | None:
    """PIPELINE's lowest PSNR against exact CFG over the cases (None: not measured)."""
    values = [r["pipeline_psnr_db"] for r in measurement.exact.values() if "pipeline_psnr_db" in r]
    return min(values) if values else None


def worst_psnr(measurement: Measurement) -> dict[str, dict[int, float]]:
    """The lowest PSNR against exact CFG over the cases, per policy and window length: a floor
    holds for every image measured, not for their mean (7 dB apart on the default model)."""
    return _psnr_by(measurement, min)


# --- the schedule model's prediction ----------------------------------------------------
@dataclass(frozen=True)
class DeviceCosts:
    """What the schedule model needs of one device: compute times, tensor sizes, its link."""

    name: str
    compute: perfmodel.ComputeTimes
    tensors: perfmodel.TensorBytes
    link: perfmodel.LinkModel


def profile_device(path: str | Path, name: str, model: str = "sdxl") -> DeviceCosts:
    """The device of a committed ``hybridiff gpu-profile`` JSON (one model's profile in it)."""
    document = json.loads(Path(path).read_text())
    profile = document["models"][model]
    return DeviceCosts(
        name, compute_times(profile), tensor_bytes(profile), perfmodel.LinkModel(**document["link"])
    )


def batch_linear(device: DeviceCosts, name: str) -> DeviceCosts:
    """The same device if a batch of 2 cost twice a batch of 1 (no batching gain: the case of a
    device whose batch-1 forward already fills it), the split and link unchanged."""
    ct = device.compute
    b1 = ct.stages_b1
    b2 = perfmodel.StageTimes(2 * b1.stage1, 2 * b1.stage2, 2 * b1.pre, 2 * b1.post)
    compute = perfmodel.ComputeTimes(ct.topology, ct.forward_b1, 2 * ct.forward_b1, b1, b2, ct.update)
    return DeviceCosts(name, compute, device.tensors, device.link)


def predicted_speedups(
    device: DeviceCosts,
    steps: int,
    tau1: int,
    tau1_source: str,
    k: int,
    window_batch: int,
    refresh_every: int = 0,
) -> dict[str, float]:
    """Predicted speedup over SINGLE of HYBRID (this window; ``refresh_every``: a refreshing
    policy's period), of CFG_PARALLEL and of PIPELINE on ``device``: the one place this tool calls
    the schedule model."""
    schedule = perfmodel.ScheduleParams(
        num_steps=steps,
        tau1=tau1,
        k=k,
        tau1_source=tau1_source,
        hybrid_window_batch=window_batch,
        refresh_every=refresh_every,
    )
    modes = perfmodel.predict_modes(device.compute, device.tensors, device.link, schedule)
    return {
        mode: modes[mode]["speedup"]
        for mode in (label(Mode.HYBRID), label(Mode.CFG_PARALLEL), label(Mode.PIPELINE))
    }


# --- the frontier -----------------------------------------------------------------------
def frontier(measurement: Measurement, devices: list[DeviceCosts]) -> dict:
    """Per policy and window length: quality (mean and min PSNR, mean SSIM, adherence), window
    steps, measured CPU speedup and each device's predicted speedup (mean over the images, each
    at its own tau1)."""
    cache: dict[tuple, dict[str, float]] = {}

    def predict(device: DeviceCosts, im: ScoredImage) -> dict[str, float]:
        source = im.tau1_source if im.tau1_source in perfmodel.TAU1_SOURCES else "tau_cap"
        key = (device.name, im.tau1, source, im.k, im.window_batch, im.refresh_every)
        if key not in cache:
            cache[key] = predicted_speedups(
                device, measurement.steps, im.tau1, source, im.k, im.window_batch, im.refresh_every
            )
        return cache[key]

    refs = measurement.exact
    single = [r["single_denoise"] for r in refs.values() if "single_denoise" in r]
    out: dict[str, Any] = {"steps": measurement.steps, "policies": {}, "reference": {}}
    groups: dict[str, dict[int, list[ScoredImage]]] = {}
    for im in measurement.images:
        groups.setdefault(im.policy, {}).setdefault(im.k, []).append(im)
    for policy, by_k in groups.items():
        rows = {}
        for k, images in sorted(by_k.items()):
            adheres = [im.adheres for im in images if im.adheres is not None]
            row = {
                "psnr_db_mean": statistics.fmean(im.psnr_db for im in images),
                "psnr_db_min": min(im.psnr_db for im in images),
                "ssim_mean": statistics.fmean(im.ssim for im in images),
                "adherence": statistics.fmean(adheres) if adheres else None,
                "window_steps_mean": statistics.fmean(im.window_steps for im in images),
                "images": len(images),
                "predicted_speedup": {
                    d.name: statistics.fmean(predict(d, im)["hybrid"] for im in images if im.tau1)
                    for d in devices
                    if any(im.tau1 for im in images)
                },
            }
            if single:
                row["cpu_speedup"] = statistics.fmean(single) / statistics.fmean(im.denoise for im in images)
            rows[str(k)] = row
        out["policies"][policy] = rows
    decided = [im for im in measurement.images if im.tau1]
    out["reference"]["predicted_cfg_parallel_speedup"] = {
        d.name: statistics.fmean(predict(d, im)["cfg-parallel"] for im in decided) for d in devices if decided
    }
    if single:
        exact = [r["cfg_parallel_denoise"] for r in refs.values()]
        out["reference"]["cpu_cfg_parallel_speedup"] = statistics.fmean(single) / statistics.fmean(exact)
    checked = [r["adheres"] for r in refs.values() if r["adheres"] is not None]
    out["reference"]["cfg_parallel_adherence"] = statistics.fmean(checked) if checked else None
    out["reference"]["tau1"] = sorted({im.tau1 for im in decided})
    stale = [r for r in refs.values() if "pipeline_psnr_db" in r]
    if stale:
        out["pipeline"] = _pipeline_row(stale, decided, devices, predict, single)
    return out


def _pipeline_row(stale: list[dict], decided: list[ScoredImage], devices, predict, single) -> dict:
    """PIPELINE (full-cfg from its warm-up steps to the end; no tau1) in a policy row's form."""
    adheres = [r["pipeline_adheres"] for r in stale if r.get("pipeline_adheres") is not None]
    row = {
        "psnr_db_mean": statistics.fmean(r["pipeline_psnr_db"] for r in stale),
        "psnr_db_min": min(r["pipeline_psnr_db"] for r in stale),
        "ssim_mean": statistics.fmean(r.get("pipeline_ssim", math.nan) for r in stale),
        "adherence": statistics.fmean(adheres) if adheres else None,
        "images": len(stale),
        # its phases do not depend on tau1: any decided image's schedule prices it
        "predicted_speedup": {d.name: predict(d, decided[0])["pipeline"] for d in devices if decided},
    }
    timed = [r["pipeline_denoise"] for r in stale if "pipeline_denoise" in r]
    if single and timed:
        row["cpu_speedup"] = statistics.fmean(single) / statistics.fmean(timed)
    return row


def format_table(result: dict, devices: list[str], lengths_label: Callable[[int], str] = str) -> str:
    """A Markdown table: one row per policy and window length, then PIPELINE's when measured."""
    cpu = any("cpu_speedup" in r for rows in result["policies"].values() for r in rows.values())
    head = ["policy", "k", "window steps", "PSNR mean / min", "SSIM", "adherence"]
    head += [f"{d} (pred.)" for d in devices] + (["CPU (measured)"] if cpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, rows in result["policies"].items():
        for k, r in rows.items():
            lines.append(
                _row([policy, lengths_label(int(k)), f"{r['window_steps_mean']:.1f}"], r, devices, cpu)
            )
    if "pipeline" in result:
        stale = f"{result['steps'] - PIPELINE_WARMUP_STEPS}"
        lines.append(_row(["PIPELINE (mode)", "-", stale], result["pipeline"], devices, cpu))
    return "\n".join(lines)


def _row(first: list[str], r: dict, devices: list[str], cpu: bool) -> str:
    cells = [
        *first,
        f"{_db(r['psnr_db_mean'])} / {_db(r['psnr_db_min'])}",
        f"{r['ssim_mean']:.4f}",
        "-" if r["adherence"] is None else f"{r['adherence']:.0%}",
    ]
    cells += [f"{r['predicted_speedup'].get(d, math.nan):.2f}x" for d in devices]
    if cpu:
        cells.append(f"{r['cpu_speedup']:.2f}x" if "cpu_speedup" in r else "-")
    return "| " + " | ".join(cells) + " |"


def _db(value: float) -> str:
    return "identical" if value >= IDENTICAL_DB else f"{value:.1f}"

"""``hybridiff calibrate``: measure how far each window policy's image strays from exact CFG per
window length on one model, and record it in the model's ``hybridiff.json``
(``hybridiff.calibration``; docs/design.md section 7).

A small frontier (``hybridiff_tools.bench.frontier``): a few prompts and seeds (the held-out
prompts on the default model, generic ones elsewhere), every policy at a few window lengths, at
the model's default steps and guidance, on the in-process engine (the cluster's images, without
starting servers). The record keeps, per policy and length, the lowest PSNR over the cases (the
floor holds for every image calibrated, not for their mean), and PIPELINE's; the longest window
each policy keeps above the floor follows from it (``Calibration.max_window``). A calibration at
another step count already in the file is kept beside the new one (``Calibration.judging``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from hybridiff.calibration import (
    QUALITY_FLOOR_DB,
    Calibration,
    CalibrationError,
    PolicyCalibration,
    read_calibration,
    write_calibration,
)
from hybridiff.protocol import WindowGuidance, label, parse
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_launch.model_dirs import add_model_flags, default_model_dir, resolve_model
from hybridiff_tools.bench.frontier import (
    GENERIC_PROMPTS,
    Case,
    Generate,
    Measurement,
    default_lengths,
    measure,
    parse_lengths,
    run_from,
    worst_pipeline_psnr,
    worst_psnr,
)
from hybridiff_tools.shapes.evaluate import EVAL_SEEDS
from hybridiff_tools.shapes.grammar import held_out_prompts


def calibration_cases(held_out: bool, prompts: int, seeds: int) -> list[Case]:
    texts = [c.text for c in held_out_prompts()] if held_out else list(GENERIC_PROMPTS)
    return [Case(text, seed) for text in texts[:prompts] for seed in EVAL_SEEDS[:seeds]]


def engine_generate(engine: InProcessEngine) -> Generate:
    def generate(request):
        result = engine.generate(engine.resolve(request))
        return run_from(result.images[0], result.stats)

    return generate


def calibrate(
    engine: InProcessEngine,
    cases: list[Case],
    lengths: list[int] | None = None,
    floor_db: float = QUALITY_FLOOR_DB,
    steps: int | None = None,
    guidance: float | None = None,
    command: str = "",
    on_image=lambda _: None,
) -> Calibration:
    """Measure every policy at every length (default: ``default_lengths`` of the steps) on
    ``cases`` at the model's default steps and guidance unless given."""
    steps = steps or engine.defaults.steps
    guidance = engine.defaults.guidance_scale if guidance is None else guidance
    lengths = lengths or default_lengths(steps)
    measured = measure(
        engine_generate(engine),
        cases,
        lengths,
        steps,
        guidance,
        time_single=False,
        on_image=on_image,
        pipeline=True,
    )
    return calibration_from(measured, floor_db, command)


def calibration_from(
    measured: Measurement, floor_db: float = QUALITY_FLOOR_DB, command: str = ""
) -> Calibration:
    """The record of a measurement: per policy and length the worst image's PSNR, and PIPELINE's."""
    policies = {
        parse(WindowGuidance, name): PolicyCalibration(psnr) for name, psnr in worst_psnr(measured).items()
    }
    extra = {"command": command} if command else {}
    extra["psnr"] = "the lowest over the cases"
    extra["window_steps"] = {  # the window each length opened (mean over the cases: clamped at the end)
        name: {str(k): round(v, 2) for k, v in steps_by_k.items()}
        for name, steps_by_k in _window_steps(measured).items()
    }
    return Calibration(
        floor_db=floor_db,
        num_steps=measured.steps,
        guidance_scale=measured.guidance,
        policies=policies,
        prompts=len({p for p, _ in measured.exact}),
        seeds=len({s for _, s in measured.exact}),
        extra=extra,
        pipeline_db=worst_pipeline_psnr(measured),
        tau1=median_tau1(measured),
    )


def median_tau1(measured: Measurement) -> int | None:
    """Where the windows opened, the median over every image (a tau_cap fallback counted at its
    tau_cap: where most fell back, the median is tau_cap and AUTO prices from it); None when no
    image opened one."""
    opened = [im.tau1 for im in measured.images if im.tau1 is not None]
    return round(statistics.median(opened)) if opened else None


def _window_steps(measured) -> dict[str, dict[int, float]]:
    by: dict[str, dict[int, list[int]]] = {}
    for im in measured.images:
        by.setdefault(im.policy, {}).setdefault(im.k, []).append(im.window_steps)
    return {p: {k: sum(v) / len(v) for k, v in sorted(ks.items())} for p, ks in by.items()}


def format_calibration(calibration: Calibration) -> str:
    c = calibration
    lines = [f"floor {c.floor_db:g} dB, {c.num_steps} steps, guidance {c.guidance_scale:g}"]
    for policy, measured in sorted(calibration.policies.items()):
        points = ", ".join(f"k={k}: {db:.1f}" for k, db in sorted(measured.psnr_db.items()))
        longest = measured.max_window(c.floor_db)
        lines.append(f"  {label(policy):16} longest window above the floor: {longest:3d}   ({points} dB)")
    if c.tau1 is not None:
        lines.append(
            f"  the slope rule opened the window at step {c.tau1} (median): AUTO prices windows from there"
        )
    if c.pipeline_db is not None:
        verdict = "above" if c.pipeline_allowed() else "below"
        lines.append(f"  {'pipeline':16} {verdict} the floor: {c.pipeline_db:.1f} dB")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybridiff calibrate", description=__doc__.split("\n\n")[0])
    add_model_flags(p, served_name=False)
    p.add_argument(
        "--prompts",
        type=int,
        default=8,
        help="prompts (at most the 8 held-out ones, or the 4 generic ones); with 2 seeds, 16 images: "
        "on the default model 6 allowed windows 4x too long, 16 gave the 32-image record",
    )
    p.add_argument("--seeds", type=int, default=2, help=f"at most {len(EVAL_SEEDS)}")
    p.add_argument(
        "--lengths",
        default=None,
        help="comma-separated window lengths (default: a ladder to ~60%% of the steps, then all)",
    )
    p.add_argument("--steps", type=int, default=None, help="default: the model's default steps")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's default guidance")
    p.add_argument("--floor-db", type=float, default=QUALITY_FLOOR_DB)
    p.add_argument("--dry-run", action="store_true", help="print the calibration, do not write it")
    p.add_argument(
        "--from-frontier",
        type=Path,
        default=None,
        help="record the measurement of a `hybridiff frontier` run (its frontier.json) instead of measuring",
    )
    args = p.parse_args(argv)
    if not 1 <= args.seeds <= len(EVAL_SEEDS) or args.prompts < 1:
        p.error(f"--seeds must be 1..{len(EVAL_SEEDS)} and --prompts >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model_dir = Path(resolve_model(args)[0] if args.model else default_model_dir())
    if not model_dir.is_dir():
        print(
            f"error: calibrate records into a model folder's hybridiff.json; {model_dir} is not one",
            file=sys.stderr,
        )
        return 2
    if args.from_frontier:
        return record_frontier(model_dir, args, argv)
    held_out = model_dir.resolve() == default_model_dir().resolve()
    cases = calibration_cases(held_out, args.prompts, args.seeds)
    engine = InProcessEngine(model_dir, variant=args.variant)
    started = time.perf_counter()
    try:
        steps = args.steps or engine.defaults.steps
        try:
            lengths = parse_lengths(args.lengths, steps) if args.lengths else None
        except ValueError as exc:
            print(f"error: --lengths: {exc}", file=sys.stderr)
            return 2
        calibration = calibrate(
            engine,
            cases,
            lengths,
            args.floor_db,
            steps,
            args.guidance,
            command="hybridiff calibrate " + " ".join(argv),
            on_image=lambda what: print(f"  {what}", file=sys.stderr, flush=True),
        )
    finally:
        engine.close()
    print(format_calibration(calibration))
    if not args.dry_run:
        path = record(model_dir, calibration)
        print(f"wrote the calibration into {path} ({time.perf_counter() - started:.0f}s)")
    return 0


def record(model_dir: Path, calibration: Calibration) -> Path:
    """Write ``calibration`` into the model's file, keeping its calibrations at other step counts
    (an unreadable earlier record is replaced)."""
    try:
        earlier = read_calibration(model_dir)
    except CalibrationError:
        earlier = None
    return write_calibration(model_dir, calibration.merged(earlier))


def record_frontier(model_dir: Path, args: argparse.Namespace, argv: list[str]) -> int:
    """``--from-frontier``: a frontier run of this model (PIPELINE measured) as its calibration (the
    same folder, or the embedded default model in any clone: its held-out prompts were run)."""
    document = json.loads(args.from_frontier.read_text())
    embedded = document.get("held_out_prompts") and model_dir.resolve() == default_model_dir().resolve()
    if Path(document["model_dir"]).resolve() != model_dir.resolve() and not embedded:
        print(
            f"error: {args.from_frontier} measured {document['model_dir']}, not {model_dir}", file=sys.stderr
        )
        return 2
    measured = Measurement.from_json(document["raw"])
    if worst_pipeline_psnr(measured) is None:
        print(
            f"error: {args.from_frontier} has no PIPELINE images (a frontier run before they were kept)",
            file=sys.stderr,
        )
        return 2
    command = f"{document['command']}, recorded by hybridiff calibrate " + " ".join(argv)
    calibration = calibration_from(measured, args.floor_db, command)
    print(format_calibration(calibration))
    if not args.dry_run:
        print(f"wrote the calibration into {record(model_dir, calibration)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

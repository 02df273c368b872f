"""``hybridiff predict``: what cost-aware AUTO would run on a device, from a GPU profile
(``hybridiff gpu-profile``'s JSON: a forward and each stage at batch 1 and 2, the link) and a
model's calibration, with the predicted speedup against one worker and against the plain CFG
split (docs/design.md section 10). No GPU, no model weights: the schedule model only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coordinator.auto_mode import AutoChoice, DeviceCosts, choose
from coordinator.latency_model import ComputeTimes, LinkModel, StageTimes, TensorBytes
from hybridiff.calibration import Calibration, read_calibration
from hybridiff.errors import InvalidArgument
from hybridiff.request import MODEL_DEFAULTS_FILE, ModelDefaults, model_defaults
from hybridiff_launch.model_dirs import default_model_dir


def profile_costs(profile: dict, arch: str) -> DeviceCosts:
    """The costs a GPU profile measured for ``arch``, with its link model."""
    try:
        m = profile["models"][arch]
        t, topology = m["times"], m["topology"]

        def stages(b: str) -> StageTimes:
            if topology == "nested":
                return StageTimes.nested(t[f"pre_{b}"], t[f"stage2_{b}"], t[f"post_{b}"])
            return StageTimes(t[f"stage1_{b}"], t[f"stage2_{b}"])

        compute = ComputeTimes(topology, t["forward_b1"], t["forward_b2"], stages("b1"), stages("b2"))
        return DeviceCosts(compute, TensorBytes(**m["bytes"]), LinkModel(**profile["link"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument("profile", f"no usable {arch} costs in the profile: {exc!r}") from None


def model_record(model_dir: Path, arch: str) -> tuple[ModelDefaults, Calibration | None]:
    """A model directory's defaults (as an ``arch`` model: the profile's architecture) and calibration."""
    path = model_dir / MODEL_DEFAULTS_FILE
    document = json.loads(path.read_text()) if path.is_file() else {}
    return model_defaults(arch, document.get("defaults")), read_calibration(model_dir)


def predict(profile: dict, arch: str, model_dir: Path, steps: int | None = None) -> dict:
    """AUTO's choice for ``arch`` on the profiled device with the model's calibration, JSON-ready."""
    defaults, calibration = model_record(model_dir, arch)
    num_steps = steps or defaults.steps
    choice: AutoChoice = choose(profile_costs(profile, arch), calibration, num_steps, defaults.hybrid)
    return {
        "arch": arch,
        "device": profile.get("device", {}).get("name", ""),
        "cuda_graphs": bool(profile.get("cuda_graphs", False)),
        "model": str(model_dir),
        "calibrated": calibration is not None,
        # the calibration the request is judged by (its step count; where it saw the window open)
        "calibration_steps": None if calibration is None else calibration.for_steps(num_steps).num_steps,
        "expected_tau1": None
        if calibration is None
        else calibration.expected_tau1(num_steps, defaults.hybrid.tau_cap, defaults.hybrid.l_slope)[0],
        "num_steps": num_steps,
        "tau_cap": defaults.hybrid.tau_cap,
        "choice": choice.to_dict(),
        "predicted_seconds": choice.predicted_seconds,
        "speedup_vs_single": choice.speedup_vs_single,
        "speedup_vs_cfg_parallel": choice.speedup_vs_cfg_parallel,
    }


def describe(result: dict) -> str:
    c = result["choice"]
    what = c["mode"]
    if c["mode"] == "hybrid":
        what += f", window {c['window_guidance']} (k={c['k']}: at most {c['window_steps']} steps"
        what += f", refreshed every {c['refresh_every']})" if c.get("refresh_every") else ")"
    elif c["window_guidance"]:
        what += f", window {c['window_guidance']} ({c['window_steps']} steps)"
    graphs = ", CUDA graphs" if result["cuda_graphs"] else ""
    return "\n".join(
        [
            f"{result['arch']} on {result['device'] or 'the profiled device'}{graphs}: "
            f"{result['num_steps']} steps, model {result['model']}",
            f"AUTO: {what}; {c['basis']}"
            + (
                f" (calibrated at {result['calibration_steps']} steps)"
                if result.get("calibration_steps")
                else ""
            ),
            f"  predicted {c['predicted_seconds']:.3f}s denoising: "
            f"{result['speedup_vs_single']:.2f}x one worker ({c['single_seconds']:.3f}s), "
            f"{result['speedup_vs_cfg_parallel']:.2f}x cfg-parallel "
            f"({c['cfg_parallel_seconds']:.3f}s)",
        ]
    )


def run(args: argparse.Namespace) -> int:
    try:
        profile = json.loads(Path(args.profile).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument("profile", f"cannot read {args.profile}: {exc}") from None
    if args.steps is not None and args.steps < 1:
        raise InvalidArgument("steps", f"must be >= 1, got {args.steps}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    result = predict(profile, args.arch, model_dir, args.steps)
    print(json.dumps(result, indent=1) if args.json else describe(result), file=sys.stdout)
    return 0

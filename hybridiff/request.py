"""The generation request as both roles see it, and its validation (DESIGN sections 3 and 5).

``GenerationSpec`` is the fully resolved request (defaults applied, every field checked);
``resolve_spec`` turns user input into one or raises ``InvalidArgument`` naming the field.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from hybridiff.errors import InvalidArgument

MAX_STEPS = 500
MAX_PROMPT_CHARS = 4000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 1
MODES = ("auto", "single", "cfg-parallel", "pipeline", "hybrid")
WINDOW_GUIDANCE = ("default", "conditional", "last-difference", "full-cfg")
OUTPUT_FORMATS = ("png", "raw-latents")


@dataclass(frozen=True)
class HybridParams:
    l_slope: int
    eps_slope: float
    k: int
    tau_cap: int

    def validate(self) -> "HybridParams":
        """Range-check every parameter; ``InvalidArgument`` names the first bad one."""
        _check_int("hybrid.l_slope", self.l_slope, 1, 1000)
        eps = self.eps_slope
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps <= 1):
            raise InvalidArgument("hybrid.eps_slope", f"must be in (0, 1], got {eps!r}")
        _check_int("hybrid.k", self.k, 0, 1000)
        _check_int("hybrid.tau_cap", self.tau_cap, 1, 1000)
        return self


@dataclass(frozen=True)
class ModelDefaults:
    hybrid: HybridParams
    steps: int
    guidance_scale: float


# Reference defaults (DESIGN section 1).
MODEL_DEFAULTS = {
    "sdxl": ModelDefaults(HybridParams(l_slope=12, eps_slope=4e-4, k=5, tau_cap=15), steps=50, guidance_scale=5.0),
    "sd3": ModelDefaults(HybridParams(l_slope=15, eps_slope=5e-4, k=5, tau_cap=40), steps=50, guidance_scale=7.0),
}


MODEL_DEFAULTS_FILE = "hybridiff.json"  # optional, in a model directory: {"defaults": {...}}


def model_defaults(arch: str, recorded: dict | None = None) -> ModelDefaults:
    """The architecture's defaults, overridden by what a model directory records for itself
    (``{"steps": 50, "guidance_scale": 5.0, "hybrid": {"l_slope": ..., ...}}``)."""
    base = MODEL_DEFAULTS[arch]
    if not recorded:
        return base
    hybrid = {**vars(base.hybrid), **recorded.get("hybrid", {})}
    return ModelDefaults(
        HybridParams(int(hybrid["l_slope"]), float(hybrid["eps_slope"]), int(hybrid["k"]),
                     int(hybrid["tau_cap"])).validate(),
        steps=int(recorded.get("steps", base.steps)),
        guidance_scale=float(recorded.get("guidance_scale", base.guidance_scale)),
    )


@dataclass(frozen=True)
class SizeLimits:
    """What sizes a model accepts: sides are multiples of ``multiple`` within [min_side, max_side]."""

    multiple: int
    min_side: int
    max_side: int
    default_side: int


@dataclass(frozen=True)
class GenerationSpec:
    request_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    seed: int
    mode: str
    l_slope: int
    eps_slope: float
    k: int
    tau_cap: int
    window_guidance: str
    output_format: str = "png"
    model: str = ""

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (two branches) — as diffusers: ``guidance_scale > 1``."""
        return self.guidance_scale > 1.0


@dataclass
class RequestInput:
    """Raw user input; None means "the model's default" (0 is a value, and out of range)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    mode: str = "auto"
    l_slope: int | None = None
    eps_slope: float | None = None
    k: int | None = None
    tau_cap: int | None = None
    window_guidance: str = "default"
    output_format: str = "png"
    request_id: str = ""
    model: str = ""


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(name, f"must be in {lo}..{hi}, got {value}")
    return value


def _default(value, default):
    return default if value is None else value


def _check_side(name: str, value: int | None, limits: SizeLimits) -> int:
    value = _check_int(name, _default(value, limits.default_side), 1, 1 << 20)
    if value % 8 != 0:
        raise InvalidArgument(name, f"must be a multiple of 8, got {value}")
    if value % limits.multiple != 0:
        raise InvalidArgument(name, f"must be a multiple of {limits.multiple} for this model, got {value}")
    if not limits.min_side <= value <= limits.max_side:
        raise InvalidArgument(name, f"must be in {limits.min_side}..{limits.max_side} for this model, got {value}")
    return value


def resolve_spec(raw: RequestInput, limits: SizeLimits, defaults) -> GenerationSpec:
    """Validate ``raw`` against the model's limits and fill in ``defaults`` (a ModelDefaults)."""
    if not isinstance(raw.prompt, str) or not raw.prompt.strip():
        raise InvalidArgument("prompt", "must be a non-empty string")
    if len(raw.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    if len(raw.negative_prompt or "") > MAX_PROMPT_CHARS:
        raise InvalidArgument("negative_prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    width = _check_side("width", raw.width, limits)
    height = _check_side("height", raw.height, limits)
    steps = _check_int("num_inference_steps", _default(raw.num_steps, defaults.steps), 1, MAX_STEPS)
    guidance = _default(raw.guidance_scale, defaults.guidance_scale)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance!r}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument("guidance_scale", f"must be in 0..{MAX_GUIDANCE}, got {guidance}")
    seed = _check_int("seed", raw.seed, 0, MAX_SEED)
    if raw.mode not in MODES:
        raise InvalidArgument("mode", f"unknown mode {raw.mode!r}; expected one of {', '.join(MODES)}")
    if raw.window_guidance not in WINDOW_GUIDANCE:
        raise InvalidArgument("window_guidance", f"unknown policy {raw.window_guidance!r}; expected one of {', '.join(WINDOW_GUIDANCE)}")
    if raw.output_format not in OUTPUT_FORMATS:
        raise InvalidArgument("output_format", f"unknown format {raw.output_format!r}")
    d = defaults.hybrid
    params = HybridParams(
        l_slope=_default(raw.l_slope, d.l_slope), eps_slope=_default(raw.eps_slope, d.eps_slope),
        k=_default(raw.k, d.k), tau_cap=_default(raw.tau_cap, d.tau_cap),
    ).validate()
    request_id = raw.request_id or uuid.uuid4().hex
    if len(request_id) > 128 or not request_id.isprintable():
        raise InvalidArgument("request_id", "must be at most 128 printable characters")
    return GenerationSpec(
        request_id=request_id, prompt=raw.prompt, negative_prompt=raw.negative_prompt or None,
        width=width, height=height, num_steps=steps, guidance_scale=float(guidance), seed=seed,
        mode=raw.mode, l_slope=params.l_slope, eps_slope=float(params.eps_slope), k=params.k,
        tau_cap=params.tau_cap,
        window_guidance=raw.window_guidance, output_format=raw.output_format, model=raw.model,
    )

"""The generation request as the coordinator resolves it, and its validation
(docs/design.md sections 3 and 5).

``RequestInput`` is what a user asked for (None: the model's default); ``resolve_spec`` checks
every field against the model's limits and fills in its defaults, giving a ``GenerationSpec``,
or raises ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, field, fields

from hybridiff.errors import InvalidArgument
from hybridiff.protocol import Mode, OutputFormat, WindowGuidance

MAX_STEPS = 500
MAX_PROMPT_CHARS = 4000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 1
MAX_REQUEST_ID_CHARS = 128
DEFAULT_QUALITY = 90
DEFAULT_MAX_IMAGES = 4


@dataclass(frozen=True)
class HybridParams:
    """The hybrid schedule's parameters (docs/design.md section 1)."""

    l_slope: int
    eps_slope: float
    k: int
    tau_cap: int

    def validate(self) -> HybridParams:
        """Range-check every parameter; ``InvalidArgument`` names the first bad one."""
        _check_int("hybrid.l_slope", self.l_slope, 1, 1000)
        eps = self.eps_slope
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not (math.isfinite(eps) and 0 < eps <= 1)
        ):
            raise InvalidArgument("hybrid.eps_slope", f"must be in (0, 1], got {eps!r}")
        _check_int("hybrid.k", self.k, 0, 1000)
        _check_int("hybrid.tau_cap", self.tau_cap, 1, 1000)
        return self

    def replace(self, **overrides: int | float | None) -> HybridParams:
        """These parameters with every override that is not None."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return HybridParams(**values)


@dataclass(frozen=True)
class ModelDefaults:
    hybrid: HybridParams
    steps: int
    guidance_scale: float


# Reference defaults (docs/design.md section 1).
MODEL_DEFAULTS = {
    "sdxl": ModelDefaults(
        HybridParams(l_slope=12, eps_slope=4e-4, k=5, tau_cap=15), steps=50, guidance_scale=5.0
    ),
    "sd3": ModelDefaults(
        HybridParams(l_slope=15, eps_slope=5e-4, k=5, tau_cap=40), steps=50, guidance_scale=7.0
    ),
}

MODEL_DEFAULTS_FILE = "hybridiff.json"  # optional, in a model directory: {"defaults": {...}}


def model_defaults(arch: str, recorded: dict | None = None) -> ModelDefaults:
    """The architecture's defaults, overridden by what a model directory records for itself
    (``{"steps": 50, "guidance_scale": 5.0, "hybrid": {"l_slope": ..., ...}}``)."""
    base = MODEL_DEFAULTS[arch]
    if not recorded:
        return base
    hybrid = recorded.get("hybrid", {})
    return ModelDefaults(
        base.hybrid.replace(
            **{k: hybrid.get(k) for k in ("l_slope", "k", "tau_cap")},
            eps_slope=float(hybrid["eps_slope"]) if "eps_slope" in hybrid else None,
        ).validate(),
        steps=int(recorded.get("steps", base.steps)),
        guidance_scale=float(recorded.get("guidance_scale", base.guidance_scale)),
    )


@dataclass(frozen=True)
class SizeLimits:
    """What a model accepts: sides are multiples of ``multiple`` within [min_side, max_side];
    at most ``max_images`` images per request."""

    multiple: int
    min_side: int
    max_side: int
    default_side: int
    max_images: int = DEFAULT_MAX_IMAGES


@dataclass(frozen=True)
class GenerationSpec:
    """A request with every default resolved and every field checked."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    seed: int
    mode: Mode
    hybrid: HybridParams
    window_guidance: WindowGuidance | None = None  # None: the mode's default
    output_format: OutputFormat = OutputFormat.PNG
    quality: int = DEFAULT_QUALITY
    num_images: int = 1
    model: str = ""

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (two branches) — as diffusers: ``guidance_scale > 1``."""
        return self.guidance_scale > 1.0


@dataclass
class RequestInput:
    """Raw user input; None means "the model's default" (0 is a value, and out of range).
    Enum fields take the enums or their wire numbers (0: the default)."""

    prompt: str = ""
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None  # None: a random seed, reported back
    mode: int = Mode.AUTO
    hybrid: dict[str, int | float | None] = field(default_factory=dict)  # l_slope, eps_slope, k, tau_cap
    window_guidance: int = 0
    output_format: int = OutputFormat.PNG
    quality: int = 0
    num_images: int = 1
    request_id: str = ""
    model: str = ""


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(name, f"must be in {lo}..{hi}, got {value}")
    return value


def _check_enum(name: str, enum, value: object, unset=None):
    if value == 0 and unset is not None:
        return unset
    try:
        return enum(value)
    except ValueError:
        raise InvalidArgument(
            name, f"unknown value {value!r}; expected one of {', '.join(v.name for v in enum)}"
        ) from None


def _default(value, default):
    return default if value is None else value


def _check_side(name: str, value: int | None, limits: SizeLimits) -> int:
    value = _check_int(name, _default(value, limits.default_side), 1, 1 << 20)
    if value % 8 != 0:
        raise InvalidArgument(name, f"must be a multiple of 8, got {value}")
    if value % limits.multiple != 0:
        raise InvalidArgument(name, f"must be a multiple of {limits.multiple} for this model, got {value}")
    if not limits.min_side <= value <= limits.max_side:
        raise InvalidArgument(
            name, f"must be in {limits.min_side}..{limits.max_side} for this model, got {value}"
        )
    return value


def _check_prompt(name: str, value: object, required: bool) -> None:
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidArgument(name, "must be a non-empty string" if required else "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidArgument(name, f"longer than {MAX_PROMPT_CHARS} characters")


def resolve_spec(raw: RequestInput, limits: SizeLimits, defaults: ModelDefaults) -> GenerationSpec:
    """Validate ``raw`` against the model's limits and fill in its ``defaults``."""
    _check_prompt("prompt", raw.prompt, required=True)
    if raw.negative_prompt is not None:
        _check_prompt("negative_prompt", raw.negative_prompt, required=False)
    width = _check_side("width", raw.width, limits)
    height = _check_side("height", raw.height, limits)
    steps = _check_int("num_inference_steps", _default(raw.num_steps, defaults.steps), 1, MAX_STEPS)
    guidance = _default(raw.guidance_scale, defaults.guidance_scale)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance!r}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument("guidance_scale", f"must be in 0..{MAX_GUIDANCE}, got {guidance}")
    seed = secrets.randbits(63) if raw.seed is None else _check_int("seed", raw.seed, 0, MAX_SEED)
    mode = _check_enum("mode", Mode, raw.mode, unset=Mode.AUTO)
    policy = (
        None
        if raw.window_guidance == 0
        else _check_enum("window_guidance", WindowGuidance, raw.window_guidance)
    )
    output_format = _check_enum("output_format", OutputFormat, raw.output_format, unset=OutputFormat.PNG)
    quality = DEFAULT_QUALITY if raw.quality == 0 else _check_int("quality", raw.quality, 1, 100)
    num_images = _check_int("num_images", raw.num_images or 1, 1, limits.max_images)
    unknown = set(raw.hybrid) - {"l_slope", "eps_slope", "k", "tau_cap"}
    if unknown:
        raise InvalidArgument(f"hybrid.{sorted(unknown)[0]}", "unknown hybrid parameter")
    hybrid = defaults.hybrid.replace(**raw.hybrid).validate()
    request_id = raw.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return GenerationSpec(
        request_id=request_id,
        prompt=raw.prompt,
        negative_prompt=raw.negative_prompt,
        width=width,
        height=height,
        num_steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        mode=mode,
        hybrid=hybrid,
        window_guidance=policy,
        output_format=output_format,
        quality=quality,
        num_images=num_images,
        model=raw.model,
    )

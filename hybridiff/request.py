"""The generation request as the coordinator resolves it, and its validation
(docs/design.md sections 3 and 5).

The public ``GenerateRequest`` is what a user asked for (an unset field: the model's default;
``request_from_names`` builds one from Python values); ``resolve_spec`` checks every field
against the model's limits and fills in its defaults, giving a ``GenerationSpec``, or raises
``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, fields
from enum import IntEnum

from hybridiff.errors import InvalidArgument
from hybridiff.protocol import Mode, OutputFormat, WindowGuidance, parse
from hybridiff.v1 import diffusion_pb2 as pb

MAX_STEPS = 500
MAX_PROMPT_CHARS = 4000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 1
MAX_REQUEST_ID_CHARS = 128
DEFAULT_QUALITY = 90
DEFAULT_MAX_IMAGES = 4


# The refreshing window policies' period (docs/design.md section 7; BENCHMARKS.md measures it).
DEFAULT_REFRESH_EVERY = 5


@dataclass(frozen=True)
class HybridParams:
    """The hybrid schedule's parameters (docs/design.md section 1)."""

    l_slope: int
    eps_slope: float
    k: int
    tau_cap: int
    # ``refreshed-difference``, ``extrapolated-difference``: every m-th window step measures
    # e_c - e_u again.
    refresh_every: int = DEFAULT_REFRESH_EVERY

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
        _check_int("hybrid.refresh_every", self.refresh_every, 1, 1000)
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
            **{k: hybrid.get(k) for k in ("l_slope", "k", "tau_cap", "refresh_every")},
            eps_slope=float(hybrid["eps_slope"]) if "eps_slope" in hybrid else None,
        ).validate(),
        steps=int(recorded.get("steps", base.steps)),
        guidance_scale=float(recorded.get("guidance_scale", base.guidance_scale)),
    )


def side_multiple(model_multiple: int) -> int:
    """The multiple every width and height must be: 8 (whole latent pixels) and the model's own
    (its UNet's or patch size's), so their least common multiple: what ``ModelInfo.size_multiple``
    reports, the rule ``_check_side`` applies."""
    return math.lcm(8, max(model_multiple, 1))


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
    hybrid_set: frozenset[str] = frozenset()  # the hybrid parameters the request itself set

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (two branches) — as diffusers: ``guidance_scale > 1``."""
        return self.guidance_scale > 1.0


HYBRID_FIELDS = ("l_slope", "eps_slope", "k", "tau_cap", "refresh_every")


def wire_enum(enum: type[IntEnum], value: str | int | None, field: str) -> int:
    """An enum's wire number from the enum, its number or its edge name ("cfg-parallel");
    None, 0, "" or "default": unset."""
    if not value or value == "default":
        return 0
    try:
        return int(parse(enum, value)) if isinstance(value, str) else int(value)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None


def request_from_names(
    prompt: str,
    *,
    negative_prompt: str | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int | None = None,
    mode: str | int | None = None,
    hybrid: dict[str, int | float | None] | None = None,
    window_guidance: str | int | None = None,
    output_format: str | int | None = None,
    quality: int | None = None,
    model: str = "",
    request_id: str = "",
) -> pb.GenerateRequest:
    """The public request from Python values, as the CLI, the clients and the tools name them:
    None leaves a field unset (the model's default); enums take their edge names
    (``mode="cfg-parallel"``), numbers or values. A value the wire cannot carry (a negative seed,
    a count past 2**32) raises ``InvalidArgument`` naming the field, as the server would."""
    req = pb.GenerateRequest()
    for name, value in (
        ("model", model),
        ("prompt", prompt),
        ("negative_prompt", negative_prompt),
        ("width", width),
        ("height", height),
        ("num_inference_steps", steps),
        ("guidance_scale", guidance_scale),
        ("seed", seed),
        ("mode", wire_enum(Mode, mode, "mode")),
        ("request_id", request_id),
        ("window_guidance", wire_enum(WindowGuidance, window_guidance, "window_guidance")),
        ("output_format", wire_enum(OutputFormat, output_format, "output_format")),
        ("quality", quality),
        ("num_images", num_images),
    ):
        if value is not None:
            _set(req, name, value, name)
    for name, value in (hybrid or {}).items():
        if value is not None:
            _set(req.hybrid, name, value, f"hybrid.{name}")
    return req


def _set(message, name: str, value: object, path: str) -> None:
    if name not in message.DESCRIPTOR.fields_by_name:
        raise InvalidArgument(path, "unknown field")
    try:
        setattr(message, name, value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(path, f"cannot send {value!r}: {exc}") from None


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


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


def side_problem(side: int, limits: SizeLimits) -> str | None:
    """What is wrong with an image side for a model (None: nothing): the one rule the
    coordinator's validation, a worker's Begin and its MeasureSplit apply."""
    if side % 8 != 0:
        return f"must be a multiple of 8, got {side}"
    if side % limits.multiple != 0:
        return f"must be a multiple of {limits.multiple} for this model, got {side}"
    if not limits.min_side <= side <= limits.max_side:
        return f"must be in {limits.min_side}..{limits.max_side} for this model, got {side}"
    return None


def _check_side(name: str, value: int | None, limits: SizeLimits) -> int:
    value = _check_int(name, _default(value, limits.default_side), 1, 1 << 20)
    problem = side_problem(value, limits)
    if problem:
        raise InvalidArgument(name, problem)
    return value


def _check_prompt(name: str, value: object, required: bool) -> None:
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidArgument(name, "must be a non-empty string" if required else "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidArgument(name, f"longer than {MAX_PROMPT_CHARS} characters")


def resolve_spec(
    req: pb.GenerateRequest, limits: SizeLimits, defaults: ModelDefaults, model: str | None = None
) -> GenerationSpec:
    """Validate ``req`` against the model's limits and fill in its ``defaults``; ``model``: the
    served model's name (default: the request's)."""
    _check_prompt("prompt", req.prompt, required=True)
    negative_prompt = _optional(req, "negative_prompt")
    if negative_prompt is not None:
        _check_prompt("negative_prompt", negative_prompt, required=False)
    width = _check_side("width", _optional(req, "width"), limits)
    height = _check_side("height", _optional(req, "height"), limits)
    steps = _check_int(
        "num_inference_steps", _default(_optional(req, "num_inference_steps"), defaults.steps), 1, MAX_STEPS
    )
    guidance = _default(_optional(req, "guidance_scale"), defaults.guidance_scale)
    if not math.isfinite(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance!r}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument("guidance_scale", f"must be in 0..{MAX_GUIDANCE}, got {guidance}")
    seed = _optional(req, "seed")
    seed = secrets.randbits(63) if seed is None else _check_int("seed", seed, 0, MAX_SEED)
    mode = _check_enum("mode", Mode, req.mode, unset=Mode.AUTO)
    policy = (
        None
        if req.window_guidance == 0
        else _check_enum("window_guidance", WindowGuidance, req.window_guidance)
    )
    output_format = _check_enum("output_format", OutputFormat, req.output_format, unset=OutputFormat.PNG)
    quality = DEFAULT_QUALITY if req.quality == 0 else _check_int("quality", req.quality, 1, 100)
    num_images = _check_int("num_images", req.num_images or 1, 1, limits.max_images)
    requested = {name: _optional(req.hybrid, name) for name in HYBRID_FIELDS}
    hybrid = defaults.hybrid.replace(**requested).validate()
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return GenerationSpec(
        request_id=request_id,
        prompt=req.prompt,
        negative_prompt=negative_prompt,
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
        model=req.model if model is None else model,
        hybrid_set=frozenset(name for name, value in requested.items() if value is not None),
    )

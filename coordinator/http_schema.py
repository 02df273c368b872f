"""The HTTP edge's request and response bodies: the OpenAI Images API's shapes, with our fields
beside them as the peers add theirs (docs/design.md section 3).

One module of pydantic models, as ``vllm/entrypoints/openai/protocol.py`` keeps them: the
handlers in ``coordinator.http_api`` only convert between these and the runner's
``GenerateRequest`` / ``Generation``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridiff.errors import InvalidArgument
from hybridiff.request import request_from_names
from hybridiff.v1 import diffusion_pb2 as pb

MAX_PARTIAL_IMAGES = 3

# Proto field names (what ``InvalidArgument.field`` names) -> the HTTP body's parameter names.
HTTP_PARAMS = {
    "num_images": "n",
    "width": "size",
    "height": "size",
    "quality": "output_compression",
    "request_id": "x-request-id",
}


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, then ours. A field not listed is refused
    (400 naming it), as OpenAI refuses an unknown parameter."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw (at most 4000 characters).")
    model: str | None = Field(
        None, description="A served model's name (GET /v1/models); unset: the only one."
    )
    n: int | None = Field(None, ge=1, description="Images to generate (at most the model's max_images).")
    size: str | None = Field(
        None,
        description='"WIDTHxHEIGHT" (each a multiple of the model\'s size_multiple) or "auto" (its default).',
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description='"b64_json" only: this server keeps no images to link to.'
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Encoding of the images.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg / webp quality, 0-100 (100: best)."
    )
    user: str | None = Field(None, max_length=256, description="The caller's end user, for the logs.")
    stream: bool | None = Field(
        None, description="Server-sent events: partial images and step progress, then the image."
    )
    partial_images: int | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES, description="Partial images to stream (with stream: true), 0-3."
    )
    # OpenAI fields that ask nothing of a diffusion model here: accepted and ignored.
    quality: str | None = Field(None, description="Accepted and ignored (OpenAI's quality tier).")
    style: str | None = Field(None, description="Accepted and ignored.")
    moderation: str | None = Field(None, description="Accepted and ignored.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description='"transparent" is refused: the models draw opaque images.'
    )
    # Ours.
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    num_inference_steps: int | None = Field(None, description="Denoising steps (1-500; unset: the model's).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale (0-100).")
    seed: int | None = Field(None, description="Seed of the initial noise (unset: random, echoed back).")
    mode: str | None = Field(
        None, description="auto, single, cfg-parallel, pipeline or hybrid (docs/design.md section 1)."
    )
    window_guidance: str | None = Field(None, description="The pipeline window's guidance policy.")

    def to_proto(self, request_id: str = "") -> pb.GenerateRequest:
        """The runner's request; ``InvalidArgument`` names the HTTP parameter at fault."""
        if self.response_format == "url":
            raise InvalidArgument(
                "response_format", 'only "b64_json" is served: this server keeps no images to link to'
            )
        if self.background == "transparent":
            raise InvalidArgument(
                "background", '"transparent" is not supported: the models draw opaque images'
            )
        if self.stream and self.n not in (None, 1):
            raise InvalidArgument("n", "a streamed request makes one image")
        width, height = parse_size(self.size)
        try:
            return request_from_names(
                self.prompt,
                negative_prompt=self.negative_prompt,
                width=width,
                height=height,
                steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                seed=self.seed,
                num_images=self.n,
                mode=self.mode,
                window_guidance=self.window_guidance,
                output_format=self.output_format,
                quality=None if self.output_compression is None else max(1, self.output_compression),
                model=self.model or "",
                request_id=request_id,
            )
        except InvalidArgument as exc:
            raise http_argument_error(exc) from None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"64x48"`` -> (64, 48); None or ``"auto"`` -> the model's default (None, None)."""
    if size is None or size == "auto":
        return None, None
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise InvalidArgument("size", f'expected "WIDTHxHEIGHT" or "auto", got {size!r}')
    return int(width), int(height)


def http_argument_error(exc: InvalidArgument) -> InvalidArgument:
    """The same error naming the HTTP parameter instead of the proto field."""
    param = HTTP_PARAMS.get(exc.field)
    if param is None:
        return exc
    return InvalidArgument(param, f"{exc.field}: {exc.description}" if param == "size" else exc.description)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class Timings(BaseModel):
    """Seconds, as the coordinator measured them."""

    queued: float
    encoding: float
    denoising: float
    decoding: float
    total: float


class GenerationDetails(BaseModel):
    """What ran: the mode, the schedule's switch points and the workers (our extension)."""

    request_id: str
    mode: str
    tau1: int | None
    tau2: int | None
    tau1_source: str
    steps: int
    workers: list[str]
    notes: list[str]


class ImagesResponse(BaseModel):
    """OpenAI's ``ImagesResponse`` (``created``, ``data[].b64_json``) plus the seed, the timings
    and what ran."""

    created: int
    data: list[ImageData]
    output_format: str
    size: str
    seed: int
    timings: Timings
    hybridiff: GenerationDetails


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models`` (OpenAI's ``Model``) with the model's limits."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hybridiff"
    arch: str
    default_size: str
    max_size: str
    size_multiple: int
    max_images: int
    default_steps: int
    default_guidance_scale: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail

"""What the runtime needs from a diffusers model, with the pipeline's own methods doing the work.

An adapter wraps a loaded diffusers pipeline. It never runs the pipeline's denoising loop: it
exposes the pieces of one step (docs/design.md section 7) — prompt encoding, initial latents, one
denoiser forward for a branch or the CFG batch, the two-stage split, the scheduler step and
the VAE decode — so that the worker engine can interleave them with its peer.
"""

from __future__ import annotations

import io
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from PIL import Image

from gpu_worker import compiled, scheduler_state
from hybridiff.calibration import Calibration
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import OutputFormat
from hybridiff.request import MODEL_DEFAULTS, ModelDefaults, SizeLimits

# Branch inputs are the per-branch conditioning tensors (batch 1 each), keyed by the name the
# denoiser's forward expects; ``cat_branches`` builds the pipeline's [uncond, cond] batch.
BranchInputs = dict[str, torch.Tensor]


def cat_branches(uncond: BranchInputs, cond: BranchInputs) -> BranchInputs:
    """The CFG batch exactly as the diffusers pipelines build it: ``torch.cat([negative, positive])``."""
    return {k: torch.cat([uncond[k], cond[k]], dim=0) for k in cond}


def repeat_to_batch(sample: torch.Tensor, inputs: BranchInputs) -> torch.Tensor:
    """The latents repeated to the conditioning's batch, as the pipelines' ``torch.cat([latents] * 2)``
    ([x_0..x_{n-1}, x_0..x_{n-1}] for n images of a prompt under guidance)."""
    batch = inputs["encoder_hidden_states"].shape[0]
    return sample if sample.shape[0] == batch else torch.cat([sample] * (batch // sample.shape[0]))


@dataclass
class Conditioning:
    """Encoded prompts of one request: ``uncond`` is None without classifier-free guidance."""

    cond: BranchInputs
    uncond: BranchInputs | None

    def for_branches(self, branches: str) -> BranchInputs:
        """``"cond"``, ``"uncond"`` or ``"both"`` (the [uncond, cond] batch)."""
        if branches == "cond":
            return self.cond
        if self.uncond is None:
            raise ValueError(f"no unconditional branch for {branches!r} (guidance disabled)")
        if branches == "uncond":
            return self.uncond
        return cat_branches(self.uncond, self.cond)


@dataclass
class RequestTimeline:
    """Per-request scheduler and generator: schedulers are stateful, so never shared."""

    scheduler: Any
    timesteps: torch.Tensor
    generator: torch.Generator
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)
    # The scheduler as set_timesteps left it: a checkpoint carries only what the steps changed.
    fresh: scheduler_state.Snapshot = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fresh = scheduler_state.snapshot(self.scheduler)

    def capture_scheduler(self) -> wpb.SchedulerState:
        """The scheduler's state after the steps run so far, its history included."""
        return scheduler_state.capture(self.scheduler, self.fresh)

    def restore_scheduler(
        self, state: wpb.SchedulerState, device: torch.device, sample_shape: Sequence[int], steps: int
    ) -> None:
        """Continue from ``state``, what ``capture_scheduler`` gave on another worker after
        ``steps`` steps on latents of ``sample_shape``; ``BadCommand`` for one it could not have
        given (``scheduler_state.restore``)."""
        scheduler_state.restore(self.scheduler, state, device, sample_shape, steps)


class Topology(str, Enum):
    """How the two stages of a split meet (docs/design.md section 7)."""

    SEQUENTIAL = "sequential"  # stage 1 then stage 2; the boundary goes forward (DiT)
    NESTED = "nested"  # stage 1 is an outer ring around stage 2 (UNet: skip connections stay on one side)


class StageSplit(ABC):
    """The two-stage split of a denoiser (docs/design.md section 7): stage 1 runs on worker U,
    stage 2 on worker C. ``SequentialSplit`` and ``NestedSplit`` declare what the engine calls."""

    topology: Topology
    cut: int
    num_units: int

    @abstractmethod
    def unit_names(self) -> list[str]: ...

    @abstractmethod
    def stage1_units(self) -> list[str]:
        """Names of the units stage 1 runs for this cut (the rest are stage 2)."""


class SequentialSplit(StageSplit):
    """Stage 1 is the front of the denoiser, stage 2 the back: the boundary goes forward."""

    topology = Topology.SEQUENTIAL

    @abstractmethod
    def stage1(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> dict[str, torch.Tensor]:
        """The front: the boundary tensors stage 2 takes."""

    @abstractmethod
    def stage2(
        self, boundary: dict[str, torch.Tensor], sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> torch.Tensor:
        """The back, from stage 1's boundary: the prediction."""


class NestedSplit(StageSplit):
    """Stage 1 is an outer ring (run before and after) around stage 2, the inner core: the core's
    input goes to stage 2 and its output comes back."""

    topology = Topology.NESTED

    @abstractmethod
    def stage1_pre(
        self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The ring's way in: the core's input, and the state its way out needs."""

    @abstractmethod
    def stage2(
        self, core_in: dict[str, torch.Tensor], sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> dict[str, torch.Tensor]:
        """The core: its output, for stage 1's way out."""

    @abstractmethod
    def stage1_post(self, core_out: dict[str, torch.Tensor], state: Any) -> torch.Tensor:
        """The ring's way out, from the core's output: the prediction."""


class ModelAdapter(ABC):
    arch: str

    def __init__(
        self, pipe: Any, device: torch.device, dtype: torch.dtype, defaults: ModelDefaults | None = None
    ) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.defaults = defaults or MODEL_DEFAULTS[self.arch]  # steps, guidance, hybrid parameters
        self.calibration: Calibration | None = None  # the model's, once the loader read it
        # prepare_latents reads pipe.scheduler; requests assign their own scheduler under this lock.
        self._pipe_lock = threading.Lock()
        # Set by ``compiled.enable``: the denoiser and its stages then run compiled per shape.
        self.compile_mode = compiled.NONE
        self.compiler: compiled.CompileCache | None = None

    def run_compiled(self, name: str, fn, like: torch.Tensor, *args):
        """``fn(*args)``, compiled for the (batch, height, width) of ``like`` when compile is on;
        ``name`` names the function (and whatever else fixes its graph, such as the cut)."""
        return compiled.run(self.compiler, f"{self.arch}.{name}", fn, like, *args)

    # --- request set-up -------------------------------------------------------------
    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module: ...

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        return int(self.pipe.default_sample_size * self.vae_scale_factor)

    def size_limits(self) -> SizeLimits:
        """Sizes the model accepts: multiples of the latent grid its denoiser needs, up to 2x default."""
        vae = self.vae_scale_factor
        denoiser = self.denoiser
        if self.arch == "sd3":
            multiple = grid = vae * denoiser.config.patch_size
        else:
            multiple = vae
            grid = vae * 2 ** sum(1 for b in denoiser.down_blocks if b.downsamplers is not None)
        return SizeLimits(
            multiple=multiple, min_side=grid, max_side=2 * self.default_size, default_side=self.default_size
        )

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        height: int,
        width: int,
        num_images: int = 1,
    ) -> Conditioning:
        """Encode as the pipeline's ``__call__`` does (``negative_prompt=None`` when none given),
        ``num_images`` rows per branch as its ``num_images_per_prompt``.

        Serialised: the fast tokenizers change their padding/truncation state per call, which
        is not safe when two in-process workers share one pipeline."""
        with self._pipe_lock:
            return self._encode(prompt, negative_prompt, guidance, height, width, num_images)

    @abstractmethod
    def _encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        height: int,
        width: int,
        num_images: int,
    ) -> Conditioning: ...

    @abstractmethod
    def new_timeline(self, num_steps: int, seed: int, height: int, width: int) -> RequestTimeline: ...

    def initial_latents(
        self, timeline: RequestTimeline, height: int, width: int, num_images: int = 1
    ) -> torch.Tensor:
        """Latents as ``pipe.prepare_latents`` draws them from ``Generator("cpu").manual_seed(seed)``:
        one draw of the whole batch of ``num_images``."""
        channels = self.denoiser.config.in_channels
        with self._pipe_lock:
            self.pipe.scheduler = timeline.scheduler
            return self.pipe.prepare_latents(
                num_images, channels, height, width, self.dtype, self.device, timeline.generator
            )

    # --- one step -------------------------------------------------------------------
    @abstractmethod
    def model_input(self, timeline: RequestTimeline, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser input for ``latents`` at ``t`` (the scheduler's input scaling, if any)."""

    @abstractmethod
    def forward(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> torch.Tensor:
        """One full denoiser forward; the batch is that of ``inputs``."""

    def scheduler_step(
        self, timeline: RequestTimeline, eps: torch.Tensor, t: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        return timeline.scheduler.step(eps, t, latents, **timeline.extra_step_kwargs, return_dict=False)[0]

    @abstractmethod
    def make_split(self, cut: int | None = None) -> StageSplit: ...

    # --- decode ---------------------------------------------------------------------
    @abstractmethod
    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent scaling as the pipeline does before ``vae.decode``."""

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The batch's images, as the pipeline decodes and post-processes them, one image at a
        time (the VAE's activations at 2048 px are gigabytes per image); half-precision latents
        are upcast before the latent scaling is undone, so that its division loses nothing."""
        vae = self.pipe.vae
        images: list[Image.Image] = []
        for one in latents.split(1):
            z = self.vae_input(one.float()).to(device=self.device, dtype=vae.dtype)
            image = vae.decode(z, return_dict=False)[0]
            images += self.pipe.image_processor.postprocess(image, output_type="pil")
        return images


def png_bytes(image: Image.Image) -> bytes:
    """PNG without timestamps or other metadata, so equal images give equal bytes."""
    return encode_image(image, OutputFormat.PNG)


def encode_image(image: Image.Image, fmt: OutputFormat, quality: int = 0) -> bytes:
    """The image in ``fmt`` (PNG lossless; JPEG and WebP at ``quality``, 0 meaning 90), with no
    metadata, so equal images give equal bytes."""
    buf = io.BytesIO()
    if fmt == OutputFormat.PNG:
        image.save(buf, format="PNG", optimize=False)
    elif fmt == OutputFormat.JPEG:
        image.convert("RGB").save(buf, format="JPEG", quality=quality or 90)
    elif fmt == OutputFormat.WEBP:
        image.save(buf, format="WEBP", quality=quality or 90)
    else:
        raise ValueError(f"{fmt!r} is not an image format")
    return buf.getvalue()

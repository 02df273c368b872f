"""Train the embedded default model: SDXL-architecture diffusers components on the shapes
dataset, on CPU, deterministically for a seed (``hybridiff train-default-model``).

Two stages:
1. an ``AutoencoderKL`` (latents 1/4 of the 32x32 image side, 8 channels) on the rendered images;
2. the ``UNet2DConditionModel`` (``text_time`` additions) and both CLIP text encoders, on the
   VAE's latents, epsilon prediction with min-SNR weighting, captions encoded by the SDXL
   pipeline's own ``encode_prompt``. Conditioning dropout zeroes the prompt embeddings, which
   is exactly the unconditional input the pipeline feeds at sampling time
   (``force_zeros_for_empty_prompt``), so classifier-free guidance works.

EMA weights are what gets saved, in diffusers format (safetensors).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybridiff_launch.tiny_model import (
    TextEncoderShape,
    build_clip_tokenizer,
    clip_text_encoders,
    sdxl_scheduler,
)
from hybridiff_tools.shapes.grammar import VOCABULARY, caption_for, training_scenes
from hybridiff_tools.shapes.render import render

log = logging.getLogger(__name__)

MAX_TOKENS = 16  # the longest caption is 9 tokens with BOS and EOS
LATENT_CHANNELS = 8


@dataclass
class TrainConfig:
    seed: int = 0
    side: int = 32
    images: int = 12_000
    vae_steps: int = 2_000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    shape_weight: float = 9.0  # extra reconstruction weight on (and next to) the shape's pixels
    unet_steps: int = 3_600
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 200
    cond_dropout: float = 0.1
    caption_keep: float = 0.75
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    threads: int = 2
    log_every: int = 50
    checkpoint_every: int = 1_000  # EMA snapshots under checkpoint_dir, when one is given


# ----------------------------------------------------------------------------- components
def build_pipeline(seed: int, side: int = 32):
    """The untrained components as a ``StableDiffusionXLPipeline`` (random weights)."""
    from diffusers import (  # deferred: slow to import (seconds); the data and the config need none of it
        AutoencoderKL,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tokenizer = build_clip_tokenizer(max_length=MAX_TOKENS, extra_words=VOCABULARY)
    tokenizer_2 = build_clip_tokenizer(max_length=MAX_TOKENS, extra_words=VOCABULARY)

    shape = TextEncoderShape(hidden=32, layers=2, heads=4, projection=32)
    text_encoder, text_encoder_2 = clip_text_encoders(
        shape, shape, len(tokenizer), seed, max_positions=MAX_TOKENS
    )
    torch.manual_seed(seed + 3)
    # Three levels: latents are 1/4 of the image side (8x8 for 32x32 images), with 8 channels
    # so that a 4x4 patch's colours and edges survive a short training.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=side,
        # No attention in the mid blocks: every latent cell then describes its own 4x4 patch.
        # With attention the latents turned non-local and the denoiser placed shapes mirrored.
        mid_block_add_attention=False,
    )
    with torch.no_grad():  # start the posterior narrow (std ~0.14): reconstructions sharpen sooner
        vae.quant_conv.bias[LATENT_CHANNELS:] = -4.0
    torch.manual_seed(seed + 4)
    time_dim = 16
    unet = UNet2DConditionModel(
        sample_size=side // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=16,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        use_linear_projection=True,
    )
    scheduler = sdxl_scheduler(prediction_type="v_prediction")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# ----------------------------------------------------------------------------- data
@dataclass
class Dataset:
    images: torch.Tensor  # N x 3 x side x side, uint8
    scenes: list

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(idx)].float() / 127.5 - 1.0


def make_dataset(config: TrainConfig) -> Dataset:
    """``config.images`` renders of training scenes (held-out combinations excluded)."""
    rng = np.random.default_rng(config.seed)
    pool = training_scenes()
    scenes = [pool[i] for i in rng.integers(0, len(pool), config.images)]
    images = np.stack([render(s, rng, config.side) for s in scenes])
    pixels = torch.from_numpy((images * 255 + 0.5).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return Dataset(pixels, scenes)


# ----------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextmanager
    def applied(self):
        """The EMA weights in place of the live ones, for the duration of the block."""
        live = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05

    return f


class LossLog:
    def __init__(self, every: int, progress: Callable[[str], None]) -> None:
        self.every, self.progress = every, progress
        self.records: list[dict] = []
        self._acc: list[float] = []
        self.start = time.perf_counter()

    def add(self, stage: str, step: int, total: int, loss: float) -> None:
        self._acc.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == total:
            mean = float(np.mean(self._acc))
            self._acc = []
            elapsed = time.perf_counter() - self.start
            self.records.append(
                {"stage": stage, "step": step + 1, "loss": mean, "elapsed_s": round(elapsed, 1)}
            )
            self.progress(f"{stage} step {step + 1}/{total} loss {mean:.4f} ({elapsed:.0f}s)")


# ----------------------------------------------------------------------------- stages
def train_vae(vae, data: Dataset, config: TrainConfig, losses: LossLog) -> None:
    """Train the autoencoder: reconstruction (MSE + L1) with a light KL term, as SD's VAEs, the
    shape's pixels weighted up (they are a few percent of the image but all of its meaning)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, config.vae_steps))
    rng = np.random.default_rng(config.seed + 10)
    gen = torch.Generator().manual_seed(config.seed + 11)
    for step in range(config.vae_steps):
        x = data.batch(rng.integers(0, len(data.scenes), config.vae_batch))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        saturated = (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values) > 0.2
        weight = 1 + config.shape_weight * F.max_pool2d(saturated.float(), 3, 1, 1)
        err = recon - x
        loss = ((err.square() + 0.1 * err.abs()) * weight).mean() + config.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.add("vae", step, config.vae_steps, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae, data: Dataset, batch: int = 256) -> torch.Tensor:
    """The posterior means of every image (the UNet's training targets are built on them)."""
    out = [
        vae.encode(data.batch(np.arange(i, min(i + batch, len(data.scenes))))).latent_dist.mean
        for i in range(0, len(data.scenes), batch)
    ]
    return torch.cat(out)


def train_denoiser(
    pipe,
    latents: torch.Tensor,
    data: Dataset,
    config: TrainConfig,
    losses: LossLog,
    checkpoint_dir: Path | None = None,
) -> None:
    from diffusers import DDPMScheduler  # deferred: diffusers is slow to import (seconds)

    unet, enc_1, enc_2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    modules = [unet, enc_1, enc_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup, config.unet_steps))
    ema = EMA(modules, config.ema_decay)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)  # min-SNR for v-prediction
    time_ids = pipe._get_add_time_ids(
        (config.side, config.side),
        (0, 0),
        (config.side, config.side),
        dtype=torch.float32,
        text_encoder_projection_dim=enc_2.config.projection_dim,
    )
    rng = np.random.default_rng(config.seed + 20)
    captions_rng = random.Random(config.seed + 21)
    gen = torch.Generator().manual_seed(config.seed + 22)
    b = config.unet_batch
    for step in range(config.unet_steps):
        idx = rng.integers(0, len(data.scenes), b)
        x0 = latents[torch.from_numpy(idx)]
        captions = [caption_for(data.scenes[i], captions_rng, config.caption_keep).text for i in idx]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        keep = (torch.rand(b, generator=gen) >= config.cond_dropout).float()
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(b, 1)},
        ).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        losses.add("denoiser", step, config.unet_steps, loss.item())
        if checkpoint_dir is not None and (step + 1) % config.checkpoint_every == 0:
            with ema.applied():
                pipe.save_pretrained(checkpoint_dir / f"step-{step + 1}", safe_serialization=True)
    ema.copy_to_params()
    for m in modules:
        m.eval()


def train_default_model(
    out: str | Path,
    config: TrainConfig | None = None,
    progress: Callable[[str], None] = print,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Train and save the default model to ``out``; return the training record."""
    config = config or TrainConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    pipe = build_pipeline(config.seed, config.side)
    losses = LossLog(config.log_every, progress)
    data = make_dataset(config)
    progress(
        f"dataset: {len(data.scenes)} images of {config.side}x{config.side} "
        f"({time.perf_counter() - started:.0f}s)"
    )
    train_vae(pipe.vae, data, config, losses)
    latents = encode_latents(pipe.vae, data)
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    progress(
        f"latents: mean {float(latents.mean()):.3f} std {float(latents.std()):.3f}; "
        f"scaling_factor {scaling:.4f}"
    )
    train_denoiser(
        pipe,
        latents * scaling,
        data,
        config,
        losses,
        Path(checkpoint_dir) if checkpoint_dir is not None else None,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        },
        "losses": losses.records,
    }
    (out / "training_log.json").write_text(json.dumps(record, indent=1))
    return record

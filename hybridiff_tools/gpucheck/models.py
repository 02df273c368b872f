"""The models the GPU check serves: full-size SDXL-base / SD3-medium shaped pipelines with random
weights (no download), or the tiny test models for the CPU dry run.

The denoiser is the full architecture from ``hybridiff_tools/bench/configs/`` (what ``gpu-profile``
times); the text encoders are one-layer CLIP encoders of the real widths (768 and 1280, so the
denoiser sees the real conditioning shapes) and the VAE is the tiny four-level one of the test
models (latents 1/8 of the image side), so building and loading cost little besides the
denoiser. Written once per architecture, dtype and seed into a cache directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

from hybridiff_launch.tiny_model import (
    TextEncoderShape,
    build_sd3,
    build_sdxl,
    clip_text_encoders,
    tiny_vae,
    write_tiny_model,
)
from hybridiff_tools.bench.gpu_profile import DTYPES, build_model, load_config

ARCHS = ("sdxl", "sd3")
SIZES = ("full", "tiny")
# The real pipelines' CLIP widths: SDXL concatenates both encoders' hidden states (768 + 1280 =
# cross_attention_dim 2048) and pools the second (1280); SD3 pools both (768 + 1280 = 2048).
CLIP_WIDTHS = (768, 1280)


def build_full_pipeline(
    arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0, denoiser_config: dict | None = None
):
    """The pipeline around the full-size denoiser of ``arch`` (random weights, on ``device``);
    ``denoiser_config``: another config with the same conditioning widths (the tests' small one)."""
    base = build_sdxl("tiny", seed) if arch == "sdxl" else build_sd3("tiny", seed)  # tokenizers, scheduler
    cfg = denoiser_config or load_config(arch, tiny=False)
    denoiser = build_model(arch, cfg, device, dtype)
    vocab = len(base.tokenizer)
    shape_1, shape_2 = (
        TextEncoderShape(hidden=w, layers=1, heads=w // 64, projection=w) for w in CLIP_WIDTHS
    )
    enc_1, enc_2 = clip_text_encoders(shape_1, shape_2, vocab, seed, first_with_projection=arch == "sd3")
    vae = tiny_vae(cfg["in_channels"], seed, sd3=arch == "sd3", sample_size=1024)
    for module in (enc_1, enc_2, vae):
        module.to(device=device, dtype=dtype)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=enc_1,
            text_encoder_2=enc_2,
            tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2,
            unet=denoiser,
            scheduler=base.scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusion3Pipeline(
        transformer=denoiser,
        scheduler=base.scheduler,
        vae=vae,
        text_encoder=enc_1,
        tokenizer=base.tokenizer,
        text_encoder_2=enc_2,
        tokenizer_2=base.tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def ensure_model(
    arch: str, size: str, cache: Path, device: str, dtype: str = "float16", seed: int = 0
) -> Path:
    """The model directory for ``arch`` at ``size``, built into ``cache`` unless already there.
    ``full`` is built on ``device`` in ``dtype`` (no fp32 copy of a 2.6B-parameter model in host
    memory); ``tiny`` is the test suite's model (fp32; the workers cast it)."""
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"unknown model {arch!r} / {size!r}")
    name = f"{arch}-{size}-{dtype}-s{seed}" if size == "full" else f"{arch}-tiny-s{seed}"
    out = cache / name
    done = out / ".complete"
    if done.is_file():
        return out
    if size == "tiny":
        write_tiny_model(arch, out, seed=seed)
    else:
        pipe = build_full_pipeline(arch, torch.device(device), DTYPES[dtype], seed)
        pipe.save_pretrained(out, safe_serialization=True)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    done.write_text(json.dumps({"arch": arch, "size": size, "dtype": dtype, "seed": seed}) + "\n")
    return out

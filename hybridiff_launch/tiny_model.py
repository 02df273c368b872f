"""Build small randomly initialised SDXL- and SD3-shaped models in diffusers format, offline.

Used by the tests, the CPU demos and the benchmark (``hybridiff tiny-model``). The CLIP
tokenizers are byte-level BPE tokenizers built from an in-memory vocabulary, so no hub is
needed. ``size="bench"`` is the SDXL-shaped UNet of about 30M parameters of docs/design.md section 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from hybridiff.errors import InvalidArgument

# sd3.5-medium and sd3.5-large are SD3-shaped (the SD3 adapter serves them) with the transformer
# options of their own: MMDiT-X's dual attention layers and RMS qk-norm, or qk-norm alone.
ARCHS = ("sdxl", "sd3", "sd3.5-medium", "sd3.5-large")
SIZES = ("tiny", "bench")
SD3_FLAVORS: dict[str, dict] = {
    "sd3": {},
    # SD3.5 Medium: dual attention in the first blocks (0..12 of 24), RMS-normed queries and keys
    "sd3.5-medium": {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
    # SD3.5 Large: RMS qk-norm, no dual attention
    "sd3.5-large": {"qk_norm": "rms_norm"},
}
# A tiny T5 tokenizer's words (besides single characters): the prompts the tests use.
T5_WORDS = "a the red blue yellow green star circle square triangle at top bottom left right low quality"


@dataclass(frozen=True)
class TextEncoderShape:
    hidden: int
    layers: int
    heads: int
    projection: int


def build_clip_tokenizer(max_length: int = 77, extra_words: tuple[str, ...] = ()):
    """A byte-level CLIP BPE tokenizer: every byte and byte-with-end-of-word is a token; each
    word of ``extra_words`` is merged into one token (so a small grammar tokenizes compactly)."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in extra_words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def clip_text_encoders(
    shape_1: TextEncoderShape,
    shape_2: TextEncoderShape,
    vocab_size: int,
    seed: int,
    first_with_projection: bool = False,
    max_positions: int = 77,
):
    """The two CLIP text encoders of an SDXL or SD3 pipeline, random weights (seeded ``seed + 1``
    and ``seed + 2``): the tests' tiny ones, the default model's untrained ones and the GPU
    check's full-width ones."""

    def config(s: TextEncoderShape) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=s.hidden,
            intermediate_size=s.hidden * 2,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            projection_dim=s.projection,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu",
        )

    torch.manual_seed(seed + 1)
    enc_1 = (CLIPTextModelWithProjection if first_with_projection else CLIPTextModel)(config(shape_1))
    torch.manual_seed(seed + 2)
    enc_2 = CLIPTextModelWithProjection(config(shape_2))
    return enc_1, enc_2


def tiny_vae(latent_channels: int, seed: int, sd3: bool, sample_size: int = 64) -> AutoencoderKL:
    """A small VAE with SDXL's (or SD3's) latent layout: 1/8 of the image side."""
    torch.manual_seed(seed + 3)
    extra = (
        dict(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
        if sd3
        else {}
    )
    # Four resolution levels: latents are 1/8 of the image side, as in SDXL and SD3.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        **extra,
    )


def _sdxl_unet(size: str, cross_dim: int, pooled_dim: int, seed: int):
    torch.manual_seed(seed)
    time_dim = 8 if size == "tiny" else 32
    common = dict(
        in_channels=4,
        out_channels=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 6 + pooled_dim,
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
    )
    if size == "tiny":
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=2,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            **common,
        )
    # "bench": SDXL's three-level layout (no attention at the top level, deeper transformer
    # stacks further down), scaled to about 30M parameters at 64x64 latents.
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        **common,
    )


def sdxl_scheduler(prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    """SDXL's Euler scheduler (its beta schedule and leading timesteps): the tests' tiny models
    predict the noise, the trained default model the velocity (``v_prediction``)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_sdxl(size: str = "tiny", seed: int = 0):
    tok = build_clip_tokenizer()
    shape_1 = TextEncoderShape(hidden=32, layers=2, heads=4, projection=32)
    shape_2 = TextEncoderShape(hidden=32, layers=2, heads=4, projection=32)
    enc_1, enc_2 = clip_text_encoders(shape_1, shape_2, len(tok), seed)
    unet = _sdxl_unet(
        size, cross_dim=shape_1.hidden + shape_2.hidden, pooled_dim=shape_2.projection, seed=seed
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(4, seed, sd3=False),
        text_encoder=enc_1,
        text_encoder_2=enc_2,
        tokenizer=tok,
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer from an in-memory vocabulary (no sentencepiece file, no hub):
    T5's special tokens, every printable ASCII character and a few whole words."""
    chars = "\u2581" + "".join(chr(c) for c in range(33, 127))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + w, -1.0) for w in T5_WORDS.split()]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(vocab_size: int, d_model: int, seed: int) -> T5EncoderModel:
    """A T5 encoder of ``d_model`` (SD3's joint attention width, as T5-XXL's 4096 is)."""
    torch.manual_seed(seed + 4)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def build_sd3(size: str = "tiny", seed: int = 0, flavor: str = "sd3", with_t5: bool = False):
    """An SD3-shaped pipeline; ``flavor`` one of ``SD3_FLAVORS``; ``with_t5``: a tiny T5 encoder
    as ``text_encoder_3`` (else none, as the worker loads SD3 by default)."""
    tok = build_clip_tokenizer()
    shape = TextEncoderShape(hidden=32, layers=2, heads=4, projection=32)
    enc_1, enc_2 = clip_text_encoders(shape, shape, len(tok), seed, first_with_projection=True)
    torch.manual_seed(seed)
    layers, heads, head_dim = (4, 2, 16) if size == "tiny" else (12, 6, 64)
    transformer = SD3Transformer2DModel(
        sample_size=8 if size == "tiny" else 64,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * shape.hidden,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * shape.projection,
        pos_embed_max_size=96,
        **SD3_FLAVORS[flavor],
    )
    tok_3 = build_t5_tokenizer() if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, seed, sd3=True),
        text_encoder=enc_1,
        tokenizer=tok,
        text_encoder_2=enc_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=tiny_t5(len(tok_3), 2 * shape.hidden, seed) if with_t5 else None,
        tokenizer_3=tok_3,
    )


def write_tiny_model(
    arch: str, out: str | Path, seed: int = 0, size: str = "tiny", with_t5: bool = False
) -> Path:
    """Write a random model of ``arch`` in diffusers format to ``out`` and return the path;
    ``with_t5``: SD3-shaped models get a tiny T5 encoder (``text_encoder_3``)."""
    if arch not in ARCHS:
        raise InvalidArgument("arch", f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise InvalidArgument("size", f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if with_t5 and arch == "sdxl":
        raise InvalidArgument("with-t5", "only SD3-shaped models have a T5 encoder")
    pipe = build_sdxl(size, seed) if arch == "sdxl" else build_sd3(size, seed, arch, with_t5)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

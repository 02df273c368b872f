"""SD3.5 Medium (MMDiT-X: dual attention, RMS qk-norm) and Large (qk-norm) served by the SD3
adapter, SD3's T5 encoder (``--text-encoder-3 on``), and single-file checkpoints loaded with
diffusers' ``from_single_file`` (docs/design.md sections 3 and 7)."""

import pytest
import torch
from cluster_helpers import cfg_modes_match, make_input
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (
    convert_sd3_transformer_checkpoint_to_diffusers,
    swap_scale_shift,
)
from safetensors.torch import save_file

from gpu_worker.loader import load_adapter, weights_digest
from gpu_worker.split_balance import valid_cuts
from hybridiff.errors import InvalidArgument, ModelLoadError
from hybridiff.protocol import label
from hybridiff.wire import tensor_from_proto
from hybridiff_launch import cli
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_launch.tiny_model import write_tiny_model
from hybridiff_tools.quality import psnr

FLAVORS = ("sd3.5-medium", "sd3.5-large")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Tiny SD3.5 Medium and Large models, and an SD3 model with a T5 encoder."""
    root = tmp_path_factory.mktemp("sd3-family")
    dirs = {flavor: write_tiny_model(flavor, root / flavor) for flavor in FLAVORS}
    dirs["sd3+t5"] = write_tiny_model("sd3", root / "sd3-t5", with_t5=True)
    return dirs


@pytest.fixture(scope="module")
def family_engines(family):
    made = {name: InProcessEngine(path, text_encoder_3=name == "sd3+t5") for name, path in family.items()}
    yield made
    for engine in made.values():
        engine.close()


def _pipeline(path, with_t5):
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_tiny_models_have_the_sd35_transformer_options(family_engines):
    medium = family_engines["sd3.5-medium"].adapter.denoiser
    large = family_engines["sd3.5-large"].adapter.denoiser
    assert medium.config.qk_norm == large.config.qk_norm == "rms_norm"
    assert [b.use_dual_attention for b in medium.transformer_blocks] == [True, True, False, False]
    assert not any(b.use_dual_attention for b in large.transformer_blocks)
    assert family_engines["sd3+t5"].adapter.pipe.text_encoder_3 is not None


@pytest.mark.parametrize("name", [*FLAVORS, "sd3+t5"])
def test_single_and_cfg_parallel_match_diffusers(family, family_engines, name):
    eng, pipe = family_engines[name], _pipeline(family[name], with_t5=name == "sd3+t5")
    steps, guidance, seed, prompt, negative = 4, 5.0, 1234, "a yellow star at the top", "low quality"
    size = eng.adapter.default_size
    with torch.no_grad():  # the transformer and the prompt path are what differ: latents suffice
        ref_latents = pipe(
            prompt=prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
    cfg_modes_match(
        eng,
        ref_latents,
        prompt=prompt,
        negative_prompt=negative,
        num_steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )


@pytest.mark.parametrize("name", FLAVORS)
@torch.no_grad()
def test_every_cut_recomposes_the_full_forward_exactly(family_engines, name):
    """Dual-attention and qk-normed blocks on either side of every cut: stage 2 after stage 1
    equals the whole transformer, for one branch and for the CFG batch."""
    a = family_engines[name].adapter
    h = w = a.default_size
    cond = a.encode("a blue square", None, True, h, w)
    tl = a.new_timeline(6, 3, h, w)
    t = tl.timesteps[2]
    x = a.model_input(tl, a.initial_latents(tl, h, w), t)
    assert list(valid_cuts(a)) == [1, 2, 3]
    for branches in ("cond", "both"):
        inputs = cond.for_branches(branches)
        full = a.forward(x, t, inputs)
        for cut in valid_cuts(a):
            split = a.make_split(cut)
            assert torch.equal(split.stage2(split.stage1(x, t, inputs), x, t, inputs), full), cut


@pytest.mark.parametrize("name", FLAVORS)
def test_hybrid_runs_to_the_end(family_engines, name):
    eng = family_engines[name]
    spec = eng.resolve(
        make_input(
            prompt="a red circle", num_steps=10, guidance_scale=5.0, seed=3, mode="hybrid", tau_cap=4, k=3
        )
    )
    result = eng.generate(spec)
    assert label(result.stats.mode_used) == "hybrid"
    assert result.stats.tau1 == 4 and result.stats.tau2 == 7 and len(result.images) == 1
    assert torch.isfinite(tensor_from_proto(result.latents)).all()


def test_t5_changes_the_prompt_embeddings_and_the_weights_digest(family, family_engines):
    """On: T5's embeddings (what diffusers' pipeline with T5 feeds); off: the pipeline's zeros.
    Workers that differ in it never pair: the digest covers the T5 files only when loaded."""
    with_t5 = family_engines["sd3+t5"].adapter
    without = load_adapter(family["sd3+t5"])
    assert without.pipe.text_encoder_3 is None
    on = with_t5.encode("a yellow star", None, False, 64, 64).cond["encoder_hidden_states"]
    off = without.encode("a yellow star", None, False, 64, 64).cond["encoder_hidden_states"]
    clip_tokens = 77
    assert on.shape == off.shape and torch.equal(on[:, :clip_tokens], off[:, :clip_tokens])
    assert not off[:, clip_tokens:].any() and on[:, clip_tokens:].abs().sum() > 0
    assert weights_digest(family["sd3+t5"], text_encoder_3=True) != weights_digest(family["sd3+t5"])


def test_t5_on_a_model_without_it_is_a_one_line_error(family, model_dirs):
    with pytest.raises(ModelLoadError, match="has no text_encoder_3"):
        load_adapter(family["sd3.5-large"], text_encoder_3=True)
    with pytest.raises(InvalidArgument, match="no T5 encoder"):
        load_adapter(model_dirs["sdxl"], text_encoder_3=True)


# --- single-file checkpoints ---------------------------------------------------------------
def sd3_single_file(model_dir, out):
    """``model_dir``'s transformer as a single-file checkpoint in the SAI layout (the inverse of
    diffusers' SD3 conversion; no text encoders and no VAE, as SD3.5's files); returns ``out``."""
    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    sd, cfg = transformer.state_dict(), transformer.config
    out_sd = {}

    def put(name, value):
        out_sd["model.diffusion_model." + name] = value.contiguous()

    put("pos_embed", sd["pos_embed.pos_embed"])
    renames = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    dim = cfg.caption_projection_dim
    for w in ("weight", "bias"):
        for ours, theirs in renames.items():
            put(f"{theirs}.{w}", sd[f"{ours}.{w}"])
        put(f"final_layer.adaLN_modulation.1.{w}", swap_scale_shift(sd[f"norm_out.linear.{w}"], dim))
    for i in range(cfg.num_layers):
        d, s, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == cfg.num_layers - 1
        for w in ("weight", "bias"):
            put(f"{s}x_block.attn.qkv.{w}", torch.cat([sd[f"{d}attn.to_{c}.{w}"] for c in "qkv"]))
            put(f"{s}context_block.attn.qkv.{w}", torch.cat([sd[f"{d}attn.add_{c}_proj.{w}"] for c in "qkv"]))
            if f"{d}attn2.to_q.{w}" in sd:
                put(f"{s}x_block.attn2.qkv.{w}", torch.cat([sd[f"{d}attn2.to_{c}.{w}"] for c in "qkv"]))
                put(f"{s}x_block.attn2.proj.{w}", sd[f"{d}attn2.to_out.0.{w}"])
            put(f"{s}x_block.attn.proj.{w}", sd[f"{d}attn.to_out.0.{w}"])
            put(f"{s}x_block.adaLN_modulation.1.{w}", sd[f"{d}norm1.linear.{w}"])
            context = sd[f"{d}norm1_context.linear.{w}"]
            put(
                f"{s}context_block.adaLN_modulation.1.{w}",
                swap_scale_shift(context, dim) if last else context,
            )
            put(f"{s}x_block.mlp.fc1.{w}", sd[f"{d}ff.net.0.proj.{w}"])
            put(f"{s}x_block.mlp.fc2.{w}", sd[f"{d}ff.net.2.{w}"])
            if not last:
                put(f"{s}context_block.attn.proj.{w}", sd[f"{d}attn.to_add_out.{w}"])
                put(f"{s}context_block.mlp.fc1.{w}", sd[f"{d}ff_context.net.0.proj.{w}"])
                put(f"{s}context_block.mlp.fc2.{w}", sd[f"{d}ff_context.net.2.{w}"])
        norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k"}
        norms |= {
            "attn.norm_added_q": "context_block.attn.ln_q",
            "attn.norm_added_k": "context_block.attn.ln_k",
        }
        norms |= {"attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
        for ours, theirs in norms.items():
            if f"{d}{ours}.weight" in sd:
                put(f"{s}{theirs}.weight", sd[f"{d}{ours}.weight"])
    # the layout is diffusers' own: its conversion gives back exactly the transformer's weights
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(out_sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file(out_sd, str(out))
    return out


def test_a_single_file_checkpoint_loads_with_its_config_and_draws_the_same_image(family, tmp_path):
    folder = family["sd3.5-medium"]
    checkpoint = sd3_single_file(folder, tmp_path / "sd3.5-medium-tiny.safetensors")
    engine = InProcessEngine(checkpoint, config=folder)
    try:
        transformer = engine.adapter.pipe.transformer
        assert transformer.config.dual_attention_layers == [0, 1]
        reference = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
        assert all(torch.equal(transformer.state_dict()[k], v) for k, v in reference.items())
        request = make_input(
            prompt="a green triangle", num_steps=4, guidance_scale=5.0, seed=9, mode="hybrid"
        )
        image = engine.generate(engine.resolve(request)).images[0]
    finally:
        engine.close()
    from_folder = InProcessEngine(folder)
    try:
        assert psnr(image, from_folder.generate(from_folder.resolve(request)).images[0]) == float("inf")
    finally:
        from_folder.close()
    # pairing: the file and its config, not the config alone
    assert weights_digest(checkpoint, config=folder) == weights_digest(checkpoint, config=folder)
    assert weights_digest(checkpoint, config=folder) != weights_digest(folder)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "is a single-file checkpoint: name its pipeline's diffusers folder or Hub id with --config"),
        (["--config", "FOLDER"], None),  # loads
    ],
)
def test_run_with_a_single_file(family, tmp_path, capsys, flags, expected):
    folder = family["sd3.5-large"]
    checkpoint = sd3_single_file(folder, tmp_path / "large.safetensors")
    flags = [str(folder) if f == "FOLDER" else f for f in flags]
    argv = ["run", "--model", str(checkpoint), *flags, "--prompt", "a red circle", "--steps", "2"]
    code = cli.main([*argv, "--quiet", "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip()
    if expected is None:
        assert code == 0 and (tmp_path / "out.png").is_file(), err
    else:
        assert code == 2 and err.count("\n") == 0 and expected in err, err


def test_config_without_a_single_file_is_a_usage_error(family):
    with pytest.raises(InvalidArgument, match="--config goes with a single-file checkpoint"):
        load_adapter(family["sd3.5-large"], config=family["sd3.5-large"])

"""The default model's dataset, caption grammar, adherence checker and training script."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hybridiff.protocol import Mode
from hybridiff.request import request_from_names
from hybridiff_launch.model_dirs import EMBEDDED_MODEL_DIR
from hybridiff_tools.shapes.adherence import AdherenceReport, check, read_image
from hybridiff_tools.shapes.evaluate import in_process_generate
from hybridiff_tools.shapes.grammar import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    VOCABULARY,
    Caption,
    all_scenes,
    caption_for,
    held_out_prompts,
    parse_caption,
    training_scenes,
)
from hybridiff_tools.shapes.render import render
from hybridiff_tools.shapes.train import TrainConfig, train_default_model


def test_held_out_triples_are_never_trained_but_every_pair_is():
    trained = {(s.colour, s.shape, s.position) for s in training_scenes()}
    assert not trained & set(HELD_OUT)
    assert len(trained) == len(COLOURS) * len(SHAPES) * len(POSITIONS) - len(HELD_OUT)
    for c, s, p in HELD_OUT:  # composition, not unseen words: each pair occurs in training
        assert any(t[0] == c and t[1] == s for t in trained)
        assert any(t[0] == c and t[2] == p for t in trained)
        assert any(t[1] == s and t[2] == p for t in trained)
    assert [c.text for c in held_out_prompts()][0] == "a red circle on the left"


def test_captions_round_trip_and_may_leave_out_any_attribute():
    rng = random.Random(0)
    seen_missing = set()
    for scene in all_scenes():
        for _ in range(4):
            caption = caption_for(scene, rng)
            assert parse_caption(caption.text) == caption
            assert set(caption.text.split()) <= set(VOCABULARY)
            seen_missing |= {k for k in ("colour", "shape", "position", "size") if k not in caption.asked()}
    assert seen_missing == {"colour", "shape", "position", "size"}
    assert Caption().text == "something"
    assert Caption(colour="red").text == "a red shape"
    assert Caption(shape="square", position="left").text == "a square on the left"


def test_rendering_is_deterministic_for_a_seed():
    scene = all_scenes()[7]
    a = render(scene, np.random.default_rng(3))
    b = render(scene, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, render(scene, np.random.default_rng(4)))


def test_checker_reads_the_rendered_scenes():
    rng = np.random.default_rng(1)
    verdicts = []
    for scene in all_scenes() * 2:
        image = (render(scene, rng) * 255).astype(np.uint8)
        verdicts.append(check(image, Caption(scene.colour, scene.shape, scene.position, scene.size)))
    report = AdherenceReport(verdicts)
    attributes = report.attribute_accuracy()
    assert attributes["colour"] == attributes["position"] == 1.0
    # a small circle is 7 pixels across at 32x32: a few read as squares or triangles
    misses = [v for v in verdicts if not v.adheres][:3]
    assert attributes["shape"] >= 0.97 and attributes["size"] >= 0.98, misses


def test_checker_rejects_wrong_attributes_and_empty_images():
    scene = next(s for s in all_scenes() if (s.colour, s.shape, s.position) == ("blue", "square", "left"))
    image = render(scene, np.random.default_rng(0))
    assert check(image, "a blue square on the left").adheres
    assert check(image, "a blue square").adheres  # partial prompts check only what they name
    for wrong in ("a red square on the left", "a blue circle on the left", "a blue square on the right"):
        verdict = check(image, wrong)
        assert not verdict.adheres and sum(not ok for ok in verdict.correct.values()) == 1
    blank = np.full((32, 32, 3), 0.5, dtype=np.float32)
    assert not read_image(blank).found and not check(blank, "a blue square").adheres


def test_training_is_deterministic_for_a_seed(tmp_path):
    config = TrainConfig(
        images=64, vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=4, warmup=1, threads=1, log_every=1
    )
    records = [train_default_model(tmp_path / name, config, progress=lambda _: None) for name in ("a", "b")]
    losses = [[(r["stage"], r["step"], r["loss"]) for r in record["losses"]] for record in records]
    assert losses[0] == losses[1]
    assert [r["stage"] for r in records[0]["losses"]] == ["vae"] * 2 + ["denoiser"] * 3
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = load_file(next((tmp_path / "a" / part).glob("*.safetensors")))
        b = load_file(next((tmp_path / "b" / part).glob("*.safetensors")))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert (tmp_path / "a" / "model_index.json").is_file()
    assert (tmp_path / "a" / "training_log.json").is_file()


@pytest.mark.parametrize("prompt", list(itertools.islice((c.text for c in held_out_prompts()), 1)))
def test_the_committed_model_draws_a_held_out_prompt(prompt):
    generate, close = in_process_generate(EMBEDDED_MODEL_DIR)
    try:
        png, stats = generate(
            request_from_names(prompt, seed=11, steps=20, guidance_scale=5.0, mode=Mode.CFG_PARALLEL)
        )
    finally:
        close()
    verdict = check(png, prompt)
    assert verdict.adheres, verdict

"""A model named by Hub id, served from the Hub's cache offline, draws what the same folder given
as a path draws; a model saved as a variant only loads with that variant."""

from __future__ import annotations

import pytest
import torch
from cluster_helpers import make_input
from hub_standin import COMMIT, place_in_hub_cache
from huggingface_hub import constants as hub_constants

from gpu_worker import weights
from gpu_worker.loader import load_adapter, weights_digest
from hybridiff.errors import ModelLoadError
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_launch.tiny_model import build_sdxl


def _image(engine: InProcessEngine) -> bytes:
    spec = engine.resolve(make_input(prompt="a red circle", num_steps=3, seed=7, mode="single"))
    return engine.generate(spec).images[0]


def test_a_hub_id_in_the_cache_is_served_offline_as_its_folder(model_dirs, engines, tmp_path, monkeypatch):
    assert hub_constants.HF_HUB_OFFLINE  # tests/conftest.py: no request could be made
    snapshot = place_in_hub_cache(model_dirs["sdxl"], tmp_path / "hf", "org/tiny-sdxl")
    # HF_HOME as the Hub library read it at import: its cache folder, now the temporary one.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    folder = weights.resolve("org/tiny-sdxl")
    assert folder == snapshot and folder.name == COMMIT
    assert weights.served_name("org/tiny-sdxl") == "org/tiny-sdxl"
    assert weights_digest(folder) == weights_digest(model_dirs["sdxl"])  # the two would pair

    by_id = InProcessEngine(folder)
    try:
        assert _image(by_id) == _image(engines["sdxl"])  # the same pixels: PSNR inf
    finally:
        by_id.close()

    with pytest.raises(ModelLoadError, match="org/not-cached"):
        weights.resolve("org/not-cached")  # offline and not in the cache: one error naming it


def test_a_variant_only_model_loads_only_with_its_variant(tmp_path):
    pipe = build_sdxl("tiny", seed=0).to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    assert not list((tmp_path / "fp16").rglob("*model.safetensors"))  # no full-precision files

    with pytest.raises(ModelLoadError, match="holds fp16 weights: pass --variant fp16"):
        load_adapter(tmp_path / "fp16", "cpu", "float32")
    engine = InProcessEngine(tmp_path / "fp16", "cpu", "float32", variant="fp16")
    try:
        assert engine.adapter.pipe.unet.dtype == torch.float32
        assert _image(engine)[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        engine.close()

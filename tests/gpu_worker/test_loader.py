"""The model loader reads a model directory's own defaults."""

import json

import pytest

from gpu_worker.loader import read_model_defaults
from hybridiff.errors import ModelLoadError
from hybridiff.request import MODEL_DEFAULTS


def test_a_model_directory_records_its_own_defaults(tmp_path):
    assert read_model_defaults(tmp_path, "sdxl") == MODEL_DEFAULTS["sdxl"]
    (tmp_path / "hybridiff.json").write_text(
        json.dumps({"defaults": {"steps": 40, "hybrid": {"eps_slope": 2e-3, "tau_cap": 20}}})
    )
    d = read_model_defaults(tmp_path, "sdxl")
    assert (d.steps, d.guidance_scale) == (40, MODEL_DEFAULTS["sdxl"].guidance_scale)
    assert (d.hybrid.l_slope, d.hybrid.eps_slope, d.hybrid.k, d.hybrid.tau_cap) == (12, 2e-3, 5, 20)
    (tmp_path / "hybridiff.json").write_text(json.dumps({"defaults": {"hybrid": {"eps_slope": 7}}}))
    with pytest.raises(ModelLoadError, match="eps_slope"):
        read_model_defaults(tmp_path, "sdxl")

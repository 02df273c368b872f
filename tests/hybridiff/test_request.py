"""Validation: every bad field is a named InvalidArgument, never an error from deep inside torch."""
import math

import pytest

from hybridiff.errors import InvalidArgument
from hybridiff.request import MODEL_DEFAULTS, RequestInput, SizeLimits, resolve_spec

LIMITS = SizeLimits(multiple=8, min_side=16, max_side=128, default_side=64)


def resolve(**kw):
    return resolve_spec(RequestInput(**{"prompt": "a red circle", **kw}), LIMITS, MODEL_DEFAULTS["sdxl"])


def test_defaults_applied():
    spec = resolve()
    assert (spec.width, spec.height, spec.num_steps, spec.guidance_scale) == (64, 64, 50, 5.0)
    assert (spec.l_slope, spec.eps_slope, spec.k, spec.tau_cap) == (12, 4e-4, 5, 15)
    assert spec.negative_prompt is None and spec.request_id


@pytest.mark.parametrize("kw,field", [
    ({"num_steps": 0}, "num_inference_steps"),
    ({"num_steps": -3}, "num_inference_steps"),
    ({"num_steps": 10_000}, "num_inference_steps"),
    ({"width": 60}, "width"),
    ({"height": 0}, "height"),
    ({"width": 256}, "width"),
    ({"height": 8}, "height"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": math.inf}, "guidance_scale"),
    ({"k": -1}, "hybrid.k"),
    ({"l_slope": 0}, "hybrid.l_slope"),
    ({"eps_slope": 0.0}, "hybrid.eps_slope"),
    ({"eps_slope": math.nan}, "hybrid.eps_slope"),
    ({"tau_cap": 0}, "hybrid.tau_cap"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"negative_prompt": "x" * 5000}, "negative_prompt"),
    ({"mode": "turbo"}, "mode"),
    ({"window_guidance": "sometimes"}, "window_guidance"),
    ({"seed": -1}, "seed"),
    ({"output_format": "gif"}, "output_format"),
    ({"request_id": "\x00bad"}, "request_id"),
])
def test_bad_fields_are_named(kw, field):
    with pytest.raises(InvalidArgument) as err:
        resolve(**kw)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_sd3_needs_multiples_of_16():
    limits = SizeLimits(multiple=16, min_side=16, max_side=128, default_side=64)
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        resolve_spec(RequestInput(prompt="p", width=40), limits, MODEL_DEFAULTS["sd3"])


def test_a_model_directory_records_its_own_defaults(tmp_path):
    import json

    from gpu_worker.loader import read_model_defaults
    from hybridiff.errors import ModelLoadError
    from hybridiff.request import MODEL_DEFAULTS

    assert read_model_defaults(tmp_path, "sdxl") == MODEL_DEFAULTS["sdxl"]
    (tmp_path / "hybridiff.json").write_text(json.dumps(
        {"defaults": {"steps": 40, "hybrid": {"eps_slope": 2e-3, "tau_cap": 20}}}))
    d = read_model_defaults(tmp_path, "sdxl")
    assert (d.steps, d.guidance_scale) == (40, MODEL_DEFAULTS["sdxl"].guidance_scale)
    assert (d.hybrid.l_slope, d.hybrid.eps_slope, d.hybrid.k, d.hybrid.tau_cap) == (12, 2e-3, 5, 20)
    (tmp_path / "hybridiff.json").write_text(json.dumps({"defaults": {"hybrid": {"eps_slope": 7}}}))
    with pytest.raises(ModelLoadError, match="eps_slope"):
        read_model_defaults(tmp_path, "sdxl")

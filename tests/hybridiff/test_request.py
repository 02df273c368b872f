"""Validation: every bad field is a named InvalidArgument, never an error from deep inside torch."""

import math

import pytest

from hybridiff.errors import InvalidArgument
from hybridiff.protocol import Mode, OutputFormat, WindowGuidance
from hybridiff.request import MODEL_DEFAULTS, HybridParams, SizeLimits, request_from_names, resolve_spec

LIMITS = SizeLimits(multiple=8, min_side=16, max_side=128, default_side=64)


HYBRID_KEYS = ("l_slope", "eps_slope", "k", "tau_cap")


def resolve(**kw):
    hybrid = {k: kw.pop(k) for k in HYBRID_KEYS if k in kw}
    if "num_steps" in kw:
        kw["steps"] = kw.pop("num_steps")
    request = request_from_names(kw.pop("prompt", "a red circle"), hybrid=hybrid, **kw)
    return resolve_spec(request, LIMITS, MODEL_DEFAULTS["sdxl"])


def test_defaults_applied():
    spec = resolve()
    assert (spec.width, spec.height, spec.num_steps, spec.guidance_scale) == (64, 64, 50, 5.0)
    assert spec.hybrid == HybridParams(12, 4e-4, 5, 15)
    assert spec.negative_prompt is None and spec.request_id
    assert (spec.mode, spec.window_guidance, spec.output_format) == (Mode.AUTO, None, OutputFormat.PNG)
    assert (spec.num_images, spec.quality) == (1, 90)


@pytest.mark.parametrize(
    "kw,field",
    [
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
        ({"mode": 99}, "mode"),
        ({"window_guidance": 7}, "window_guidance"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"output_format": 42}, "output_format"),
        ({"num_images": 5}, "num_images"),
        ({"quality": 101}, "quality"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"request_id": "\x00bad"}, "request_id"),
    ],
)
def test_bad_fields_are_named(kw, field):
    with pytest.raises(InvalidArgument) as err:
        resolve(**kw)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_sd3_needs_multiples_of_16():
    limits = SizeLimits(multiple=16, min_side=16, max_side=128, default_side=64)
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        resolve_spec(request_from_names("p", width=40), limits, MODEL_DEFAULTS["sd3"])


def test_unset_seed_is_random_and_reported():
    seeds = {resolve().seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**64 for s in seeds)
    assert resolve(seed=0).seed == 0


def test_an_empty_negative_prompt_is_not_none():
    assert resolve(negative_prompt="").negative_prompt == ""
    assert resolve().negative_prompt is None


def test_enums_resolve_and_unset_means_default():
    spec = resolve(
        mode=Mode.CFG_PARALLEL,
        window_guidance=int(WindowGuidance.FULL_CFG),
        output_format=0,
        num_images=0,
        quality=0,
    )
    assert (spec.mode, spec.window_guidance, spec.output_format) == (
        Mode.CFG_PARALLEL,
        WindowGuidance.FULL_CFG,
        OutputFormat.PNG,
    )
    assert spec.num_images == 1 and resolve(num_images=4).num_images == 4


def test_unknown_hybrid_parameter_is_named():
    with pytest.raises(InvalidArgument) as err:
        request_from_names("p", hybrid={"tau": 3})
    assert err.value.field == "hybrid.tau"

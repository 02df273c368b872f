"""The in-process engine: every mode, determinism, data-plane traffic per phase."""

import io

import pytest
import torch
from cluster_helpers import make_input
from PIL import Image

from hybridiff.protocol import Phase, WindowGuidance, label
from hybridiff.wire import tensor_from_proto


def _run(eng, **kw):
    base = dict(
        prompt="a blue circle on the left",
        num_steps=12,
        seed=11,
        guidance_scale=5.0,
        l_slope=3,
        tau_cap=6,
        k=3,
    )
    base.update(kw)
    return eng.generate(eng.resolve(make_input(**base)))


def _strip_timings(stats):
    d = stats.to_dict()
    d.pop("encoding_seconds"), d.pop("denoising_seconds"), d.pop("decoding_seconds")
    for s in d["steps"]:
        for key in [k for k in s if k.endswith("_seconds")]:
            s.pop(key)
        s.pop("workers")
    return d


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["single", "cfg-parallel", "pipeline", "hybrid"])
def test_same_request_twice_is_identical(engines, arch, mode):
    a = _run(engines[arch], mode=mode, request_id="same")
    b = _run(engines[arch], mode=mode, request_id="same")
    assert a.images[0] == b.images[0]
    assert _strip_timings(a.stats) == _strip_timings(b.stats)
    assert a.images[0].startswith(b"\x89PNG")


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_bytes_per_phase(engines, arch):
    eng = engines[arch]
    r = _run(eng, mode="hybrid")
    s = r.stats
    assert s.tau1_source == "tau_cap" and (s.tau1, s.tau2) == (6, 9)
    phases = [p.phase for p in s.steps]
    assert (
        phases
        == [Phase.DATA_PARALLEL] * 6
        + [Phase.PIPELINE_FILL]
        + [Phase.PIPELINE] * 3
        + [Phase.DATA_PARALLEL] * 2
    )
    latent_bytes = 4 * eng.adapter.denoiser.config.in_channels * (eng.adapter.default_size // 8) ** 2
    for step in s.steps:
        per_worker = [w.bytes_sent for w in step.workers.values()]
        if step.phase == Phase.DATA_PARALLEL:
            # one prediction each way, nothing else (plus the small header frame)
            assert all(latent_bytes <= b < latent_bytes + 256 for b in per_worker)
            assert step.rel_mae is not None and step.rel_mae > 0
        else:
            assert step.rel_mae is None
    assert s.data_plane_bytes == sum(p.bytes_sent for p in s.steps)
    assert s.workers == ["U", "C"] and s.window_guidance == WindowGuidance.CONDITIONAL


POLICIES = ["conditional", "last-difference", "full-cfg", "refreshed-difference", "extrapolated-difference"]


@pytest.mark.parametrize("policy", POLICIES)
def test_window_policies_run_and_differ_only_in_the_window(engines, policy):
    eng = engines["sdxl"]
    exact = _run(eng, mode="cfg-parallel")
    r = _run(eng, mode="hybrid", window_guidance=policy)
    assert label(r.stats.window_guidance) == policy
    # before the window both are the same exact CFG run
    assert [s.rel_mae for s in r.stats.steps[:6]] == [s.rel_mae for s in exact.stats.steps[:6]]


@pytest.mark.parametrize(
    "arch,policy",
    [("sdxl", "refreshed-difference"), ("sd3", "refreshed-difference"), ("sdxl", "extrapolated-difference")],
)
def test_a_window_refreshed_every_step_is_exact_cfg(engines, arch, policy):
    """Every refresh step is the exact CFG step (the conditional branch through the stages equals
    its full forward), so refreshing every window step gives the cfg-parallel image bit for bit;
    every second step gives another image, pipelined in between. Only the refreshing policies
    refresh."""
    eng = engines[arch]
    exact = _run(eng, mode="cfg-parallel")
    every = _run(eng, mode="hybrid", window_guidance=policy, refresh_every=1)
    assert [s.phase for s in every.stats.steps][6:10] == [Phase.PIPELINE_FILL] * 4
    assert every.images[0] == exact.images[0]
    second = _run(eng, mode="hybrid", window_guidance=policy, refresh_every=2)
    assert [s.phase for s in second.stats.steps][6:10] == [Phase.PIPELINE_FILL, Phase.PIPELINE] * 2
    assert second.images[0] != exact.images[0]
    last_difference = _run(eng, mode="hybrid", window_guidance="last-difference", refresh_every=2)
    assert [s.phase for s in last_difference.stats.steps][6:8] == [Phase.PIPELINE_FILL, Phase.PIPELINE]


def test_single_needs_no_peer_traffic(engines):
    r = _run(engines["sdxl"], mode="single")
    assert r.stats.data_plane_bytes == 0 and r.stats.workers == ["U"]
    assert all(s.phase == Phase.SINGLE and s.rel_mae is not None for s in r.stats.steps)


def test_raw_latents_output(engines):
    r = _run(engines["sd3"], mode="cfg-parallel", output_format="raw-latents")
    latents = tensor_from_proto(r.latents)
    assert r.images == [] and latents.dtype == torch.float32 and latents.shape[0] == 1


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_image_formats_decode(engines, fmt, magic):
    r = _run(engines["sdxl"], mode="single", output_format=fmt)
    assert r.images[0].startswith(magic) and r.mime_type == f"image/{fmt}"
    image = Image.open(io.BytesIO(r.images[0]))
    image.load()
    assert image.size == (engines["sdxl"].adapter.default_size,) * 2

"""The in-process engine: every mode, determinism, data-plane traffic per phase."""
import pytest

from hybridiff.request import RequestInput


def _run(eng, **kw):
    base = dict(prompt="a blue circle on the left", num_steps=12, seed=11, guidance_scale=5.0,
                l_slope=3, tau_cap=6, k=3)
    base.update(kw)
    return eng.generate(eng.resolve(RequestInput(**base)))


def _strip_timings(stats):
    d = stats.to_dict()
    d.pop("encoding_seconds"), d.pop("denoising_seconds"), d.pop("decoding_seconds")
    for s in d["steps"]:
        s.pop("wall_seconds"), s.pop("compute_seconds"), s.pop("workers")
    return d


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["single", "cfg-parallel", "pipeline", "hybrid"])
def test_same_request_twice_is_identical(engines, arch, mode):
    a = _run(engines[arch], mode=mode, request_id="same")
    b = _run(engines[arch], mode=mode, request_id="same")
    assert a.image_png == b.image_png
    assert _strip_timings(a.stats) == _strip_timings(b.stats)
    assert a.image_png.startswith(b"\x89PNG")


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_bytes_per_phase(engines, arch):
    eng = engines[arch]
    r = _run(eng, mode="hybrid")
    s = r.stats
    assert s.tau1_source == "tau_cap" and (s.tau1, s.tau2) == (6, 9)
    phases = [p.phase for p in s.steps]
    assert phases == ["data_parallel"] * 6 + ["pipeline_fill"] + ["pipeline"] * 3 + ["data_parallel"] * 2
    latent_bytes = 4 * eng.adapter.denoiser.config.in_channels * (eng.adapter.default_size // 8) ** 2
    for step in s.steps:
        per_worker = [w["bytes_sent"] for w in step.workers.values()]
        if step.phase == "data_parallel":
            # one prediction each way, nothing else (plus the small header frame)
            assert all(latent_bytes <= b < latent_bytes + 256 for b in per_worker)
            assert step.rel_mae is not None and step.rel_mae > 0
        else:
            assert step.rel_mae is None
    assert s.data_plane_bytes == sum(p.bytes_sent for p in s.steps)
    assert s.workers == ["U", "C"] and s.window_guidance == "conditional"


@pytest.mark.parametrize("policy", ["conditional", "last-difference", "full-cfg"])
def test_window_policies_run_and_differ_only_in_the_window(engines, policy):
    eng = engines["sdxl"]
    exact = _run(eng, mode="cfg-parallel")
    r = _run(eng, mode="hybrid", window_guidance=policy)
    assert r.stats.window_guidance == policy
    # before the window both are the same exact CFG run
    assert [s.rel_mae for s in r.stats.steps[:6]] == [s.rel_mae for s in exact.stats.steps[:6]]


def test_single_needs_no_peer_traffic(engines):
    r = _run(engines["sdxl"], mode="single")
    assert r.stats.data_plane_bytes == 0 and r.stats.workers == ["U"]
    assert all(s.phase == "single" and s.rel_mae is not None for s in r.stats.steps)


def test_raw_latents_output(engines):
    r = _run(engines["sd3"], mode="cfg-parallel", output_format="raw-latents")
    assert r.image_png is None and r.latents.dtype.is_floating_point

"""The frontier's speed side: the schedule model on the committed H200 profile, behind one call."""

import json
from pathlib import Path

import pytest

from hybridiff_tools.bench.frontier import (
    Measurement,
    ScoredImage,
    batch_linear,
    mean_psnr,
    parse_lengths,
    predicted_speedups,
    profile_device,
    worst_psnr,
)

PROFILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "gpu_profile_h200_fp16.json"


def test_no_window_is_predicted_as_cfg_parallel_and_a_window_as_faster():
    device = profile_device(PROFILE, "h200")
    none = predicted_speedups(device, 30, 12, "slope", k=0, window_batch=1)
    assert none["hybrid"] == pytest.approx(none["cfg-parallel"])
    ten = predicted_speedups(device, 30, 12, "slope", k=10, window_batch=1)
    assert ten["hybrid"] > none["hybrid"]


def test_on_a_device_without_batching_gain_the_full_cfg_window_buys_nothing_over_cfg_parallel():
    eager = profile_device(PROFILE, "h200")
    linear = batch_linear(eager, "2x-batch")
    assert linear.compute.forward_b2 == 2 * eager.compute.forward_b1
    assert linear.compute.stages_b2.stage2 == 2 * eager.compute.stages_b1.stage2
    conditional = predicted_speedups(linear, 30, 12, "slope", k=10, window_batch=1)
    full_cfg = predicted_speedups(linear, 30, 12, "slope", k=10, window_batch=2)
    assert full_cfg["hybrid"] <= conditional["cfg-parallel"] < conditional["hybrid"]


def test_window_lengths_parse_with_all_as_every_step():
    assert parse_lengths("4, 2,all", 30) == [2, 4, 30]
    with pytest.raises(ValueError):
        parse_lengths("0,2", 30)


def test_a_run_is_read_the_same_from_the_public_stats():
    from hybridiff.protocol import Phase, WindowGuidance
    from hybridiff.v1 import diffusion_pb2 as pb
    from hybridiff_tools.bench.frontier import run_from

    phases = [Phase.DATA_PARALLEL] * 3 + [Phase.PIPELINE_FILL, Phase.PIPELINE, Phase.DATA_PARALLEL]
    stats = pb.GenerateStats(
        tau1=2,
        tau1_source="slope",
        window_guidance=WindowGuidance.FULL_CFG,
        denoising_seconds=1.5,
        steps=[pb.StepStat(step=i, phase=p) for i, p in enumerate(phases)],
    )
    run = run_from(b"png", stats)
    assert (run.tau1, run.tau1_source, run.window_steps, run.window_batch, run.denoise) == (
        2,
        "slope",
        2,
        2,
        1.5,
    )
    no_window = run_from(b"png", pb.GenerateStats(steps=[pb.StepStat(phase=Phase.DATA_PARALLEL)]))
    assert (no_window.tau1, no_window.window_steps, no_window.window_batch) == (None, 0, 1)


def test_the_calibration_floor_is_the_worst_image_not_the_mean():
    def image(seed: int, k: int, db: float) -> ScoredImage:
        return ScoredImage("p", seed, "conditional", k, db, 0.99, None, 3, "slope", k, 1, 1.0)

    measured = Measurement(
        30, 5.0, [2, 4], [image(0, 2, 50.0), image(1, 2, 46.0), image(0, 4, 48.0), image(1, 4, 40.0)]
    )
    assert mean_psnr(measured) == {"conditional": {2: 48.0, 4: 44.0}}
    assert worst_psnr(measured) == {"conditional": {2: 46.0, 4: 40.0}}


def test_a_refreshing_run_is_priced_with_its_refresh_fills():
    """The period is read off the run's fills; the schedule model then prices every refresh fill
    as a data-parallel step, so the refreshed window is slower than last-difference's."""
    from hybridiff.protocol import Phase, WindowGuidance
    from hybridiff.v1 import diffusion_pb2 as pb
    from hybridiff_tools.bench.frontier import run_from

    fill, pipelined, dp = Phase.PIPELINE_FILL, Phase.PIPELINE, Phase.DATA_PARALLEL
    phases = [dp] * 3 + [fill, pipelined, pipelined, fill, pipelined, dp]

    def run(policy, steps=phases):
        stats = pb.GenerateStats(
            window_guidance=policy, steps=[pb.StepStat(step=i, phase=p) for i, p in enumerate(steps)]
        )
        return run_from(b"png", stats)

    assert run(WindowGuidance.REFRESHED_DIFFERENCE).refresh_every == 3
    assert run(WindowGuidance.EXTRAPOLATED_DIFFERENCE, [dp, fill, pipelined, dp]).refresh_every == 2
    assert run(WindowGuidance.LAST_DIFFERENCE).refresh_every == 0
    device = profile_device(PROFILE, "h200")
    last = predicted_speedups(device, 30, 12, "slope", k=10, window_batch=1)
    refreshed = predicted_speedups(device, 30, 12, "slope", k=10, window_batch=1, refresh_every=3)
    assert last["cfg-parallel"] < refreshed["hybrid"] < last["hybrid"]


def _png(level: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (level, level, level)).save(out, format="PNG")
    return out.getvalue()


def _fake_generate(calls: list):
    """A generator whose HYBRID image strays from exact CFG by the window's length, and PIPELINE's
    by a fixed amount; every request is recorded in ``calls``."""
    from hybridiff.protocol import Mode
    from hybridiff_tools.bench.frontier import Run

    def generate(request):
        calls.append((request.prompt, request.seed, request.mode))
        level = 100 + {Mode.HYBRID: request.hybrid.k, Mode.PIPELINE: 3}.get(request.mode, 0)
        return Run(_png(level), 10, "slope", 2, 1, 1.0)

    return generate


def test_a_frontier_resumes_the_cases_a_partial_run_saved():
    from hybridiff.protocol import WindowGuidance
    from hybridiff_tools.bench.frontier import Case, measure

    cases = [Case("a", 1), Case("b", 1), Case("a", 2)]
    settings = dict(lengths=[1, 2], steps=30, guidance=5.0, window_policies=[WindowGuidance.CONDITIONAL])
    saved = []
    first_calls: list = []
    full = measure(
        _fake_generate(first_calls),
        cases,
        pipeline=True,
        on_case=lambda m: saved.append(m.to_json()),
        **settings,
    )
    assert len(saved) == 3 and len(saved[0]["images"]) == 2  # saved after each case, whole cases only

    partial = Measurement.from_json(saved[0])
    calls: list = []
    resumed = measure(_fake_generate(calls), cases, pipeline=True, done=partial, **settings)
    assert {(p, s) for p, s, _ in calls} == {("b", 1), ("a", 2)}  # the saved case is not run again
    assert resumed.to_json() == full.to_json()
    with pytest.raises(ValueError, match="other steps"):
        measure(_fake_generate([]), cases, done=partial, **{**settings, "lengths": [1, 4]})


def test_pipeline_is_a_row_of_the_frontier_with_its_own_quality_and_predicted_speed():
    from hybridiff.protocol import WindowGuidance
    from hybridiff_tools.bench.frontier import Case, format_table, frontier, measure

    measured = measure(
        _fake_generate([]),
        [Case("a", 1), Case("b", 1)],
        lengths=[2],
        steps=30,
        guidance=5.0,
        window_policies=[WindowGuidance.CONDITIONAL],
        pipeline=True,
    )
    device = profile_device(PROFILE, "h200")
    result = frontier(measured, [device])
    row = result["pipeline"]
    assert row["images"] == 2 and row["psnr_db_min"] == pytest.approx(psnr_of_levels(100, 103))
    assert row["predicted_speedup"]["h200"] == pytest.approx(
        predicted_speedups(device, 30, 10, "slope", 2, 1)["pipeline"]
    )
    assert "| PIPELINE (mode) | - | 27 |" in format_table(result, ["h200"])


def psnr_of_levels(a: int, b: int) -> float:
    import math

    return 10 * math.log10(255**2 / (a - b) ** 2)


def test_a_resumed_frontier_keeps_only_the_cases_asked_for_now_and_refuses_another_model(tmp_path):
    from hybridiff.protocol import WindowGuidance
    from hybridiff_tools.bench.frontier import Case, measure
    from hybridiff_tools.bench.frontier_cli import partial_record, resumed

    policies = [WindowGuidance.CONDITIONAL]
    settings = dict(lengths=[2], steps=30, guidance=5.0, window_policies=policies)
    earlier = measure(_fake_generate([]), [Case("a", 1), Case("old", 1)], **settings)
    partial = tmp_path / "frontier.partial.json"
    partial.write_text(json.dumps(partial_record(earlier, tmp_path / "model", policies)))
    done = resumed(partial, tmp_path / "model", policies)
    calls: list = []
    now = measure(_fake_generate(calls), [Case("a", 1), Case("b", 1)], done=done, **settings)
    assert set(now.exact) == {("a", 1), ("b", 1)} and {p for p, _, _ in calls} == {"b"}
    assert {im.prompt for im in now.images} == {"a", "b"}  # "old" was not asked for: not kept
    for model, other in ((tmp_path / "other", policies), (tmp_path / "model", [WindowGuidance.FULL_CFG])):
        with pytest.raises(SystemExit, match="run without --resume"):
            resumed(partial, model, other)


def test_a_resume_with_every_case_in_starts_no_cluster_and_keeps_only_the_cases_asked_for(tmp_path):
    from tqdm import tqdm

    from hybridiff.protocol import WindowGuidance
    from hybridiff_tools.bench.frontier import Case, measure
    from hybridiff_tools.bench.frontier_cli import run_on_cluster

    settings = dict(lengths=[2], steps=30, guidance=5.0, window_policies=[WindowGuidance.CONDITIONAL])
    done = measure(_fake_generate([]), [Case("a", 1), Case("old", 1)], **settings)
    with tqdm(disable=True) as bar:  # no model folder there: a cluster start would fail
        again = run_on_cluster(
            tmp_path / "none", tmp_path / "logs", [Case("a", 1)], bar, done=done, **settings
        )
        assert set(again.exact) == {("a", 1)} and {im.prompt for im in again.images} == {"a"}
        with pytest.raises(ValueError, match="other steps"):
            run_on_cluster(
                tmp_path / "none",
                tmp_path / "logs",
                [Case("a", 1)],
                bar,
                done=done,
                **{**settings, "steps": 50},
            )

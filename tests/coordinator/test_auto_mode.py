"""Cost-aware AUTO on recorded costs: the schedule it chooses follows the device's batch economics
and stays inside the calibration's windows; the cost book that feeds it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.allocation import CostBook
from coordinator.auto_mode import (
    CALIBRATED,
    UNCALIBRATED,
    DeviceCosts,
    Schedule,
    calibrated,
    candidates,
    choose,
    hybrid_window_steps,
    predict,
)
from coordinator.device_costs import DeviceCostBook
from coordinator.driver import StepStat
from coordinator.latency_model import ComputeTimes, LinkModel, StageTimes, TensorBytes
from hybridiff.calibration import Calibration, PolicyCalibration
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Mode, Phase, WindowGuidance
from hybridiff.request import HybridParams
from hybridiff_launch.predict import profile_costs as predict_profile_costs

ROOT = Path(__file__).resolve().parents[2]
C, LD, FULL = WindowGuidance.CONDITIONAL, WindowGuidance.LAST_DIFFERENCE, WindowGuidance.FULL_CFG
# As measured on the default model (50 steps): PIPELINE's 47-step FULL_CFG run keeps 47.2 dB,
# a 10-step CONDITIONAL window falls to 38.5 dB.
MEASURED = Calibration(
    floor_db=45.0,
    num_steps=50,
    guidance_scale=5.0,
    policies={
        FULL: PolicyCalibration({2: 62.0, 10: 55.0, 25: 50.1, 47: 47.2}),
        C: PolicyCalibration({2: 53.0, 5: 46.1, 10: 38.5}),
        LD: PolicyCalibration({2: 54.0, 5: 46.8, 10: 40.2}),
    },
    pipeline_db=47.2,
)
DEFAULTS = HybridParams(l_slope=8, eps_slope=0.004, k=10, tau_cap=25)  # the default model's


def profile_costs(arch: str) -> DeviceCosts:
    """The H200 CUDA-graph profile's costs (docs/benchmarks), with its link."""
    doc = json.loads((ROOT / "docs/benchmarks/gpu_profile_h200_fp16_cudagraphs.json").read_text())
    return predict_profile_costs(doc, arch)


def cpu_standin_costs() -> DeviceCosts:
    """The CPU stand-in's measured compute (docs/benchmarks/cpu/bench.json), nested as its runner
    models it (the outer ring split evenly before and after the core)."""
    c = json.loads((ROOT / "docs/benchmarks/cpu/bench.json").read_text())["compute_seconds"]

    def stages(b: str) -> StageTimes:
        return StageTimes.nested(c[f"stage1_{b}"] / 2, c[f"stage2_{b}"], c[f"stage1_{b}"] / 2)

    return DeviceCosts(ComputeTimes("nested", c["b1"], c["b2"], stages("b1"), stages("b2")))


def doubling_costs(f1: float = 0.1) -> DeviceCosts:
    """A device where a batch of 2 costs two batches of 1 (the paper's RTX 3090)."""
    b1 = StageTimes(f1 / 2, f1 / 2)
    b2 = StageTimes(f1, f1)
    return DeviceCosts(ComputeTimes("sequential", f1, 2 * f1, b1, b2))


def test_batch_one_windows_where_a_batch_of_two_costs_two():
    for costs in (doubling_costs(), cpu_standin_costs()):
        choice = choose(costs, MEASURED, 50, DEFAULTS)
        s = choice.schedule
        assert s.mode == Mode.HYBRID and s.window_guidance in (C, LD)
        # The longest window the calibration keeps above 45 dB (5 steps): k = 4.
        assert s.window_steps == 5 and s.k == 4
        assert choice.speedup_vs_cfg_parallel > 1 and calibrated(choice) and choice.basis == CALIBRATED


def test_batch_two_windows_where_a_batch_of_two_is_nearly_free():
    choice = choose(profile_costs("sdxl"), MEASURED, 50, DEFAULTS)
    assert choice.schedule.window_guidance == FULL and choice.mode == Mode.PIPELINE
    assert choice.schedule.window_steps == 47
    # The schedule model's own PIPELINE prediction on that profile (BENCHMARKS: 1.84x).
    assert choice.speedup_vs_single == pytest.approx(1.837, abs=0.005)
    assert choice.speedup_vs_cfg_parallel > 1.15


def test_pipeline_runs_only_where_it_was_measured_above_the_floor():
    """FULL_CFG windows calibrated for every length say nothing of PIPELINE, whose stale steps
    start at its warm-up: without a measured PIPELINE (or one below the floor), a long HYBRID
    FULL_CFG window instead, still at batch 2."""
    for pipeline_db in (None, 43.7):
        calibration = replace(MEASURED, pipeline_db=pipeline_db)
        choice = choose(profile_costs("sdxl"), calibration, 50, DEFAULTS)
        assert choice.mode == Mode.HYBRID and choice.schedule.window_guidance == FULL
        assert choice.schedule.window_steps == 25  # from tau_cap 25 to the last step


def test_full_cfg_windows_shorter_than_pipeline_keep_hybrid():
    """FULL_CFG allowed for 25 steps only: no PIPELINE (47 stale steps), a long HYBRID window."""
    short = Calibration(45.0, 50, 5.0, {FULL: PolicyCalibration({25: 50.0, 47: 44.0})})
    choice = choose(profile_costs("sdxl"), short, 50, DEFAULTS)
    assert choice.mode == Mode.HYBRID and choice.schedule.window_guidance == FULL
    assert choice.schedule.window_steps == hybrid_window_steps(50, 25, choice.schedule.k) == 25


def test_no_window_above_the_floor_runs_the_exact_split():
    bad = Calibration(45.0, 50, 5.0, {C: PolicyCalibration({2: 40.0}), FULL: PolicyCalibration({2: 44.0})})
    assert choose(doubling_costs(), bad, 50, DEFAULTS).mode == Mode.CFG_PARALLEL


def test_the_calibration_scales_with_the_request_steps():
    assert choose(doubling_costs(), MEASURED, 100, DEFAULTS).schedule.window_steps == 5  # never up
    assert choose(doubling_costs(), MEASURED, 30, DEFAULTS).schedule.window_steps == 3  # 5 of 50 down


def test_without_a_calibration_auto_runs_hybrid_as_before_and_still_predicts():
    choice = choose(profile_costs("sdxl"), None, 50, DEFAULTS)
    assert choice.schedule == Schedule(Mode.HYBRID, C, 10, 11)
    assert choice.basis == UNCALIBRATED and not calibrated(choice)
    assert 0 < choice.predicted_seconds < choice.single_seconds


def test_a_requested_window_policy_or_k_is_kept():
    conditional = choose(profile_costs("sdxl"), MEASURED, 50, DEFAULTS, window_guidance=C)
    assert conditional.schedule == Schedule(Mode.HYBRID, C, 4, 5)  # not the FULL_CFG pipeline
    # A FULL_CFG window step costs a data-parallel step where a batch of 2 costs two: no window.
    assert choose(doubling_costs(), MEASURED, 50, DEFAULTS, window_guidance=FULL).mode == Mode.CFG_PARALLEL
    with_k = choose(profile_costs("sdxl"), MEASURED, 50, DEFAULTS, k=3)
    assert with_k.mode == Mode.HYBRID and with_k.schedule.k == 3


def test_a_link_too_slow_for_a_pair_keeps_one_worker():
    slow = DeviceCosts(
        doubling_costs().compute, TensorBytes(prediction=10**9, boundary_b1=10**9), LinkModel(1e9, 0.5)
    )
    assert choose(slow, MEASURED, 20, DEFAULTS).mode == Mode.SINGLE


def test_the_prediction_matches_the_profiles_hybrid():
    """The one schedule model: HYBRID at tau1 = 15, k = 5, batch 1 as BENCHMARKS states (1.63x)."""
    costs = profile_costs("sdxl")
    hybrid = predict(costs, Schedule(Mode.HYBRID, C, 5), 50, 15)
    single = predict(costs, Schedule(Mode.SINGLE), 50, 15)
    assert single / hybrid == pytest.approx(1.634, abs=0.002)


def measured_split(f1=0.1, f2=0.16) -> worker_pb2.MeasureSplitResponse:
    def costs(f):
        return worker_pb2.PhaseCosts(
            forward_seconds=f,
            stage1_seconds=f / 2,
            stage2_seconds=f / 2,
            stage1_pre_seconds=f / 4,
            stage1_post_seconds=f / 4,
        )

    return worker_pb2.MeasureSplitResponse(cut=2, topology="nested", batch1=costs(f1), batch2=costs(f2))


def step(phase: Phase, wall: float) -> StepStat:
    return StepStat(step=0, phase=phase, rel_mae=None, bytes_sent=0, wall_seconds=wall, compute_seconds=wall)


def test_the_cost_book_keeps_the_measured_costs_and_refines_them_with_steps():
    book, key = DeviceCostBook(weight=0.5), ("m", 64, 64)
    assert book.costs(key) is None
    book.measured(key, worker_pb2.MeasureSplitResponse(cut=2))  # an older worker: no costs
    assert book.costs(key) is None
    book.measured(key, measured_split())
    book.measured(key, measured_split(f1=9.0, f2=9.0))  # the first measurement of a size stays
    c = book.costs(key).compute
    assert (c.forward_b1, c.forward_b2, c.stages_b2.pre, c.stages_b2.stage2) == (0.1, 0.16, 0.04, 0.08)
    book.observe(key, [step(Phase.SINGLE, 9.0)] + [step(Phase.SINGLE, 0.2)] * 3, None)
    book.observe(key, [step(Phase.DATA_PARALLEL, 0.12)] * 4, None)
    window = (
        [step(Phase.PIPELINE_FILL, 0.3)] + [step(Phase.PIPELINE, 0.16)] * 3 + [step(Phase.PIPELINE, 0.01)]
    )
    book.observe(key, [step(Phase.DATA_PARALLEL, 0.12)] + window, FULL)
    c = book.costs(key).compute
    assert c.forward_b2 == pytest.approx(0.18)  # the first step (after a begin) left out
    assert c.forward_b1 == pytest.approx(0.11)  # once: the last request's one DP step is its first
    assert c.stages_b1.stage2 == pytest.approx(0.055)  # the stages scale with their forward
    # The batch-2 stages scaled with their forward (x 1.125: 0.09 each), then steady window steps
    # at 0.16 against the slower stage's 0.09 move them half-way (x 1.389); the last window step
    # (nothing sent forward) is not a steady one.
    assert c.stages_b2.stage2 == pytest.approx(0.125) and c.stages_b2.pre == pytest.approx(0.0625)


def test_the_allocation_policy_weighs_the_schedule_auto_chose():
    book = CostBook()
    book.observe("m", "single", 1.0)
    book.observe("m", "paired", 0.6)
    book.observe("m", "switch", 0.3)
    assert book.costs("m").paired == 0.6
    book.predicted("m", single=1.0, paired=0.45)
    costs = book.costs("m")
    assert (costs.single, costs.paired, costs.switch) == (1.0, 0.45, 0.3)
    assert not costs.pair_spends_capacity()  # 2 x 0.45 < 1.0: the pair is free capacity


# --- the refreshing policies ----------------------------------------------------------------------
RD, XD = WindowGuidance.REFRESHED_DIFFERENCE, WindowGuidance.EXTRAPOLATED_DIFFERENCE


def test_a_refreshing_window_is_priced_with_its_data_parallel_fills():
    """Doubling device, f1 = 0.1, stages 0.05: a refresh fill costs a data-parallel step (0.1), a
    pipelined step 0.05. The default window 25..35 refreshed every 5: fills at 25, 30, 35."""
    costs = doubling_costs()
    refreshed = choose(costs, None, 50, DEFAULTS, window_guidance=RD)
    assert refreshed.schedule == Schedule(Mode.HYBRID, RD, 10, 11, refresh_every=5)
    assert refreshed.predicted_seconds == pytest.approx(39 * 0.1 + 3 * 0.1 + 8 * 0.05)
    last = choose(costs, None, 50, DEFAULTS, window_guidance=LD)
    assert last.schedule.refresh_every == 0
    assert last.predicted_seconds == pytest.approx(39 * 0.1 + 0.1 + 10 * 0.05)
    every_2nd = predict(costs, Schedule(Mode.HYBRID, XD, 10, 11, refresh_every=2), 50, 25)
    assert every_2nd == pytest.approx(39 * 0.1 + 6 * 0.1 + 5 * 0.05)
    assert "refreshed every 5" in refreshed.describe() and refreshed.to_dict()["refresh_every"] == 5


def test_auto_takes_a_longer_refreshed_window_the_calibration_keeps_above_the_floor():
    """Last-difference holds 5 steps above 45 dB, refreshed-difference 20 (as on the default model,
    BENCHMARKS): the refreshed window, 4 fills and 16 pipelined steps, wins where a batch of 2
    costs two. Extrapolated-difference, not calibrated, is never chosen."""
    calibration = Calibration(
        45.0, 50, 5.0, {**MEASURED.policies, RD: PolicyCalibration({5: 55.0, 10: 50.0, 20: 46.0, 30: 42.0})}
    )
    choice = choose(doubling_costs(), calibration, 50, DEFAULTS)
    assert choice.schedule == Schedule(Mode.HYBRID, RD, 19, 20, refresh_every=5)
    assert choice.predicted_seconds == pytest.approx(30 * 0.1 + 4 * 0.1 + 16 * 0.05)
    assert choose(doubling_costs(), calibration, 50, DEFAULTS, window_guidance=XD).mode == Mode.CFG_PARALLEL
    # the request's own period prices the window
    every_2nd = choose(doubling_costs(), calibration, 50, DEFAULTS.replace(refresh_every=2))
    assert every_2nd.schedule.refresh_every == 2 and every_2nd.predicted_seconds > choice.predicted_seconds


def test_auto_never_runs_a_refreshing_policy_in_pipeline_mode():
    """PIPELINE's window has no refreshes, so a refreshing policy's calibration says nothing of it."""
    everywhere = Calibration(
        45.0, 50, 5.0, {RD: PolicyCalibration({47: 60.0}), XD: PolicyCalibration({47: 60.0})}
    )
    schedules = candidates(everywhere, 50, DEFAULTS)
    assert {s.window_guidance for s in schedules if s.mode == Mode.HYBRID} == {RD, XD}
    assert not [s for s in schedules if s.mode == Mode.PIPELINE]
    choice = choose(profile_costs("sdxl"), everywhere, 50, DEFAULTS)
    assert choice.mode == Mode.HYBRID and choice.schedule.window_guidance in (RD, XD)


def test_the_cost_book_takes_a_refreshing_request_s_steps():
    """Refreshed every 3rd step: of each fill's two pipelined steps the first is steady (batch 1)."""
    book, key = DeviceCostBook(weight=0.5), ("m", 64, 64)
    book.measured(key, measured_split())
    window = [step(Phase.PIPELINE_FILL, 0.12), step(Phase.PIPELINE, 0.06), step(Phase.PIPELINE, 0.01)] * 2
    book.observe(key, [step(Phase.DATA_PARALLEL, 0.1)] * 2 + window + [step(Phase.DATA_PARALLEL, 0.1)], RD)
    # the steady steps at 0.06 against the slower batch-1 stage's 0.05 move them half-way (x 1.1)
    assert book.costs(key).compute.stages_b1.stage2 == pytest.approx(0.055)


def eager_costs(arch: str = "sdxl") -> DeviceCosts:
    """The eager H200 profile's costs (a batch of 2 costs about 1.06 batches of 1)."""
    doc = json.loads((ROOT / "docs/benchmarks/gpu_profile_h200_fp16.json").read_text())
    return predict_profile_costs(doc, arch)


def batch_linear_costs(costs: DeviceCosts) -> DeviceCosts:
    """The same device if a batch of 2 cost two batches of 1 (the paper's GPU's economics)."""
    ct = costs.compute
    b1 = ct.stages_b1
    b2 = StageTimes(2 * b1.stage1, 2 * b1.stage2, 2 * b1.pre, 2 * b1.post)
    return replace(
        costs, compute=ComputeTimes(ct.topology, ct.forward_b1, 2 * ct.forward_b1, b1, b2, ct.update)
    )


def test_the_shipped_calibration_runs_window_steps_at_the_batch_each_device_favours():
    """The embedded default model's calibration, SDXL's hybrid defaults at 50 steps. Where a batch
    of 2 is nearly free (H200 eager) the window carries both branches (FULL_CFG, batch 2); where it
    costs two batches of 1 (the same device made batch-linear, the doubling device, the CPU stand-in)
    the window steps run at batch 1. With CUDA graphs (b2/b1 1.57) a batch-1 refreshed window, one
    data-parallel refresh every 5 steps, prices below the batch-2 window and is above the floor on
    this model: AUTO takes it, and FULL_CFG's own best would be slower."""
    from hybridiff.calibration import read_calibration

    shipped = read_calibration(ROOT / "models/shapes-sdxl")
    eager = choose(eager_costs(), shipped, 50, DEFAULTS)
    assert eager.schedule.window_guidance == FULL and eager.schedule.window_steps > 10
    assert eager.speedup_vs_cfg_parallel > 1
    for costs in (batch_linear_costs(eager_costs()), doubling_costs(), cpu_standin_costs()):
        choice = choose(costs, shipped, 50, DEFAULTS)
        assert choice.mode == Mode.HYBRID and choice.schedule.window_guidance != FULL
        assert choice.speedup_vs_cfg_parallel > 1 and calibrated(choice)
    graphs = choose(profile_costs("sdxl"), shipped, 50, DEFAULTS)
    best_full = choose(profile_costs("sdxl"), shipped, 50, DEFAULTS, window_guidance=FULL)
    assert graphs.schedule.window_guidance in (RD, XD) and graphs.schedule.refresh_every > 0
    assert graphs.predicted_seconds < best_full.predicted_seconds


def test_windows_are_priced_from_where_the_calibration_saw_the_curve_settle():
    """Recorded tau1 13 of 30 steps (the default model's slope rule fires at 11-17): at 50 steps the
    window is priced from step 22, not from tau_cap 25. A policy kept above the floor at every
    length runs with k = every step, so a request whose curve settles earlier still pipelines to
    the end; a policy allowed 5 steps is priced at 5 from the expected opening."""
    everywhere = Calibration(45.0, 30, 5.0, {RD: PolicyCalibration({2: 60.0, 30: 50.0})}, tau1=13)
    choice = choose(doubling_costs(), everywhere, 50, DEFAULTS)
    assert choice.schedule == Schedule(Mode.HYBRID, RD, 50, 27, refresh_every=5)  # steps 23..49
    # 23 data-parallel steps, then 27 window steps: fills at 23, 28, ... 48 (6), 21 pipelined
    assert choice.predicted_seconds == pytest.approx(23 * 0.1 + 6 * 0.1 + 21 * 0.05)
    at_cap = replace(everywhere, tau1=None)
    assert choose(doubling_costs(), at_cap, 50, DEFAULTS).schedule.window_steps == 25  # 25..49
    assert choose(doubling_costs(), at_cap, 50, DEFAULTS).schedule.k == 49

    short = Calibration(45.0, 50, 5.0, {C: PolicyCalibration({5: 46.0, 10: 40.0})}, tau1=20)
    conditional = choose(doubling_costs(), short, 50, DEFAULTS)
    assert conditional.schedule == Schedule(Mode.HYBRID, C, 5, 5)
    assert conditional.predicted_seconds == pytest.approx(45 * 0.1 + 0.1 + 4 * 0.05)  # its fill, 4 pipelined

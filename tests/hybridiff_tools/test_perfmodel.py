"""The schedule latency model against hand-computed cases of the step protocol."""

from __future__ import annotations

import math

import pytest

from hybridiff.protocol import Mode, Phase
from hybridiff_tools.bench.perfmodel import (
    ComputeTimes,
    FixedCosts,
    LinkModel,
    ScheduleParams,
    StageTimes,
    TensorBytes,
    predict_modes,
    simulate,
)

SINGLE, DATA_PARALLEL = Phase.SINGLE, Phase.DATA_PARALLEL
PIPELINE_FILL, PIPELINE = Phase.PIPELINE_FILL, Phase.PIPELINE
# The predictions are JSON-ready: phases by their edge names.
DP_, FILL_, PIPE_ = "data-parallel", "pipeline-fill", "pipeline"

# b1 = 1, b2 = 2, balanced stages; nested: outer ring 0.25 before + 0.25 after a 0.5 core.
SEQ = ComputeTimes("sequential", 1.0, 2.0, StageTimes(0.5, 0.5), StageTimes(1.0, 1.0))
NEST = ComputeTimes("nested", 1.0, 2.0, StageTimes.nested(0.25, 0.5, 0.25), StageTimes.nested(0.5, 1.0, 0.5))
NO_BYTES = TensorBytes(prediction=0)
SCHED = ScheduleParams(num_steps=30, tau1=10, k=5)  # tau_cap fallback: window [10, 15]


def latency_only(lam: float) -> LinkModel:
    return LinkModel(bandwidth=math.inf, latency=lam, copies=1)


@pytest.mark.parametrize("compute", [SEQ, NEST], ids=["sequential", "nested"])
def test_ideal_latencies_of_every_mode(compute):
    out = predict_modes(compute, NO_BYTES, LinkModel.ideal(), SCHED)
    ideal = {m: r["ideal"]["latency"] for m, r in out.items()}
    # SINGLE: 30 x b2. CFG_PARALLEL: 30 x b1. PIPELINE: 3 synchronous fills at batch 2
    # (1 + 1) then 27 stale steps at max(stage1, stage2) = 1. HYBRID: 24 phase-1 steps x b1, the
    # fill 0.5 + 0.5, then 5 stale steps x max(stage1, stage2) = 0.5.
    assert ideal == pytest.approx({"single": 60.0, "cfg-parallel": 30.0, "pipeline": 33.0, "hybrid": 27.5})
    hybrid = out["hybrid"]["ideal"]
    assert hybrid["phase_seconds"] == pytest.approx({DP_: 24.0, FILL_: 1.0, PIPE_: 2.5})
    assert hybrid["phase_steps"] == {DP_: 24, FILL_: 1, PIPE_: 5}
    assert out["hybrid"]["ideal_speedup"] == pytest.approx(60.0 / 27.5)
    for rec in out.values():  # a free link: predicted == ideal
        assert rec["predicted"]["latency"] == pytest.approx(rec["ideal"]["latency"])


def test_slope_detection_opens_the_window_one_step_later():
    sched = ScheduleParams(num_steps=30, tau1=10, k=5, tau1_source="slope")  # window [11, 15]
    out = predict_modes(SEQ, NO_BYTES, LinkModel.ideal(), sched)
    assert out["hybrid"]["ideal"]["latency"] == pytest.approx(11 + 1 + 4 * 0.5 + 14)


def test_message_latency_adds_where_the_protocol_sends():
    lam = 0.01
    out = predict_modes(SEQ, NO_BYTES, latency_only(lam), SCHED)
    assert out["single"]["predicted"]["latency"] == pytest.approx(60.0)  # nothing crosses
    # one exchange per step
    assert out["cfg-parallel"]["predicted"]["latency"] == pytest.approx(30 * (1 + lam))
    h = out["hybrid"]["predicted"]
    # Fill: boundary then prediction in series (2 lam). Stale steps: the U -> C -> U cycle spans
    # two steps, so lam lands on every other step (4 lam over 5 steps; the last sends no boundary).
    assert h["phase_seconds"] == pytest.approx(
        {DP_: 24 * (1 + lam), FILL_: 1 + 2 * lam, PIPE_: 2.5 + 4 * lam}
    )
    assert h["step_seconds"][11:16] == pytest.approx([0.5, 0.5 + 2 * lam, 0.5, 0.5 + 2 * lam, 0.5])
    assert out["hybrid"]["speedup"] == pytest.approx(60.0 / (27.5 + 30 * lam))
    assert out["hybrid"]["ideal_speedup"] == pytest.approx(60.0 / 27.5)


def test_nested_window_with_message_latency():
    lam = 0.01
    h = predict_modes(NEST, NO_BYTES, latency_only(lam), SCHED)["hybrid"]["predicted"]
    # Fill: core input, core output, prediction in series (3 lam). Stale steps (hand replay):
    # 0.75 (the first core ends after U's post), 0.5, 0.5 + 2 lam, 0.5, 0.25 + 2 lam (the last
    # step runs no core: only U's outer ring and the prediction to C).
    assert h["step_seconds"][10] == pytest.approx(1 + 3 * lam)
    assert h["step_seconds"][11:16] == pytest.approx([0.75, 0.5, 0.5 + 2 * lam, 0.5, 0.25 + 2 * lam])
    assert h["latency"] == pytest.approx(27.5 + 31 * lam)


def test_bandwidth_and_host_staging():
    bw, lam = 1e6, 1e-3
    tb = TensorBytes(
        prediction=1000, boundary_b1=4000, boundary_b2=8000, stage_return_b1=2000, stage_return_b2=4000
    )
    staged = LinkModel(bandwidth=bw, latency=lam, copies=2)
    t = lambda b: lam + 2 * b / bw  # noqa: E731 - one message through host memory: two copies
    assert staged.transfer(1000) == pytest.approx(t(1000))
    dp = simulate([DATA_PARALLEL], SEQ, tb, staged)
    assert dp.latency == pytest.approx(1.0 + t(1000))
    assert dp.link_bytes == 2000
    # A one-step window is a synchronous full forward: every message is on the critical path.
    fill = simulate([PIPELINE_FILL], SEQ, tb, staged)
    assert fill.latency == pytest.approx(0.5 + t(4000) + 0.5 + t(1000))
    nested = simulate([PIPELINE_FILL], NEST, tb, staged, window_batch=2)
    assert nested.latency == pytest.approx(0.5 + t(8000) + 1.0 + t(4000) + 0.5 + t(1000))
    assert nested.link_bytes == 8000 + 4000 + 1000


def test_bytes_per_request():
    tb = TensorBytes(
        prediction=10, boundary_b1=100, boundary_b2=200, stage_return_b1=1000, stage_return_b2=2000
    )
    seq = predict_modes(SEQ, tb, LinkModel.ideal(), SCHED)
    # 24 exchanges of two predictions; fill and 4 stale steps send a boundary and a prediction;
    # the last window step only the prediction.
    assert seq["hybrid"]["predicted"]["link_bytes"] == 24 * 20 + 5 * (100 + 10) + 10
    assert seq["cfg-parallel"]["predicted"]["link_bytes"] == 30 * 20
    assert seq["single"]["predicted"]["link_bytes"] == 0
    assert seq["pipeline"]["predicted"]["link_bytes"] == 29 * (200 + 10) + 10  # FULL_CFG: batch-2 boundary
    nest = predict_modes(NEST, tb, LinkModel.ideal(), SCHED)
    assert nest["hybrid"]["predicted"]["link_bytes"] == 24 * 20 + 5 * (100 + 1000 + 10) + 10


def test_fixed_costs_and_update_count_once_per_request_and_step():
    ct = ComputeTimes("sequential", 1.0, 2.0, StageTimes(0.5, 0.5), StageTimes(1.0, 1.0), update=0.1)
    out = predict_modes(ct, NO_BYTES, LinkModel.ideal(), SCHED, FixedCosts(encode=3.0, decode=2.0))
    assert out["single"]["ideal"]["latency"] == pytest.approx(3 + 30 * 2.1 + 2)
    assert out["cfg-parallel"]["ideal"]["latency"] == pytest.approx(3 + 30 * 1.1 + 2)
    assert out["cfg-parallel"]["ideal"]["denoise"] == pytest.approx(33.0)


def test_speedups_are_latency_ratios():
    out = predict_modes(NEST, TensorBytes(1, 2, 4, 2, 4), LinkModel(1e3, 1e-3), SCHED)
    single = out["single"]
    for rec in out.values():
        assert rec["speedup"] == pytest.approx(single["predicted"]["latency"] / rec["predicted"]["latency"])
        assert rec["ideal_speedup"] == pytest.approx(single["ideal"]["latency"] / rec["ideal"]["latency"])
        assert rec["predicted"]["latency"] >= rec["ideal"]["latency"]


def test_window_is_clamped_to_the_last_step():
    assert ScheduleParams(30, 28, 5).schedule(Mode.HYBRID).window() == (28, 29)
    assert ScheduleParams(30, 28, 5).tau2 == 29
    # the tau_cap fallback on the last step: no window
    assert ScheduleParams(30, 30, 5).schedule(Mode.HYBRID).window() is None
    assert ScheduleParams(30, 30, 5).tau2 is None
    assert ScheduleParams(30, 30, 5).phases(Mode.HYBRID) == [DATA_PARALLEL] * 30
    assert ScheduleParams(30, 28, 5).phases(Mode.HYBRID)[27:] == [DATA_PARALLEL, PIPELINE_FILL, PIPELINE]


def test_invalid_phase_lists_are_refused():
    with pytest.raises(ValueError):
        simulate([DATA_PARALLEL, PIPELINE], SEQ, NO_BYTES, LinkModel.ideal())  # no stale buffer
    with pytest.raises(ValueError):
        simulate([SINGLE, DATA_PARALLEL], SEQ, NO_BYTES, LinkModel.ideal())
    with pytest.raises(ValueError):
        simulate(["warp"], SEQ, NO_BYTES, LinkModel.ideal())
    with pytest.raises(ValueError):
        ComputeTimes("nested", 1.0, 2.0, StageTimes(0.5, 0.5, 0.1, 0.1), StageTimes.nested(0.5, 1.0, 0.5))
    with pytest.raises(ValueError):
        ScheduleParams(30, 0)  # the schedule's tau_cap and L are at least 1
    with pytest.raises(ValueError):
        ScheduleParams(30, 10, tau1_source="guess")


# --- the refreshing policies: every m-th window step a data-parallel fill --------------------------
def test_a_refreshing_window_prices_its_fills_as_data_parallel_steps():
    """Window [10, 15] refreshed every 2nd step: fills at 10, 12, 14 run one branch each at batch
    1 (b1 = 1, as a data-parallel step), the pipelined steps 11, 13, 15 between at max(stage1,
    stage2) = 0.5 on the fill's stale activations, each the last before a fill (nothing forward)."""
    refreshed = ScheduleParams(num_steps=30, tau1=10, k=5, refresh_every=2)
    assert refreshed.phases(Mode.HYBRID)[10:16] == [PIPELINE_FILL, PIPELINE] * 3
    assert refreshed.phases(Mode.PIPELINE) == SCHED.phases(Mode.PIPELINE)  # HYBRID's window only
    for compute in (SEQ, NEST):
        out = predict_modes(compute, NO_BYTES, LinkModel.ideal(), refreshed)["hybrid"]["ideal"]
        assert out["latency"] == pytest.approx(24 + 3 * 1.0 + 3 * 0.5)
        assert out["phase_steps"] == {DP_: 24, FILL_: 3, PIPE_: 3}
    tb = TensorBytes(prediction=10, boundary_b1=100, stage_return_b1=1000)
    seq = predict_modes(SEQ, tb, LinkModel.ideal(), refreshed)["hybrid"]["predicted"]
    # a fill exchanges two predictions (sequential: C keeps its own stage activations); a
    # pipelined step sends the guided prediction only
    assert seq["link_bytes"] == 24 * 20 + 3 * 20 + 3 * 10
    nest = predict_modes(NEST, tb, LinkModel.ideal(), refreshed)["hybrid"]["predicted"]
    assert nest["link_bytes"] == 24 * 20 + 3 * (20 + 1000) + 3 * 10  # nested: C's core output to U


def test_a_refresh_fill_waits_for_the_link_like_a_data_parallel_step():
    lam = 0.01
    link = latency_only(lam)
    # DP fill (1 + lam), then the stale step: C's stage 2 on its own activations (0.5), the
    # prediction to U (lam)
    seq = simulate([PIPELINE_FILL, PIPELINE], SEQ, NO_BYTES, link, refresh_fills=True)
    assert seq.latency == pytest.approx(1.0 + lam + 0.5 + lam)
    # nested: U's outer ring (0.25 + 0.25) around the fill's core output, which C sent as the
    # predictions crossed, then the prediction to C
    nest = simulate([PIPELINE_FILL, PIPELINE], NEST, NO_BYTES, link, refresh_fills=True)
    assert nest.latency == pytest.approx(1.0 + lam + 0.5 + lam)
    assert nest.link_bytes == 0 and len(simulate([PIPELINE_FILL], NEST, NO_BYTES, link).step_seconds) == 1
    with pytest.raises(ValueError, match="batch 1"):
        simulate([PIPELINE_FILL], SEQ, NO_BYTES, link, window_batch=2, refresh_fills=True)
    with pytest.raises(ValueError, match="batch 1"):
        ScheduleParams(30, 10, 5, refresh_every=2, hybrid_window_batch=2)

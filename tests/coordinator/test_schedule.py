import pytest

from coordinator.schedule import DiscrepancyMonitor, HybridParams, Mode, Phase, StepSchedule, rel_mae_slope
from hybridiff.errors import InvalidArgument

P = HybridParams(l_slope=3, eps_slope=0.01, k=2, tau_cap=8)


def feed(schedule, values):
    """Observe values step by step, checking that each next phase is decided only when allowed."""
    phases = []
    for step, v in enumerate(values):
        assert step <= schedule.decided_through()
        phases.append(schedule.phase(step))
        schedule.observe(step, v if phases[-1] == Phase.DATA_PARALLEL else None)
    return phases


def test_slope_definition():
    assert rel_mae_slope([1.0, 0.9, 0.8], 3) is None
    assert rel_mae_slope([1.0, 0.9, 0.8, 0.7], 3) == pytest.approx((0.9 - 0.7) / 3)


def test_detection_sets_tau1_at_the_detecting_step_and_window_follows():
    # steep decline, then flat from index 4 on: slope (d[-3]-d[-1])/3 at index 6 = (0.2-0.2)/3 = 0
    values = [1.0, 0.7, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    s = StepSchedule(Mode.HYBRID, len(values), P, guidance=True)
    phases = feed(s, values)
    first_flat = next(
        i for i in range(4, len(values)) if 0 <= rel_mae_slope(values[: i + 1], 3) < P.eps_slope
    )
    assert s.tau1 == first_flat and s.tau1_source == "slope"
    assert s.tau2 == s.tau1 + P.k
    assert phases[: s.tau1 + 1] == [Phase.DATA_PARALLEL] * (s.tau1 + 1)
    assert phases[s.tau1 + 1] == Phase.PIPELINE_FILL
    assert all(p == Phase.PIPELINE for p in phases[s.tau1 + 2 : s.tau2 + 1])
    assert all(p == Phase.DATA_PARALLEL for p in phases[s.tau2 + 1 :])


def test_negative_slope_does_not_trigger():
    rising = [0.1 * i for i in range(12)]
    m = DiscrepancyMonitor(HybridParams(3, 0.5, 2, 100))
    for v in rising:
        m.observe(v)
    assert m.tau1 is None


def test_tau_cap_fallback_opens_window_at_tau_cap():
    values = [1.0 - 0.1 * i for i in range(10)] + [0.0] * 5  # always steep: no detection
    s = StepSchedule(Mode.HYBRID, len(values), P, guidance=True)
    phases = feed(s, values)
    assert s.tau1 == P.tau_cap and s.tau1_source == "tau_cap"
    assert phases[P.tau_cap - 1] == Phase.DATA_PARALLEL
    assert phases[P.tau_cap] == Phase.PIPELINE_FILL
    assert s.tau2 == P.tau_cap + P.k


def test_tau2_clamped_to_last_step_without_error():
    values = [1.0 - 0.1 * i for i in range(10)]
    s = StepSchedule(Mode.HYBRID, 10, HybridParams(3, 0.01, k=50, tau_cap=8), guidance=True)
    phases = feed(s, values)
    assert s.tau1 == 8 and s.tau2 == 9
    assert phases[8:] == [Phase.PIPELINE_FILL, Phase.PIPELINE]


def test_window_past_the_end_is_no_window():
    s = StepSchedule(Mode.HYBRID, 5, HybridParams(3, 0.01, k=2, tau_cap=5), guidance=True)
    phases = feed(s, [1.0, 0.8, 0.6, 0.4, 0.2])
    assert phases == [Phase.DATA_PARALLEL] * 5 and s.tau1 is None and s.window() is None


def test_guidance_off_runs_single_branch():
    for mode in (Mode.HYBRID, Mode.CFG_PARALLEL, Mode.SINGLE):
        s = StepSchedule(mode, 6, P, guidance=False)
        assert s.mode == Mode.SINGLE
        assert s.decided_through() == 5 and set(s.phases()) == {Phase.SINGLE}
    s = StepSchedule(Mode.PIPELINE, 6, P, guidance=False)
    assert s.phases()[:3] == [Phase.PIPELINE_FILL] * 3 and s.phases()[3:] == [Phase.PIPELINE] * 3


def test_steps_before_any_possible_decision_are_issued_ahead():
    s = StepSchedule(Mode.HYBRID, 30, HybridParams(12, 4e-4, 5, 15), guidance=True)
    # values of steps 0..11 cannot decide (fewer than L+1 values): steps 0..12 are surely phase 1
    assert s.decided_through() == 12
    with pytest.raises(LookupError):
        s.phase(13)


def test_out_of_order_observation_is_refused():
    s = StepSchedule(Mode.HYBRID, 10, P, guidance=True)
    with pytest.raises(ValueError):
        s.observe(1, 0.5)


def test_deterministic_given_values():
    values = [1.0, 0.7, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    runs = []
    for _ in range(2):
        s = StepSchedule(Mode.HYBRID, len(values), P, guidance=True)
        runs.append((feed(s, values), s.tau1, s.tau2))
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "field,params",
    [
        ("hybrid.l_slope", HybridParams(0, 0.1, 1, 1)),
        ("hybrid.eps_slope", HybridParams(1, -1.0, 1, 1)),
        ("hybrid.eps_slope", HybridParams(1, float("nan"), 1, 1)),
        ("hybrid.k", HybridParams(1, 0.1, -1, 1)),
        ("hybrid.tau_cap", HybridParams(1, 0.1, 1, 0)),
        ("hybrid.refresh_every", HybridParams(1, 0.1, 1, 1, refresh_every=0)),
    ],
)
def test_param_validation_names_field(field, params):
    with pytest.raises(InvalidArgument) as err:
        params.validate()
    assert err.value.field == field


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=40),
    l_slope=st.integers(1, 12),
    k=st.integers(0, 8),
    tau_cap=st.integers(1, 45),
    eps=st.sampled_from([1e-4, 1e-2, 0.1, 1.0]),
    refresh=st.sampled_from([0, 1, 2, 3]),
)
def test_a_decided_phase_never_changes(values, l_slope, k, tau_cap, eps, refresh):
    """What the driver issues early (decided_through) must be what the schedule ends with."""
    params = HybridParams(l_slope, eps, k, tau_cap)
    s = StepSchedule(Mode.HYBRID, len(values), params, guidance=True, refresh_every=refresh)
    early = {}
    for step, v in enumerate(values):
        for j in range(s.decided_through() + 1):
            early.setdefault(j, s.phase(j))
        phase = s.phase(step)
        s.observe(step, v if phase == Phase.DATA_PARALLEL else None)
    final = [s.phase(j) for j in range(len(values))]
    assert all(early[j] == final[j] for j in early)
    assert len(early) == len(values)
    if s.window():
        first, last = s.window()
        assert final[first] == Phase.PIPELINE_FILL and last == min(s.tau1 + k, len(values) - 1)
        fills = [j for j in range(first, last + 1) if final[j] == Phase.PIPELINE_FILL]
        assert fills == list(range(first, last + 1, refresh or len(values)))


# --- the refreshing window policies: fills every refresh_every steps ---------------------------
FLAT = [1.0, 0.7, 0.5, 0.3, 0.2] + [0.2] * 15  # P: tau1 = 6 by the slope, the window 7..8 (k = 2)


def test_a_refreshed_window_fills_every_m_steps_and_ends_a_pipeline_before_each_fill():
    params = HybridParams(3, 0.01, k=7, tau_cap=8)
    s = StepSchedule(Mode.HYBRID, len(FLAT), params, guidance=True, refresh_every=3)
    phases = feed(s, FLAT)
    assert s.window() == (7, 13) and (s.tau1, s.tau2) == (6, 13)
    F, PL, DP = Phase.PIPELINE_FILL, Phase.PIPELINE, Phase.DATA_PARALLEL
    assert phases[6:15] == [DP, F, PL, PL, F, PL, PL, F, DP]
    # a pipelined step followed by a fill sends nothing forward, like the window's last step
    assert [i for i in range(len(FLAT)) if s.last_in_window(i)] == [9, 12, 13]


def test_refresh_every_one_fills_every_window_step_and_only_hybrid_refreshes():
    s = StepSchedule(Mode.HYBRID, len(FLAT), HybridParams(3, 0.01, 4, 8), guidance=True, refresh_every=1)
    assert feed(s, FLAT)[7:12] == [Phase.PIPELINE_FILL] * 4 + [Phase.DATA_PARALLEL]
    assert all(s.last_in_window(i) for i in range(7, 11))
    p = StepSchedule(Mode.PIPELINE, 8, P, guidance=True, refresh_every=2)
    assert p.phases() == [Phase.PIPELINE_FILL] * 3 + [Phase.PIPELINE] * 5


def test_without_refresh_only_the_window_s_first_step_fills():
    s = StepSchedule(Mode.HYBRID, len(FLAT), HybridParams(3, 0.01, 4, 8), guidance=True)
    phases = feed(s, FLAT)
    assert phases[7:11] == [Phase.PIPELINE_FILL] + [Phase.PIPELINE] * 3
    assert [i for i in range(len(FLAT)) if s.last_in_window(i)] == [10]

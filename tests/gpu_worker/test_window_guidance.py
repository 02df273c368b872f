"""The window-guidance policies' declared interface (gpu_worker.window_guidance), one object per
policy: what the window's stages run, the prediction they form, what they remember and carry in a
checkpoint. The images they give are pinned by test_engine.py and test_exact_resume.py."""

import pytest
import torch

from gpu_worker.window_guidance import (
    BOTH,
    COND,
    EXTRAPOLATION_DAMPING,
    POLICIES,
    Conditional,
    ExtrapolatedDifference,
    FullCfg,
    LastDifference,
    RefreshedDifference,
    batch_of,
    carried_difference,
    guide,
    window_guidance_for,
)
from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import WindowGuidance
from hybridiff.wire import tensor_from_proto

SCALE = 5.0


def _branches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)


def test_every_policy_of_the_protocol_has_its_class():
    assert set(POLICIES) == set(WindowGuidance)
    for kind in WindowGuidance:
        policy = window_guidance_for(kind, SCALE)
        assert policy.kind == kind and policy.branches(0) in policy.stage_batches


def test_each_policy_forms_the_window_prediction_from_its_batch():
    e_u, e_c = _branches()
    conditional = Conditional(SCALE)
    assert conditional.branches(3) == COND
    assert torch.equal(conditional.prediction(batch_of(COND, e_u, e_c), 3), e_c)

    full = FullCfg(SCALE)
    assert full.branches(3) == BOTH and full.stage_batches == {BOTH}
    assert torch.equal(full.prediction(batch_of(BOTH, e_u, e_c), 3), guide(e_u, e_c, SCALE))

    last = LastDifference(SCALE)
    assert torch.equal(last.prediction(e_c, 3), e_c)  # nothing measured yet
    d_u, d_c = _branches(1)
    last.remember(d_u, d_c, 2)  # a phase-1 step before the window
    assert torch.allclose(last.prediction(e_c, 3), e_c + (SCALE - 1) * (d_c - d_u))
    assert torch.allclose(last.prediction(d_c, 3), guide(d_u, d_c, SCALE), atol=1e-5)


def test_an_unguided_request_runs_the_conditional_branch_as_it_is():
    e_u, e_c = _branches()
    for kind in WindowGuidance:
        policy = window_guidance_for(kind, 1.0)
        policy.remember(e_u, e_c, 0)
        assert policy.branches(0) == COND and policy.stage_batches == {COND}
        assert torch.equal(policy.prediction(e_c, 1), e_c)


def _read(checkpoint: wpb.Checkpoint):
    return lambda name: tensor_from_proto(getattr(checkpoint, name))


def test_only_the_last_difference_travels_in_a_checkpoint():
    e_u, e_c = _branches()
    like = torch.zeros(1, 4, 8, 8)
    for kind in (WindowGuidance.CONDITIONAL, WindowGuidance.FULL_CFG):
        checkpoint = wpb.Checkpoint()
        policy = window_guidance_for(kind, SCALE)
        policy.remember(e_u, e_c, 0)
        policy.write_checkpoint(checkpoint)
        assert not checkpoint.HasField("last_difference")

    last = LastDifference(SCALE)
    checkpoint = wpb.Checkpoint(next_step=1)  # after step 0
    last.write_checkpoint(checkpoint)
    assert not checkpoint.HasField("last_difference")  # nothing measured yet
    last.remember(e_u, e_c, 0)
    last.write_checkpoint(checkpoint)
    resumed = LastDifference(SCALE)
    resumed.read_checkpoint(checkpoint, _read(checkpoint), like)
    assert torch.equal(resumed.last_difference, e_c - e_u)
    assert torch.equal(resumed.prediction(e_c, 6), last.prediction(e_c, 6))


@pytest.mark.parametrize("kind", list(WindowGuidance))
def test_a_malformed_difference_is_refused_whatever_the_policy(kind):
    checkpoint = wpb.Checkpoint()
    source = LastDifference(SCALE)
    source.remember(torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4), 0)
    source.write_checkpoint(checkpoint)
    with pytest.raises(BadCommand) as refused:
        window_guidance_for(kind, SCALE).read_checkpoint(
            checkpoint, _read(checkpoint), torch.zeros(1, 4, 8, 8)
        )
    assert refused.value.field == "resume.last_difference"


# --- the refreshing policies ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RefreshedDifference, ExtrapolatedDifference])
def test_a_refreshing_fill_is_exact_cfg_and_measures_the_difference_again(cls):
    e_u, e_c = _branches()
    d_u, d_c = _branches(1)
    policy = cls(SCALE)
    assert policy.data_parallel_fills and not LastDifference.data_parallel_fills
    assert policy.branches(4) == COND and policy.stage_batches == {COND}
    policy.remember(d_u, d_c, 3)  # the phase-1 step before the window
    assert torch.equal(policy.fill_prediction(e_u, e_c, 4), guide(e_u, e_c, SCALE))
    assert torch.equal(policy.last_difference, e_c - e_u) and policy.difference_step == 4
    # the pipelined step after the refresh re-uses (or carries) what the refresh measured
    if cls is RefreshedDifference:
        assert torch.allclose(policy.prediction(e_c, 5), guide(e_u, e_c, SCALE), atol=1e-5)
    # a fill of a non-refreshing policy from both branches is its window prediction: nothing measured
    last = LastDifference(SCALE)
    last.remember(d_u, d_c, 3)
    assert torch.allclose(last.fill_prediction(e_u, e_c, 4), e_c + (SCALE - 1) * (d_c - d_u))
    assert last.difference_step == 3


def test_an_unguided_refreshing_fill_takes_the_conditional_branch():
    e_u, e_c = _branches()
    policy = RefreshedDifference(1.0)
    assert torch.equal(policy.fill_prediction(e_u, e_c, 4), e_c) and policy.last_difference is None


def test_the_extrapolated_difference_follows_the_trend_of_its_last_two_measurements():
    policy = ExtrapolatedDifference(SCALE)
    zero = torch.zeros(1, 4, 8, 8)
    policy.remember(zero, torch.full_like(zero, 1.0), 2)
    assert torch.equal(policy.difference_at(5), torch.full_like(zero, 1.0))  # no trend yet
    policy.remember(zero, torch.full_like(zero, 2.0), 4)  # +0.5 per step
    assert torch.allclose(policy.trend, torch.full_like(zero, 0.5))
    assert torch.equal(policy.difference_at(4), policy.last_difference)
    expected = carried_difference(torch.full_like(zero, 2.0), torch.full_like(zero, 0.5), 2)
    assert torch.allclose(policy.difference_at(6), expected)
    assert torch.allclose(policy.prediction(zero, 6), (SCALE - 1) * expected)


def test_a_checkpoint_carries_the_step_that_measured_the_difference():
    e_u, e_c = _branches()
    like = torch.zeros(1, 4, 8, 8)
    policy = ExtrapolatedDifference(SCALE)
    policy.remember(e_u, e_c, 6)
    checkpoint = wpb.Checkpoint(next_step=8)
    policy.write_checkpoint(checkpoint)
    assert checkpoint.last_difference_step == 6
    resumed = ExtrapolatedDifference(SCALE)
    resumed.read_checkpoint(checkpoint, _read(checkpoint), like)
    assert resumed.difference_step == 6 and torch.equal(resumed.last_difference, e_c - e_u)
    checkpoint.last_difference_step = 8  # not a step before the resumed one
    with pytest.raises(BadCommand) as refused:
        ExtrapolatedDifference(SCALE).read_checkpoint(checkpoint, _read(checkpoint), like)
    assert refused.value.field == "resume.last_difference_step"


def test_the_carried_difference_follows_its_trend_damped():
    difference, trend = torch.tensor([1.0]), torch.tensor([0.5])
    assert carried_difference(difference, None, 3) is difference
    assert carried_difference(difference, trend, 0) is difference
    assert float(carried_difference(difference, trend, 1, damping=0.5)) == 1.25
    assert float(carried_difference(difference, trend, 2, damping=0.5)) == 1.375  # 0.5 * (0.5 + 0.25)
    assert float(carried_difference(difference, trend, 3, damping=1.0)) == 2.5  # linear
    far = float(carried_difference(difference, trend, 50))
    assert far == pytest.approx(1.0 + 0.5 * EXTRAPOLATION_DAMPING / (1 - EXTRAPOLATION_DAMPING))  # bounded

"""The window-guidance policies' declared interface (gpu_worker.window_guidance), one object per
policy: what the window's stages run, the prediction they form, what they remember and carry in a
checkpoint. The images they give are pinned by test_engine.py and test_exact_resume.py."""

import pytest
import torch

from gpu_worker.window_guidance import (
    BOTH,
    COND,
    POLICIES,
    Conditional,
    FullCfg,
    LastDifference,
    batch_of,
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
    checkpoint = wpb.Checkpoint()
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

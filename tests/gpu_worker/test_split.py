"""The two-stage split: exact recomposition, the SD3 block hand-off, and the stale recurrence."""

import pytest
import torch
from cluster_helpers import make_input

from gpu_worker.split_balance import balanced_plan, measure_unit_costs, valid_cuts
from hybridiff.wire import tensor_from_proto


def _step_inputs(engine, guided=True):
    a = engine.adapter
    h = w = a.default_size
    cond = a.encode("a blue square", None, guided, h, w)
    tl = a.new_timeline(6, 3, h, w)
    x = a.initial_latents(tl, h, w)
    t = tl.timesteps[2]
    return a, cond, tl, x, t


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
@torch.no_grad()
def test_every_cut_recomposes_the_full_forward_exactly(engines, arch):
    a, cond, tl, x, t = _step_inputs(engines[arch])
    for branches in ("cond", "both"):
        inputs = cond.for_branches(branches)
        x_in = a.model_input(tl, x, t)
        full = a.forward(x_in, t, inputs)
        for cut in valid_cuts(a):
            split = a.make_split(cut)
            if split.topology == "nested":
                core_in, state = split.stage1_pre(x_in, t, inputs)
                out = split.stage1_post(split.stage2(core_in, x_in, t, inputs), state)
            else:
                out = split.stage2(split.stage1(x_in, t, inputs), x_in, t, inputs)
            assert torch.equal(out, full), f"{arch} cut {cut} ({branches})"


@torch.no_grad()
def test_sd3_stage2_receives_exactly_the_last_stage1_block_output(engines):
    a, cond, tl, x, t = _step_inputs(engines["sd3"])
    inputs = cond.cond
    blocks = a.denoiser.transformer_blocks
    for cut in valid_cuts(a):
        seen = {}

        def capture_out(module, args, kwargs, output):
            seen["out"] = output  # (encoder_hidden_states, hidden_states)

        def capture_in(module, args, kwargs):
            seen["in"] = (kwargs["encoder_hidden_states"], kwargs["hidden_states"])

        h1 = blocks[cut - 1].register_forward_hook(capture_out, with_kwargs=True)
        h2 = blocks[cut].register_forward_pre_hook(capture_in, with_kwargs=True)
        try:
            split = a.make_split(cut)
            boundary = split.stage1(a.model_input(tl, x, t), t, inputs)
            enc_out, hid_out = seen.pop("out")
            assert torch.equal(boundary["hidden_states"], hid_out)
            assert torch.equal(boundary["encoder_hidden_states"], enc_out)
            split.stage2(boundary, a.model_input(tl, x, t), t, inputs)
            enc_in, hid_in = seen.pop("in")
            assert hid_in is boundary["hidden_states"] and enc_in is boundary["encoder_hidden_states"]
        finally:
            h1.remove()
            h2.remove()


@torch.no_grad()
def _reference_run(a, spec, window, cut):
    """A plain formulation of the schedule written here, independent of the engine: phase 1 =
    branch forwards at batch 1 + CFG; window = stale two-stage recurrence on the conditional
    branch (AsyncDiff), the first window step a synchronous full forward."""
    cond = a.encode(spec.prompt, spec.negative_prompt, True, spec.height, spec.width)
    tl = a.new_timeline(spec.num_steps, spec.seed, spec.height, spec.width)
    x = a.initial_latents(tl, spec.height, spec.width)
    split = a.make_split(cut)
    stale = None
    for i, t in enumerate(tl.timesteps):
        x_in = a.model_input(tl, x, t)
        if window[0] <= i <= window[1]:
            if split.topology == "sequential":
                fresh = split.stage1(x_in, t, cond.cond)
                eps = split.stage2(fresh if i == window[0] else stale, x_in, t, cond.cond)
                stale = fresh
            else:
                core_in, state = split.stage1_pre(x_in, t, cond.cond)
                fresh = split.stage2(core_in, x_in, t, cond.cond)
                eps = split.stage1_post(fresh if i == window[0] else stale, state)
                stale = fresh
        else:
            e_u = a.forward(x_in, t, cond.uncond)
            e_c = a.forward(x_in, t, cond.cond)
            eps = e_u + spec.guidance_scale * (e_c - e_u)
        x = a.scheduler_step(tl, eps, t, x)
    return x


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_hybrid_engine_matches_plain_stale_recurrence(engines, arch):
    eng = engines[arch]
    # l_slope beyond the run disables detection: the tau_cap fallback opens the window at step 3.
    spec = eng.resolve(
        make_input(
            prompt="a green triangle",
            num_steps=10,
            seed=5,
            mode="hybrid",
            guidance_scale=4.0,
            l_slope=50,
            tau_cap=3,
            k=4,
        )
    )
    cut = 2
    eng._split_cut = cut
    try:
        result = eng.generate(spec)
    finally:
        eng._split_cut = None
    assert (result.stats.tau1, result.stats.tau2) == (3, 7)
    expected = _reference_run(eng.adapter, spec, (3, 7), cut)
    assert torch.equal(tensor_from_proto(result.latents), expected.float().cpu())


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_balanced_plan_reports_ratio(engines, arch):
    a = engines[arch].adapter
    costs = measure_unit_costs(a, a.default_size, a.default_size, repeats=1)
    split = a.make_split()
    assert set(costs) == set(split.unit_names())
    plan = balanced_plan(a, costs)
    assert plan.cut in valid_cuts(a)
    assert plan.stage1_seconds > 0 and plan.stage2_seconds > 0 and plan.ratio >= 1.0


def test_each_split_declares_the_stages_the_engine_calls(engines):
    """The engine calls a split through its declared topology only: a UNet's split is a
    NestedSplit (stage1_pre, stage2, stage1_post), a DiT's a SequentialSplit (stage1, stage2)."""
    from gpu_worker.adapters.base import NestedSplit, SequentialSplit, Topology

    nested, sequential = engines["sdxl"].adapter.make_split(), engines["sd3"].adapter.make_split()
    assert isinstance(nested, NestedSplit) and nested.topology == Topology.NESTED
    assert isinstance(sequential, SequentialSplit) and sequential.topology == Topology.SEQUENTIAL
    assert NestedSplit.__abstractmethods__ >= {"stage1_pre", "stage2", "stage1_post"}
    assert SequentialSplit.__abstractmethods__ >= {"stage1", "stage2"}

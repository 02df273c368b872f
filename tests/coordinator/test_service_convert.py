"""The public API's edge converters (coordinator.service) and the runner's validation against a
model's rules (``WorkerInfo.rules``, from a worker's Info as ``coordinator.worker_info`` reads
it): unset fields stay unset, enums travel as enums, raw latents split per image, the model's
limits reach ListModels."""

import pytest
import torch

from coordinator.driver import GenerationResult, GenerationStats, StepStat
from coordinator.service import model_info_to_proto, response_to_proto, step_stat_to_proto
from coordinator.worker_info import incompatibility, pairing_key, read_info
from hybridiff.errors import InvalidArgument
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import WORKER_PROTOCOL_VERSION, Mode, OutputFormat, Phase, WindowGuidance
from hybridiff.request import DEFAULT_REFRESH_EVERY, resolve_spec
from hybridiff.step_stats import other_seconds
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.wire import tensor_from_proto, tensor_to_proto

RESPONSE = worker_pb2.InfoResponse(
    model_name="m",
    arch="sdxl",
    limits=worker_pb2.SizeLimits(multiple=8, min_side=16, max_side=128, default_side=64, max_images=3),
    default_steps=30,
    default_guidance_scale=5.0,
    hybrid_defaults=pb.HybridParams(l_slope=12, eps_slope=4e-4, k=5, tau_cap=15, refresh_every=4),
)
INFO = read_info(RESPONSE)


def test_unset_fields_take_the_models_defaults_and_set_ones_are_kept():
    spec = resolve_spec(pb.GenerateRequest(prompt="p"), *INFO.rules({}))
    assert (spec.width, spec.num_steps, spec.guidance_scale, spec.negative_prompt) == (64, 30, 5.0, None)
    assert spec.mode == Mode.AUTO and spec.window_guidance is None and spec.output_format == OutputFormat.PNG
    req = pb.GenerateRequest(
        prompt="p",
        negative_prompt="",
        seed=0,
        width=32,
        mode=pb.MODE_PIPELINE,
        window_guidance=pb.WINDOW_GUIDANCE_FULL_CFG,
        output_format=pb.OUTPUT_FORMAT_WEBP,
        quality=70,
        num_images=3,
    )
    req.hybrid.k = 0
    spec = resolve_spec(req, *INFO.rules({"tau_cap": 9}))
    assert (spec.negative_prompt, spec.seed, spec.width, spec.num_images, spec.quality) == ("", 0, 32, 3, 70)
    assert (spec.mode, spec.window_guidance, spec.output_format) == (
        Mode.PIPELINE,
        WindowGuidance.FULL_CFG,
        OutputFormat.WEBP,
    )
    assert (spec.hybrid.k, spec.hybrid.tau_cap, spec.hybrid.l_slope) == (0, 9, 12)


def test_an_unknown_wire_enum_and_too_many_images_are_named():
    with pytest.raises(InvalidArgument) as err:
        resolve_spec(pb.GenerateRequest(prompt="p", mode=42), *INFO.rules({}))
    assert err.value.field == "mode"
    with pytest.raises(InvalidArgument) as err:
        resolve_spec(pb.GenerateRequest(prompt="p", num_images=4), *INFO.rules({}))
    assert err.value.field == "num_images"


def _report(worker: str, **fields) -> pb.WorkerStep:
    """A worker's step report as the worker makes it (``other_seconds`` by ``step_stats``)."""
    w = pb.WorkerStep(worker=worker, phase=Phase.DATA_PARALLEL, **fields)
    w.other_seconds = other_seconds(w)
    return w


def _result(latents, images, mime, tau1=None):
    step = StepStat(
        0,
        Phase.DATA_PARALLEL,
        0.25,
        10,
        0.1,
        0.05,
        {"u": _report("u", compute_seconds=0.05, wall_seconds=0.1, bytes_sent=5)},
    )
    stats = GenerationStats(
        Mode.HYBRID,
        WindowGuidance.CONDITIONAL if tau1 is not None else None,
        tau1,
        None if tau1 is None else tau1 + 2,
        "slope" if tau1 is not None else "",
        3,
        ["u", "c"],
        [step],
        10,
        0.1,
        1.0,
        0.2,
    )
    return GenerationResult("r", 5, images, mime, tensor_to_proto(latents, "latents"), stats)


def test_response_keeps_unset_taus_unset_and_echoes_the_seed():
    resp = response_to_proto(
        _result(torch.zeros(2, 4, 8, 8), [b"a", b"b"], "image/png"), 64, 64, OutputFormat.PNG
    )
    assert not resp.stats.HasField("tau1") and not resp.stats.HasField("tau2") and resp.seed == 5
    assert [i.data for i in resp.images] == [b"a", b"b"] and resp.images[0].mime_type == "image/png"
    assert resp.stats.steps[0].phase == pb.PHASE_DATA_PARALLEL and resp.stats.steps[0].rel_mae == 0.25
    resp = response_to_proto(
        _result(torch.zeros(1, 4, 8, 8), [b"a"], "image/png", tau1=0), 64, 64, OutputFormat.PNG
    )
    assert resp.stats.HasField("tau1") and resp.stats.tau1 == 0 and resp.stats.tau2 == 2


def test_raw_latents_come_back_one_image_each():
    latents = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    resp = response_to_proto(_result(latents, [], ""), 16, 16, OutputFormat.RAW_LATENTS)
    assert len(resp.images) == 2
    for i, image in enumerate(resp.images):
        assert list(image.latent_shape) == [1, 4, 2, 2]
        got = torch.frombuffer(bytearray(image.data), dtype=torch.float32).reshape(1, 4, 2, 2)
        assert torch.equal(got, latents[i : i + 1])
    assert torch.equal(tensor_from_proto(tensor_to_proto(latents)), latents)


def test_list_models_shows_the_size_rules_and_the_image_limit():
    info = model_info_to_proto(INFO)
    assert (info.size_multiple, info.min_side, info.max_width, info.max_images, info.max_steps) == (
        8,
        16,
        128,
        3,
        500,
    )


def test_step_stats_carry_the_overhead_split():
    """Each worker's split travels; the step's split is its slowest worker's, plus control."""
    u = _report(
        "u",
        compute_seconds=0.05,
        wall_seconds=0.1,
        bytes_sent=5,
        device_to_host_copies=1,
        device_to_host_seconds=0.01,
        host_to_device_copies=2,
        host_to_device_seconds=0.005,
        send_seconds=0.002,
        receive_wait_seconds=0.02,
        bytes_received=7,
    )
    c = _report("c", compute_seconds=0.06, wall_seconds=0.08, bytes_sent=5)
    step = StepStat(0, Phase.DATA_PARALLEL, 0.25, 10, 0.12, 0.06, {"u": u, "c": c})
    assert u.other_seconds == pytest.approx(0.1 - 0.05 - 0.015 - 0.022)
    assert (step.critical_compute_seconds, step.control_seconds) == (0.05, pytest.approx(0.02))
    msg = step_stat_to_proto(step)
    total = msg.critical_compute_seconds + msg.copy_seconds + msg.wire_seconds + msg.worker_other_seconds
    assert total + msg.control_seconds == pytest.approx(msg.wall_seconds)
    w = {x.worker: x for x in msg.workers}["u"]
    assert (w.device_to_host_copies, w.host_to_device_copies, w.bytes_received) == (1, 2, 7)
    assert (w.device_to_host_seconds, w.host_to_device_seconds) == (0.01, 0.005)
    assert (w.send_seconds, w.receive_wait_seconds) == (0.002, 0.02)
    assert w.other_seconds == pytest.approx(u.other_seconds)
    # a step slower on its worker than as the coordinator saw it: control is 0, never negative
    late = StepStat(1, Phase.DATA_PARALLEL, None, 10, 0.09, 0.06, {"u": u, "c": c})
    assert late.control_seconds == 0.0


@pytest.mark.parametrize("model_multiple,reported", [(4, 8), (8, 8), (16, 16), (12, 24)])
def test_size_multiple_is_the_rule_the_server_applies(model_multiple, reported):
    """Every side must be a multiple of 8 and of the model's own multiple: the lcm is reported,
    and exactly the multiples of it are accepted."""
    response = worker_pb2.InfoResponse()
    response.CopyFrom(RESPONSE)
    response.limits.multiple = model_multiple
    info = read_info(response)
    assert model_info_to_proto(info).size_multiple == reported
    for side in range(16, 129, 4):
        request = pb.GenerateRequest(prompt="x", width=side, height=2 * reported)
        ok = side % reported == 0
        try:
            resolve_spec(request, *info.rules({}))
        except InvalidArgument as exc:
            assert not ok and exc.field == "width", (side, exc)
        else:
            assert ok, side


def test_a_workers_info_is_read_once_into_what_every_part_uses():
    """``read_info``: the limits and defaults the runner resolves with (max_images unset: 1), an
    operator's override checked, the protocol version the pool checks, the pairing key."""
    response = worker_pb2.InfoResponse()
    response.CopyFrom(RESPONSE)
    response.limits.max_images = 0
    response.device, response.dtype, response.weights_digest = "cuda:1", "float16", "abc"
    info = read_info(response)
    limits, defaults = info.rules({"k": 2, "tau_cap": None})
    assert (limits.max_images, limits.default_side, defaults.steps, defaults.guidance_scale) == (
        1,
        64,
        30,
        5.0,
    )
    assert (defaults.hybrid.k, defaults.hybrid.tau_cap, info.defaults.hybrid.k) == (2, 15, 5)
    with pytest.raises(InvalidArgument) as err:
        info.rules({"k": -1})
    assert err.value.field == "hybrid.k"
    assert pairing_key(info) == (0, "float16", "cuda", "abc")
    assert "version 0" in incompatibility(info)
    response.protocol_version = WORKER_PROTOCOL_VERSION
    assert incompatibility(read_info(response)) == ""
    assert model_info_to_proto(info).hybrid_defaults == RESPONSE.hybrid_defaults
    # a worker of an older build reports no refresh_every: the default period
    older = worker_pb2.InfoResponse()
    older.CopyFrom(RESPONSE)
    older.hybrid_defaults.ClearField("refresh_every")
    assert read_info(older).defaults.hybrid.refresh_every == DEFAULT_REFRESH_EVERY

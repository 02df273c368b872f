"""The control port's bounds fit what the coordinator sends (docs/design.md section 5): the largest
checkpoint a worker reports (the latents, a multistep scheduler's history and the last
difference of the largest SD3 request, 2048 px and 4 images, built by the real scheduler and the
real capture) is over any single message's bound, fits the worker's checkpoint bound, and travels
in parts each far under the control port's receive bound; the largest Begin (two prompts of
the longest) fits the receive bound whole."""

import torch
from diffusers import UniPCMultistepScheduler

from gpu_worker import scheduler_state
from hybridiff import serving
from hybridiff.checkpoint_parts import checkpoint_bound, in_parts
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.request import MAX_PROMPT_CHARS, MAX_REQUEST_ID_CHARS
from hybridiff.wire import tensor_to_proto

SHAPE = (4, 16, 256, 256)  # 4 images of 2048 px, 16 latent channels (SD3), float32


def _largest_begin() -> wpb.SessionRequest:
    longest = "\U0001f600" * MAX_PROMPT_CHARS  # 4 bytes a character in UTF-8
    return wpb.SessionRequest(
        request_id="r" * MAX_REQUEST_ID_CHARS,
        trace_context={"traceparent": "00-" + "f" * 32 + "-" + "f" * 16 + "-01"},
        begin=wpb.BeginCommand(
            request=wpb.WorkerRequest(
                prompt=longest, negative_prompt=longest, width=2048, height=2048, num_images=4
            ),
            peer_data_address="tcp://" + "h" * 253 + ":65535",
            peer_worker_id="w" * 300,
            session_nonce=b"\xff" * 64,
        ),
    )


def test_the_largest_sd3_checkpoint_travels_in_parts_under_the_control_bound():
    latents = torch.randn(SHAPE)
    scheduler = UniPCMultistepScheduler(solver_order=2)
    scheduler.set_timesteps(10)
    fresh = scheduler_state.snapshot(scheduler)
    for t in scheduler.timesteps[:3]:
        latents = scheduler.step(torch.randn_like(latents), t, latents).prev_sample
    checkpoint = wpb.Checkpoint(
        next_step=3,
        latents=tensor_to_proto(latents, "latents"),
        scheduler=scheduler_state.capture(scheduler, fresh),
        last_difference=tensor_to_proto(torch.randn_like(latents), "last_difference"),
    )
    begin = _largest_begin()
    begin.begin.resume.CopyFrom(checkpoint)
    first, *parts = in_parts(begin)
    size = (
        first.begin.resume_bytes
    )  # the serialized checkpoint's (parts reassemble it: test_checkpoint_parts.py)
    assert not first.begin.HasField("resume") and sum(len(p.checkpoint_part.data) for p in parts) == size
    bound = checkpoint_bound(SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3])
    assert serving.MAX_MESSAGE_BYTES < size < bound < serving.CONTROL_MESSAGE_BYTES
    assert max(p.ByteSize() for p in [first, *parts]) < serving.CONTROL_RECEIVE_BYTES // 2


def test_the_largest_begin_fits_the_control_ports_receive_bound():
    assert 32_000 < _largest_begin().ByteSize() < serving.CONTROL_RECEIVE_BYTES // 16

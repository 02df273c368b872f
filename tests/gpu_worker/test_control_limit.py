"""The control API's message bound fits the largest checkpoint a worker reports: the
latents, a multistep scheduler's history and the last difference of the largest SD3 request
(2048 px, 4 images), built by the real scheduler and the real capture."""

import torch
from diffusers import UniPCMultistepScheduler

from gpu_worker import scheduler_state
from hybridiff import serving
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.wire import tensor_to_proto


def test_the_largest_sd3_checkpoint_fits_the_control_bound():
    latents = torch.randn(4, 16, 256, 256)  # 4 images of 2048 px, 16 latent channels, float32
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
    size = checkpoint.ByteSize()
    assert serving.MAX_MESSAGE_BYTES < size < serving.CONTROL_MESSAGE_BYTES // 2

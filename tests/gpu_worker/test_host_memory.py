"""Host memory stays bounded: the send pool by bytes (idle buffers dropped to make room), the VAE
decoded one image at a time from upcast latents."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gpu_worker.transfers import HostBufferPool
from hybridiff.errors import PeerTimeout
from hybridiff.wire import Payload


class Done:
    done = True


def _spec(n: int) -> dict:
    return {"t": (torch.Size([n]), torch.float32)}


def _size(n: int) -> int:
    return Payload.buffer_bytes(((torch.Size([n]), torch.float32),))


def test_the_pool_holds_at_most_its_bytes_and_drops_idle_buffers_least_recent_first():
    big = _size(1000)
    pool = HostBufferPool(per_key=4, max_bytes=2 * big + 10)
    a, b = pool.acquire(_spec(1000), 1.0), pool.acquire(_spec(999), 1.0)
    assert pool.bytes == big + _size(999) <= pool.max_bytes
    pool.release(a, Done())  # idle: may be dropped
    pool.release(b, None)
    # A third layout does not fit beside both: the least recently used idle one (a's) goes.
    c = pool.acquire(_spec(998), 1.0)
    assert pool.dropped == 1 and pool.bytes <= pool.max_bytes and len(pool) == 2
    # Nothing idle to drop while both are in flight: the send waits, then fails typed.
    b2 = pool.acquire(_spec(999), 1.0)
    assert b2 is b
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="no send buffer"):
        pool.acquire(_spec(1000), 0.2)
    assert time.monotonic() - started >= 0.2 and pool.bytes <= pool.max_bytes
    pool.release(c, None)
    assert pool.acquire(_spec(1000), 1.0) is not None and pool.bytes <= pool.max_bytes


def test_a_message_above_the_bound_goes_alone_and_pinned_blocks_count_rounded_up():
    pool = HostBufferPool(max_bytes=100)
    slot = pool.acquire(_spec(1000), 1.0)  # nothing else is held: allowed
    assert pool.bytes == _size(1000)
    pool.release(slot, None)
    assert HostBufferPool(pin=True)._counted(3000) == 4096
    assert HostBufferPool(pin=False)._counted(3000) == 3000


def test_the_vae_decodes_one_image_at_a_time_from_upcast_latents(engines, monkeypatch):
    adapter = engines["sdxl"].adapter
    vae = adapter.pipe.vae
    seen, original, vae_input = [], vae.decode, adapter.vae_input

    def decode(z, *args, **kwargs):
        seen.append(z.shape[0])
        return original(z, *args, **kwargs)

    def spy(latents):
        seen.append(latents.dtype)
        return vae_input(latents)

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = adapter.pipe.image_processor.postprocess(
        vae.decode(vae_input(latents), return_dict=False)[0], output_type="pil"
    )
    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(adapter, "vae_input", spy)
    images = adapter.decode(latents.half())
    assert seen == [torch.float32, 1, torch.float32, 1]
    assert len(images) == 2 and [i.size for i in images] == [i.size for i in batch]
    # The same pictures as the whole batch decoded at once (fp16 latents round a little).
    for one, whole in zip(images, batch, strict=True):
        diff = np.abs(np.asarray(one, dtype=np.float32) - np.asarray(whole, dtype=np.float32))
        assert diff.mean() < 2.0

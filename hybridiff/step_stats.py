"""The split of one worker's step (``WorkerStep``), in one place for the worker that reports it and
the coordinator that sums it over a step (docs/design.md section 8):
compute + copies + wire + resolve wait + other = wall."""

from __future__ import annotations

from hybridiff.v1 import diffusion_pb2 as pb


def copy_seconds(w: pb.WorkerStep) -> float:
    """Copies between device and host memory, and into a message's frame, on the step's thread."""
    return w.device_to_host_seconds + w.host_to_device_seconds + w.frame_copy_seconds


def wire_seconds(w: pb.WorkerStep) -> float:
    """Data-plane sends, and waits for the peer's messages."""
    return w.send_seconds + w.receive_wait_seconds


def other_seconds(w: pb.WorkerStep) -> float:
    """The rest of the step: scheduler step, guidance, bookkeeping (never below 0)."""
    return max(
        0.0, w.wall_seconds - w.compute_seconds - copy_seconds(w) - wire_seconds(w) - w.resolve_wait_seconds
    )

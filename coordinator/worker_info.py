"""What a worker says of itself (its control API's ``Info``), read once into ``WorkerInfo``: the
pool keeps it per worker (joining, pairing, the protocol check, abort confirmation), the runner
takes the model's rules from it, and the edges list the models from it."""

from __future__ import annotations

import dataclasses

from hybridiff.calibration import Calibration
from hybridiff.calibration_wire import calibration_from_proto
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import WORKER_PROTOCOL_VERSION
from hybridiff.request import HybridParams, ModelDefaults, SizeLimits


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    worker_id: str  # the sender name its data-plane frames carry
    model_name: str
    arch: str
    data_address: str  # where peers push data-plane frames to it: "tcp://host:port"
    limits: SizeLimits
    defaults: ModelDefaults  # the model's, as the worker reports them (unchecked)
    device: str
    dtype: str
    protocol_version: int
    weights_digest: str
    active_request_id: str  # the request it runs, "" when idle
    calibration: Calibration | None = None  # what `hybridiff calibrate` recorded for the model

    def rules(self, overrides: dict[str, float | int | None]) -> tuple[SizeLimits, ModelDefaults]:
        """The size limits and defaults requests are resolved with; ``overrides`` (the operator's,
        None: the model's) replace hybrid defaults, and the result is checked."""
        hybrid = self.defaults.hybrid.replace(**overrides).validate()
        return self.limits, dataclasses.replace(self.defaults, hybrid=hybrid)


def read_info(info: worker_pb2.InfoResponse) -> WorkerInfo:
    """A worker's ``InfoResponse`` as the coordinator uses it."""
    lim, hd = info.limits, info.hybrid_defaults
    return WorkerInfo(
        worker_id=info.worker_id,
        model_name=info.model_name,
        arch=info.arch,
        data_address=info.data_address,
        limits=SizeLimits(lim.multiple, lim.min_side, lim.max_side, lim.default_side, lim.max_images or 1),
        defaults=ModelDefaults(
            HybridParams(
                hd.l_slope,
                hd.eps_slope,
                hd.k,
                hd.tau_cap,
                hd.refresh_every or HybridParams.refresh_every,  # unset by a worker of an older build
            ),
            info.default_steps,
            info.default_guidance_scale,
        ),
        device=info.device,
        dtype=info.dtype,
        protocol_version=info.protocol_version,
        weights_digest=info.weights_digest,
        active_request_id=info.active_request_id,
        calibration=calibration_from_proto(info.calibration) if info.HasField("calibration") else None,
    )


def pairing_key(info: WorkerInfo) -> tuple[int, str, str, str]:
    """What two workers must agree on to run one request together."""
    return (info.protocol_version, info.dtype, info.device.split(":")[0], info.weights_digest)


def incompatibility(info: WorkerInfo) -> str:
    """Why this coordinator cannot drive the worker at all ("" when it can)."""
    if info.protocol_version != WORKER_PROTOCOL_VERSION:
        return (
            f"it speaks step protocol version {info.protocol_version}, "
            f"this coordinator version {WORKER_PROTOCOL_VERSION}"
        )
    return ""

"""The vocabulary of the step protocol: modes, phases, window policies, output formats, roles.

Values are those of the proto enums (``hybridiff.v1`` and ``hybridiff.internal.v1``), written
out here so that pure code (the schedule, the performance model) needs no generated code; a
test holds the two equal. Inside the program these enums travel; strings appear only at the
edges (CLI flags, JSON, metric labels) through ``label`` and ``parse``.
"""

from __future__ import annotations

from enum import IntEnum

# The version of the internal worker protocol (worker.proto, dataplane.proto) both roles speak:
# a worker reports it in Info, and the coordinator's pool refuses a worker of another version.
WORKER_PROTOCOL_VERSION = 7
# Call metadata of a worker Session naming the coordinator that opens it: a worker busy with
# another coordinator's session refuses it at once with WORKER_BUSY (docs/design.md section 10).
COORDINATOR_METADATA = "hybridiff-coordinator"


class Mode(IntEnum):
    AUTO = 1
    SINGLE = 2
    CFG_PARALLEL = 3
    PIPELINE = 4
    HYBRID = 5


class Phase(IntEnum):
    SINGLE = 1  # one worker, the CFG batch of 2 (or 1 without guidance)
    DATA_PARALLEL = 2  # condition-based partitioning: one branch per worker
    PIPELINE_FILL = 3  # first window step: a synchronous full forward across the stages
    PIPELINE = 4  # stale-activation two-stage pipeline


class WindowGuidance(IntEnum):
    CONDITIONAL = 1  # the conditional prediction only (the reference's semantics, explicit)
    LAST_DIFFERENCE = 2  # e_c + (s - 1) * (last measured e_c - e_u)
    FULL_CFG = 3  # both branches at batch 2 in every stage (AsyncDiff)
    REFRESHED_DIFFERENCE = 4  # LAST_DIFFERENCE, every window fill an exact CFG step measuring it again
    EXTRAPOLATED_DIFFERENCE = 5  # REFRESHED_DIFFERENCE, the difference carried along its damped trend


# The window policies whose fills measure e_c - e_u again, every HybridParams.refresh_every-th
# window step: the schedule makes those steps fills, data parallel (docs/design.md section 7).
REFRESHING_POLICIES = frozenset({WindowGuidance.REFRESHED_DIFFERENCE, WindowGuidance.EXTRAPOLATED_DIFFERENCE})


class OutputFormat(IntEnum):
    PNG = 1
    RAW_LATENTS = 2
    JPEG = 3
    WEBP = 4


class Role(IntEnum):
    U = 1  # unconditional branch; stage 1 in the pipeline window
    C = 2  # conditional branch; stage 2 in the pipeline window


MIME_TYPES = {
    OutputFormat.PNG: "image/png",
    OutputFormat.JPEG: "image/jpeg",
    OutputFormat.WEBP: "image/webp",
    OutputFormat.RAW_LATENTS: "application/x-hybridiff-latents-f32le",
}


def label(value: IntEnum) -> str:
    """The edge name of an enum value: ``Mode.CFG_PARALLEL`` -> ``"cfg-parallel"``."""
    return value.name.lower().replace("_", "-")


def parse(enum: type[IntEnum], name: str) -> IntEnum:
    """The enum value of an edge name; ``ValueError`` naming the choices when there is none."""
    for value in enum:
        if label(value) == name:
            return value
    raise ValueError(f"unknown {enum.__name__} {name!r}; expected one of {', '.join(labels(enum))}")


def labels(enum: type[IntEnum]) -> list[str]:
    return [label(v) for v in enum]

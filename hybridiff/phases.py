"""The shared vocabulary of the step protocol: modes, phases and window-guidance policies.

Values are those of the public proto enums (proto/hybridiff/api/v1/diffusion.proto).
"""
from __future__ import annotations

from enum import IntEnum

from hybridiff.api.v1 import diffusion_pb2 as pb


class Phase(IntEnum):
    SINGLE = pb.PHASE_SINGLE
    DATA_PARALLEL = pb.PHASE_DATA_PARALLEL
    PIPELINE_FILL = pb.PHASE_PIPELINE_FILL
    PIPELINE = pb.PHASE_PIPELINE


class Mode(IntEnum):
    AUTO = pb.AUTO
    SINGLE = pb.SINGLE
    CFG_PARALLEL = pb.CFG_PARALLEL
    PIPELINE = pb.PIPELINE
    HYBRID = pb.HYBRID


class WindowGuidance(IntEnum):
    CONDITIONAL = pb.CONDITIONAL
    LAST_DIFFERENCE = pb.LAST_DIFFERENCE
    FULL_CFG = pb.FULL_CFG


MODE_NAMES = {"auto": Mode.AUTO, "single": Mode.SINGLE, "cfg-parallel": Mode.CFG_PARALLEL,
              "pipeline": Mode.PIPELINE, "hybrid": Mode.HYBRID}
WINDOW_GUIDANCE_NAMES = {"conditional": WindowGuidance.CONDITIONAL, "last-difference": WindowGuidance.LAST_DIFFERENCE,
                         "full-cfg": WindowGuidance.FULL_CFG}


# What the public API carries: "default" is the unset enum value; the same names as the CLI.
WINDOW_GUIDANCE_WIRE = {"default": pb.WINDOW_GUIDANCE_UNSPECIFIED, **{k: int(v) for k, v in WINDOW_GUIDANCE_NAMES.items()}}
OUTPUT_FORMAT_NAMES = {"png": pb.PNG, "raw-latents": pb.RAW_LATENTS}


def mode_name(mode: Mode) -> str:
    return {v: k for k, v in MODE_NAMES.items()}[mode]

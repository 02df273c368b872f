"""The pure-Python enums equal the proto enums, and edge names round-trip."""

import pytest

from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Mode, OutputFormat, Phase, Role, WindowGuidance, label, labels, parse
from hybridiff.v1 import diffusion_pb2 as pb


@pytest.mark.parametrize(
    "enum,wire,prefix",
    [
        (Mode, pb.Mode, "MODE_"),
        (Phase, pb.Phase, "PHASE_"),
        (WindowGuidance, pb.WindowGuidance, "WINDOW_GUIDANCE_"),
        (OutputFormat, pb.OutputFormat, "OUTPUT_FORMAT_"),
        (Role, worker_pb2.Role, "ROLE_"),
    ],
)
def test_enums_equal_the_wire(enum, wire, prefix):
    assert {v.name: int(v) for v in enum} == {
        name.removeprefix(prefix): number for name, number in wire.items() if not name.endswith("UNSPECIFIED")
    }


def test_edge_names_round_trip():
    assert label(Mode.CFG_PARALLEL) == "cfg-parallel" and parse(Mode, "cfg-parallel") is Mode.CFG_PARALLEL
    assert labels(WindowGuidance) == [
        "conditional",
        "last-difference",
        "full-cfg",
        "refreshed-difference",
        "extrapolated-difference",
    ]
    with pytest.raises(ValueError, match="expected one of"):
        parse(Mode, "turbo")

"""The CLI's one JSON form (hybridiff.protojson): the protobuf JSON mapping with 64-bit integers as
numbers, nested and repeated ones included, and every field written."""

import json

from hybridiff.protojson import message_json, response_json
from hybridiff.v1 import diffusion_pb2 as pb


def test_64_bit_integers_are_numbers_at_every_depth_and_exact():
    seed = 2**64 - 1  # past what a double holds exactly
    response = pb.GenerateResponse(
        request_id="r",
        seed=seed,
        stats=pb.GenerateStats(
            mode_used=pb.MODE_HYBRID,
            data_plane_bytes=2**40 + 1,
            steps=[pb.StepStat(step=0, bytes_sent=7, workers=[pb.WorkerStep(worker="u", bytes_received=9)])],
        ),
    )
    data = json.loads(json.dumps(response_json(response)))
    assert data["seed"] == seed and data["request_id"] == "r"
    assert data["data_plane_bytes"] == 2**40 + 1 and data["mode_used"] == "MODE_HYBRID"
    assert data["steps"][0]["bytes_sent"] == 7 and data["steps"][0]["workers"][0]["bytes_received"] == 9
    assert "tau1" not in data  # unset optional fields stay out; the others are written
    assert data["queued_seconds"] == 0 and data["notes"] == []


def test_a_message_without_64_bit_fields_is_the_plain_mapping():
    status = pb.ClusterStatusResponse(queue_depth=2, workers=[pb.WorkerStatus(address="a", state="idle")])
    assert message_json(status)["workers"][0] == {
        "address": "a",
        "state": "idle",
        "model": "",
        "current_request_id": "",
    }

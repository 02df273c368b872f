"""Log files of the local cluster: JSON lines naming the request and its trace; the end of a
dead process's log in the start-up error."""

from __future__ import annotations

import json
import re

import pytest
from cluster_helpers import make_input, send

from hybridiff.client import DiffusionClient
from hybridiff_launch.local_cluster import LocalCluster


def json_lines(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.slow  # a cluster of its own (~13 s)
def test_json_log_lines_carry_the_request_id_and_trace_id(model_dirs, tmp_path):
    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs", log_format="json") as cluster:
        with DiffusionClient(cluster.address) as client:
            resp = send(
                client,
                make_input(mode="cfg-parallel", prompt="a red circle", num_steps=2, request_id="json-1"),
                timeout=120,
            )
        assert resp.request_id == "json-1"
    for name in ("coordinator", "worker0"):
        lines = json_lines(tmp_path / "logs" / f"{name}.log")
        assert lines, f"no JSON line in {name}.log"
        assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
        mine = [line for line in lines if line.get("request_id") == "json-1"]
        assert mine, f"no line of {name} names the request"
        assert all(re.fullmatch(r"[0-9a-f]{32}", line.get("trace_id", "")) for line in mine), mine
    # One trace: the coordinator's and the worker's lines of the request name the same trace.
    traces = {
        line["trace_id"]
        for name in ("coordinator", "worker0", "worker1")
        for line in json_lines(tmp_path / "logs" / f"{name}.log")
        if line.get("request_id") == "json-1"
    }
    assert len(traces) == 1


@pytest.mark.slow  # a cluster that fails to start (~9 s)
def test_a_process_that_dies_at_start_up_shows_its_log(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    cluster = LocalCluster(broken, workers=1, log_dir=tmp_path / "logs")
    with pytest.raises(RuntimeError) as err:
        cluster.start(timeout=120)
    message = str(err.value)
    assert "worker0 (exit" in message and str(tmp_path / "logs" / "worker0.log") in message
    tail = (tmp_path / "logs" / "worker0.log").read_text().splitlines()[-20:]
    assert tail and tail[-1] in message

"""``hybridiff local --devices``: which device each worker of the local cluster gets."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest
from cluster_helpers import TEST_ENV, child_pids, start_local

from hybridiff.errors import InvalidArgument
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.v1 import diffusion_pb2, diffusion_pb2_grpc
from hybridiff_launch.local_cluster import assign_devices, parse_devices


@pytest.mark.parametrize(
    "workers,devices,gpus,expected",
    [
        (4, ["cuda:0", "cuda:1"], 0, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),  # round robin
        (2, ["cuda:1", "cuda:0", "cuda:2"], 0, ["cuda:1", "cuda:0"]),  # the list's order, fewer workers
        (2, ["cpu"], 4, ["cpu", "cpu"]),  # an explicit list wins over the visible GPUs
        (3, None, 2, ["cuda:0", "cuda:1", "cuda:0"]),  # default: one per visible GPU, round robin
        (2, None, 1, ["cuda:0", "cuda:0"]),  # two workers share the one GPU
        (2, None, 0, ["cpu", "cpu"]),  # no GPU: the CPU
        (0, None, 2, []),
    ],
)
def test_assign_devices(workers, devices, gpus, expected):
    assert assign_devices(workers, devices, gpus=gpus) == expected


def test_parse_devices():
    assert parse_devices("cuda:0, cuda:1,") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("cuda") == ["cuda"]
    for bad in ("", ",", "gpu0", "cuda:x", "cuda:", "cuda:-1", "tpu:0"):
        with pytest.raises(InvalidArgument, match="devices"):
            parse_devices(bad)


def test_a_bad_devices_list_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "hybridiff_launch.cli", "local", "--devices", "cuda:0,gpu1"],
        capture_output=True,
        text=True,
        env=TEST_ENV,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "devices: expected cpu, cuda or cuda:N, got 'gpu1'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _worker_devices(coordinator: str, expected_workers: int, deadline: float) -> list[str]:
    """Each worker's own answer (``Info.device``), found through the coordinator's status."""
    with grpc.insecure_channel(coordinator) as channel:
        status = diffusion_pb2_grpc.DiffusionServiceStub(channel).ClusterStatus(
            diffusion_pb2.ClusterStatusRequest(), timeout=max(1.0, deadline - time.monotonic())
        )
    assert len(status.workers) == expected_workers
    devices = []
    for w in status.workers:
        with grpc.insecure_channel(w.address) as channel:
            stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
            devices.append(stub.Info(worker_pb2.InfoRequest(), timeout=30).device)
    return devices


@pytest.mark.slow  # a local cluster start-up (.ci/run runs the slow tests)
def test_local_workers_report_the_devices_they_were_given(model_dirs, tmp_path):
    deadline = time.monotonic() + 240
    proc, line = start_local(
        ["--model-dir", str(model_dirs["sdxl"]), "--port", "0", "--metrics-port", "0"]
        + ["--devices", "cpu,cpu", "--log-dir", str(tmp_path / "logs")],
        within=240,
    )
    try:
        assert "devices cpu | cpu" in line, line
        address = re.search(r"ready at (\S+)", line).group(1)
        assert _worker_devices(address, 2, deadline) == ["cpu", "cpu"]
        workers = [c for c in map(_cmdline, child_pids(proc.pid)) if "\0worker\0" in c]
        assert len(workers) == 2
        assert all("--device\0cpu\0" in c for c in workers)  # the flag the launcher gave each
    finally:
        proc.send_signal(15)
        proc.wait(timeout=60)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""

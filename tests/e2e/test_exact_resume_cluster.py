"""Exact resume through the real cluster: a model that ships a multistep scheduler
(UniPC), a worker killed with SIGKILL mid-request, and the PNG of the resumed request is byte
for byte the fault-free one — the checkpoint (scheduler history included) travels through the
workers' gRPC control API and the coordinator."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from cluster_helpers import make_input, send, with_unipc

from hybridiff.client import DiffusionClient
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_launch.local_cluster import LocalCluster


def _busy_worker(cluster) -> str:
    with grpc.insecure_channel(cluster.address) as ch:
        status = diffusion_pb2_grpc.DiffusionServiceStub(ch).ClusterStatus(
            pb.ClusterStatusRequest(), timeout=5
        )
    return sorted(w.address for w in status.workers if w.state == "busy")[0]


@pytest.mark.slow  # a cluster and a killed worker (.ci/run runs the slow tests)
def test_a_multistep_request_killed_mid_way_gives_the_same_png(model_dirs, tmp_path):
    model = with_unipc(Path(model_dirs["sdxl"]), tmp_path / "unipc")
    raw = make_input(prompt="a blue circle", num_steps=16, seed=5, mode="cfg-parallel")
    with LocalCluster(model, workers=2, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        try:
            fault_free = send(client, raw, timeout=120)
            killed: list[str] = []
            lock = threading.Lock()

            def on_progress(p) -> None:
                with lock:
                    if p.step + 1 == 5 and not killed:
                        victim = _busy_worker(cluster)
                        proc = cluster.procs[cluster.worker_addresses.index(victim)]
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=10)
                        killed.append(victim)

            resumed = send(client, raw, timeout=300, on_progress=on_progress)
        finally:
            client.close()
    assert killed and any("resumed at step" in n for n in resumed.stats.notes)
    assert resumed.images[0].data == fault_free.images[0].data  # byte for byte

"""A worker's death does not lose the request (DESIGN section 5): kill -9 during phase 1, during
the pipeline window and at the end (decode); the coordinator resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import threading

import grpc
import pytest
from cluster_helpers import make_input, send

from hybridiff.client import DiffusionClient
from hybridiff.errors import HybridiffError
from hybridiff.request import RequestInput
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from launch.local_cluster import LocalCluster


def _busy_workers(cluster) -> list[str]:
    with grpc.insecure_channel(cluster.address) as ch:
        status = diffusion_pb2_grpc.DiffusionServiceStub(ch).ClusterStatus(
            pb.ClusterStatusRequest(), timeout=5
        )
    return sorted(w.address for w in status.workers if w.state == "busy")


def _kill(cluster, address: str) -> None:
    proc = cluster.procs[cluster.worker_addresses.index(address)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _generate_killing(cluster, raw: RequestInput, kill_after: int, pick=lambda busy: busy[0]):
    """Run ``raw`` and kill one of its workers when progress event ``kill_after`` arrives."""
    client = DiffusionClient(cluster.address)
    killed: list[str] = []
    lock = threading.Lock()

    def on_progress(p) -> None:
        with lock:
            if p.step + 1 == kill_after and not killed:
                victim = pick(_busy_workers(cluster))
                _kill(cluster, victim)
                killed.append(victim)

    try:
        return send(client, raw, timeout=300, on_progress=on_progress), killed
    finally:
        client.close()


def test_kill_in_phase_one_gives_the_same_png_on_the_lone_survivor(model_dirs, tmp_path):
    raw = make_input(prompt="a blue circle", num_steps=16, seed=5, mode="cfg-parallel")
    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        fault_free = send(client, raw, timeout=120)
        client.close()
        resp, killed = _generate_killing(cluster, raw, kill_after=5)
    assert killed and resp.images[0].data == fault_free.images[0].data  # byte for byte
    notes = " ".join(resp.stats.notes)
    assert "failed" in notes and "resumed at step" in notes
    assert len(resp.stats.steps) == 16


def test_kill_in_the_window_and_at_decode_completes_on_a_new_pair(model_dirs, tmp_path):
    with LocalCluster(model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs") as cluster:
        window = make_input(prompt="a red square", num_steps=20, seed=7, mode="hybrid", tau_cap=3, k=12)
        resp, killed = _generate_killing(cluster, window, kill_after=8)  # steps 3..15 are the window
        assert killed and resp.images[0].data.startswith(b"\x89PNG")
        assert resp.stats.tau1 == 3 and any("resumed at step" in n for n in resp.stats.notes)
        assert len(resp.stats.workers) == 3  # the survivor and a replacement took over

        # kill worker U (it decodes) as the last step completes: the image still comes back
        last = make_input(prompt="a green star", num_steps=8, seed=9, mode="cfg-parallel")
        resp, killed = _generate_killing(cluster, last, kill_after=8, pick=lambda busy: busy[0])
        assert killed and resp.images[0].data.startswith(b"\x89PNG")
        client = DiffusionClient(cluster.address)
        try:
            with pytest.raises(HybridiffError):  # only one worker is left, and it is not a pair
                send(client, make_input(prompt="x", num_steps=2, mode="hybrid"), timeout=5)
        finally:
            client.close()


def test_a_restarted_worker_rejoins_the_pool(model_dirs, tmp_path):
    import subprocess
    import sys
    import time

    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs") as cluster:
        address = cluster.worker_addresses[0]
        _kill(cluster, address)
        port = address.rsplit(":", 1)[1]
        restarted = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "worker",
                "--model-dir",
                str(model_dirs["sdxl"]),
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--data-port",
                "0",
                "--metrics-port",
                "0",
                "--worker-id",
                "worker0-again",
            ],
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        try:
            deadline = time.monotonic() + 60
            states = {}
            while time.monotonic() < deadline:
                with grpc.insecure_channel(cluster.address) as ch:
                    status = diffusion_pb2_grpc.DiffusionServiceStub(ch).ClusterStatus(
                        pb.ClusterStatusRequest(), timeout=5
                    )
                states = {w.address: w.state for w in status.workers}
                if states.get(address) == "idle":
                    break
                time.sleep(0.5)
            assert states.get(address) == "idle", states
            client = DiffusionClient(cluster.address)
            try:  # and it serves: a pair request runs on both workers again
                resp = send(
                    client, make_input(prompt="a circle", num_steps=4, mode="cfg-parallel"), timeout=60
                )
                assert len(resp.stats.workers) == 2
            finally:
                client.close()
        finally:
            restarted.terminate()
            restarted.wait(timeout=30)


def test_sigterm_drains_the_coordinator(model_dirs, tmp_path):
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        result = {}
        progress = threading.Event()

        def long_request():
            try:
                result["resp"] = send(
                    client,
                    make_input(prompt="a star", num_steps=40, mode="cfg-parallel"),
                    timeout=120,
                    on_progress=lambda p: progress.set(),
                )
            except HybridiffError as err:
                result["error"] = err

        worker = threading.Thread(target=long_request)
        worker.start()
        assert progress.wait(60)
        coordinator = cluster.procs[-1]
        coordinator.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(cluster.address) as ch:
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                try:
                    status = (
                        health_pb2_grpc.HealthStub(ch)
                        .Check(health_pb2.HealthCheckRequest(), timeout=2)
                        .status
                    )
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.NOT_SERVING or status is None:
                    break
                time.sleep(0.05)
            assert status != health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:  # new requests are refused
                diffusion_pb2_grpc.DiffusionServiceStub(ch).Generate(
                    pb.GenerateRequest(prompt="x"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        worker.join(timeout=120)
        assert "resp" in result, result.get("error")  # the request in flight finished
        assert len(result["resp"].stats.steps) == 40
        assert coordinator.wait(timeout=30) == 0
        client.close()

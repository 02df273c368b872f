"""A worker's death does not lose the request (docs/design.md section 5): kill -9 during phase 1, during
the pipeline window and at the end (decode); the coordinator resumes from its checkpoint, and the
worker restarted rejoins. SIGTERM drains the coordinator."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cluster_helpers import (
    Freezer,
    await_worker_state,
    generate_killing,
    make_input,
    send,
    spawn_worker,
    worker_states,
)

from hybridiff.client import DiffusionClient
from hybridiff.errors import HybridiffError
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_launch.local_cluster import LocalCluster


@pytest.mark.slow  # a kill, a restart and a rejoin (~25 s)
def test_kill_in_phase_one_gives_the_same_png_and_the_worker_restarted_rejoins(model_dirs, tmp_path):
    raw = make_input(prompt="a blue circle", num_steps=16, seed=5, mode="cfg-parallel")
    freezer = Freezer(tmp_path / "freeze")
    with LocalCluster(
        model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs", extra_env=freezer.env()
    ) as cluster:
        client = DiffusionClient(cluster.address)
        try:
            fault_free = send(client, raw, timeout=120)
            raw.request_id = "killed-at-step-5"
            resp, killed = generate_killing(cluster, freezer, raw, "step 5")
            assert len(killed) == 1 and resp.images[0].data == fault_free.images[0].data  # byte for byte
            notes = " ".join(resp.stats.notes)
            assert f"worker {killed[0]} failed" in notes and "resumed at step 5" in notes
            assert len(resp.stats.steps) == 16

            # Out of service while dead; restarted at its address, it is probed back in and serves.
            assert worker_states(cluster, timeout=5)[killed[0]] == "unhealthy"
            restarted = _restart(cluster, killed[0], tmp_path / "logs" / "restarted.log")
            try:
                await_worker_state(cluster, killed[0], "idle", 120, poll=0.1, rpc_timeout=5)
                again = send(
                    client, make_input(prompt="a circle", num_steps=4, mode="cfg-parallel"), timeout=60
                )
                assert again.stats.notes == [] and sorted(again.stats.workers) == sorted(
                    cluster.worker_addresses
                )
            finally:
                restarted.terminate()
                restarted.wait(timeout=30)
        finally:
            client.close()


def _restart(cluster, address: str, log: Path) -> subprocess.Popen:
    """A new worker process of the cluster's model at the control address of a dead one."""
    return spawn_worker(
        cluster.model_dir,
        "--data-peer-cidrs",
        "127.0.0.0/8",
        "--worker-id",
        "restarted",
        port=address.rsplit(":", 1)[1],
        log=log,
    )


@pytest.mark.slow  # three workers and two kills (~16 s)
def test_kill_in_the_window_and_at_decode_completes_on_a_new_pair(model_dirs, tmp_path):
    freezer = Freezer(tmp_path / "freeze")
    with LocalCluster(
        model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs", extra_env=freezer.env()
    ) as cluster:
        window = make_input(
            prompt="a red square", num_steps=20, seed=7, mode="hybrid", tau_cap=3, k=12, request_id="window"
        )
        resp, killed = generate_killing(cluster, freezer, window, "step 8")  # steps 3..15: the window
        assert len(killed) == 1 and resp.images[0].data.startswith(b"\x89PNG")
        assert resp.stats.tau1 == 3 and resp.stats.tau2 == 15
        assert any(f"worker {killed[0]} failed" in n and "resumed at step 8" in n for n in resp.stats.notes)
        assert len(resp.stats.workers) == 3  # the survivor and a replacement took over

        # kill worker U as it decodes, every step done: the lone survivor decodes the checkpoint
        last = make_input(prompt="a green star", num_steps=8, seed=9, mode="cfg-parallel", request_id="last")
        resp, killed = generate_killing(cluster, freezer, last, "decode")
        assert len(killed) == 1 and killed[0] == resp.stats.workers[0]  # U, the worker that decodes
        assert resp.images[0].data.startswith(b"\x89PNG") and len(resp.stats.steps) == 8
        assert any(f"worker {killed[0]} failed" in n and "resumed at step 8" in n for n in resp.stats.notes)
        # the two killed workers are out of service, the lone survivor free again
        assert sorted(worker_states(cluster, timeout=5).values()) == ["idle", "unhealthy", "unhealthy"]


@pytest.mark.slow  # a cluster of its own, drained (~12 s)
def test_sigterm_drains_the_coordinator(model_dirs, tmp_path):
    """SIGTERM while a request runs (held at a step: it is in flight whatever the machine's speed)
    and another waits: health is no longer SERVING, new and queued requests get UNAVAILABLE (the
    queued one never starts), the running one finishes, and the coordinator exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    freezer = Freezer(tmp_path / "freeze")
    with LocalCluster(
        model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs", extra_env=freezer.env()
    ) as cluster:
        client = DiffusionClient(cluster.address)
        outcomes: dict[str, object] = {}
        queued_progress: list[int] = []

        def run(name: str, steps: int, on_progress=None) -> None:
            raw = make_input(prompt=name, num_steps=steps, mode="cfg-parallel", request_id=name)
            try:
                outcomes[name] = send(client, raw, timeout=120, on_progress=on_progress)
            except HybridiffError as err:
                outcomes[name] = err

        freezer.arm("running", "step 5")
        running = threading.Thread(target=run, args=("running", 40))
        running.start()
        frozen = freezer.frozen_pid(within=120)  # held at step 5 until SIGCONT below
        assert frozen is not None, "no worker reached step 5"
        queued = threading.Thread(target=run, args=("queued", 4, lambda p: queued_progress.append(p.step)))
        queued.start()
        coordinator = cluster.procs[-1]
        try:
            with grpc.insecure_channel(cluster.address) as ch:
                stub = diffusion_pb2_grpc.DiffusionServiceStub(ch)
                deadline = time.monotonic() + 30
                while stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5).queue_depth != 1:
                    assert time.monotonic() < deadline, "the second request never queued"
                    time.sleep(0.01)
                coordinator.send_signal(signal.SIGTERM)
                queued.join(timeout=30)
                assert isinstance(outcomes.get("queued"), HybridiffError), outcomes.get("queued")
                assert outcomes["queued"].code == grpc.StatusCode.UNAVAILABLE
                assert not queued_progress  # it never started
                health = health_pb2_grpc.HealthStub(ch)
                deadline = time.monotonic() + 10
                while True:  # the drain flips health once the pool is closed
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    except grpc.RpcError:
                        status = None  # the server already refuses new calls
                    if status != health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                assert status != health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.RpcError) as err:  # new requests are refused
                    stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            os.kill(frozen, signal.SIGCONT)
            freezer.disarm()
        running.join(timeout=120)
        assert not isinstance(outcomes.get("running"), HybridiffError), outcomes.get("running")
        assert len(outcomes["running"].stats.steps) == 40  # the request in flight finished
        assert coordinator.wait(timeout=30) == 0
        client.close()

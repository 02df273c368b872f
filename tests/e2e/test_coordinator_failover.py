"""A coordinator killed mid-request with two replicas (docs/design.md section 10): the client,
given both addresses, sends the request again on the other with the request id and seed it
fixed itself; the image is the fault-free one, byte for byte."""

from __future__ import annotations

import threading

import pytest

from hybridiff.client import DiffusionClient
from hybridiff_launch.local_cluster import LocalCluster

pytestmark = pytest.mark.slow  # two coordinators, two workers, a kill: under a minute


def test_a_coordinator_killed_mid_request_the_client_finishes_on_the_other(model_dirs, tmp_path):
    with LocalCluster(model_dirs["sdxl"], workers=2, coordinators=2, log_dir=tmp_path / "logs") as cluster:
        first, second = cluster.addresses
        killed = threading.Event()
        steps: list[int] = []

        def kill_the_first_at_step_3(progress) -> None:
            steps.append(progress.step)
            if progress.step >= 3 and not killed.is_set():
                cluster.coordinator_procs[0].kill()  # SIGKILL, mid-request
                killed.set()

        fields = dict(steps=16, mode="cfg-parallel", timeout=240)
        with DiffusionClient([first, second]) as client:  # no seed, no request id: the client fixes both
            done = client.generate("a red square", on_progress=kill_the_first_at_step_3, **fields)
        assert killed.is_set() and cluster.coordinator_procs[0].wait(10) == -9
        assert steps.count(1) == 2  # the steps began again on the other coordinator
        with DiffusionClient(second) as client:
            fault_free = client.generate("a red square", seed=done.seed, **fields)
        assert done.data == fault_free.data
        assert fault_free.request_id != done.request_id

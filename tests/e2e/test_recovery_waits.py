"""Recovery that waits (docs/design.md section 5): a worker killed while every other worker is
busy does not fail its request. The request goes back to the head of its model's queue with its
checkpoint, holding no worker, and resumes on the next free worker (SINGLE) or pair (a HYBRID
request whose pipeline window is still ahead, which a lone survivor could not run as scheduled);
its image is the fault-free one, byte for byte."""

from __future__ import annotations

import threading

import pytest
from cluster_helpers import Freezer, generate_killing, make_input, send, wait_until, worker_states

from hybridiff.client import DiffusionClient
from hybridiff_launch.local_cluster import LocalCluster

pytestmark = pytest.mark.slow  # a three-worker cluster, a kill and two waits: about a minute


def _blocked(cluster, busy_before: int, **fields):
    """Start a long SINGLE request in the background; return once it holds a worker."""
    client = DiffusionClient(cluster.address)
    done: list = []
    thread = threading.Thread(
        target=lambda: done.append(send(client, make_input(mode="single", **fields), timeout=300)),
        daemon=True,
    )
    thread.start()
    wait_until(
        lambda: sum(s == "busy" for s in worker_states(cluster, timeout=5).values()) > busy_before,
        60,
        "the blocker started",
    )
    return thread, done, client


def test_a_worker_killed_while_every_other_is_busy_resumes_when_one_frees(model_dirs, tmp_path):
    freezer = Freezer(tmp_path / "freeze")
    with LocalCluster(
        model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs", extra_env=freezer.env()
    ) as cluster:
        client = DiffusionClient(cluster.address)
        try:
            # A pair whose window (steps 6..9) is ahead when its worker dies at step 2.
            pair = make_input(prompt="a red square", num_steps=12, seed=7, mode="hybrid", tau_cap=6, k=3)
            single = make_input(prompt="a blue circle", num_steps=10, seed=5, mode="single")
            fault_free_pair, fault_free_single = (
                send(client, pair, timeout=120),
                send(client, single, timeout=120),
            )

            blocker, blocked, blocker_client = _blocked(
                cluster, 0, prompt="a green star", num_steps=150, seed=1
            )
            pair.request_id = "pair-killed-at-step-2"
            resp, killed = generate_killing(cluster, freezer, pair, "step 2")
            blocker.join(300)
            blocker_client.close()
            assert len(killed) == 1 and blocked, "the blocker ran beside the pair"
            assert resp.images[0].data == fault_free_pair.images[0].data  # byte for byte
            assert (
                resp.stats.tau1 == fault_free_pair.stats.tau1
                and resp.stats.tau2 == fault_free_pair.stats.tau2
            )
            assert any(
                f"worker {killed[0]} failed" in n and "resumed at step 2" in n for n in resp.stats.notes
            )
            assert len(resp.stats.workers) == 3  # it waited for the blocker's worker, not alone

            # Two workers left: one busy with a blocker, the other killed under a SINGLE request.
            blocker, blocked, blocker_client = _blocked(
                cluster, 0, prompt="a green star", num_steps=150, seed=2
            )
            single.request_id = "single-killed-at-step-3"
            resp, killed = generate_killing(cluster, freezer, single, "step 3")
            blocker.join(300)
            blocker_client.close()
            assert len(killed) == 1 and blocked
            assert resp.images[0].data == fault_free_single.images[0].data
            assert any(
                f"worker {killed[0]} failed" in n and "resumed at step 3" in n for n in resp.stats.notes
            )
            assert sorted(worker_states(cluster, timeout=5).values()) == ["idle", "unhealthy", "unhealthy"]
        finally:
            client.close()

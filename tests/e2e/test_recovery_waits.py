"""Recovery that waits (docs/design.md section 5): a worker killed while every other worker is
busy does not fail its request. The request goes back to the head of its model's queue with its
checkpoint, holding no worker, and resumes on the next free worker (SINGLE) or pair (a HYBRID
request whose pipeline window is still ahead, which a lone survivor could not run as scheduled);
its image is the fault-free one, byte for byte. An elastic request that shrank from its pair to one
worker (adaptive policy) and then lost that worker waits and resumes alike, alone on the next free
worker, with the fault-free image within the elastic tolerance (a lone step computes the CFG
batch: fp32 rounding apart from the pair's)."""

from __future__ import annotations

import threading

import pytest
from cluster_helpers import (
    Freezer,
    generate_killing,
    kill_worker_process,
    make_input,
    send,
    wait_until,
    worker_states,
)

from hybridiff.client import DiffusionClient
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_tools.quality import psnr

pytestmark = pytest.mark.slow  # each a three-worker cluster, kills and waits: a minute or two


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


# Steps between the first lone step seen by the client and the one whose worker is killed: the
# worker runs at most one step ahead of the last one it reported (the elastic lookahead).
KILL_AHEAD = 10


def _kill_after_shrink(cluster, freezer: Freezer, raw, on_first_step):
    """Run elastic ``raw``; ``on_first_step`` once it runs; once it runs alone (a shrink), stop
    the worker it runs on KILL_AHEAD steps later and kill it. (response, killed address, worker
    states at the kill)."""
    killed: list = []
    ended = threading.Event()
    started = threading.Event()

    def on_progress(p) -> None:
        if not started.is_set():
            started.set()
            on_first_step()
        if p.phase == pb.PHASE_SINGLE and not (freezer.dir / "plan").exists() and not killed:
            freezer.arm(raw.request_id, f"step {p.step + KILL_AHEAD}")

    def killer() -> None:
        pid = freezer.frozen_pid(ended)
        if pid is not None:
            states = worker_states(cluster, timeout=5)
            killed.append(
                (kill_worker_process(cluster, next(p for p in cluster.procs if p.pid == pid)), states)
            )

    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    client = DiffusionClient(cluster.address)
    try:
        resp = send(client, raw, timeout=300, on_progress=on_progress)
    finally:
        ended.set()
        thread.join()
        freezer.disarm()
        client.close()
    assert len(killed) == 1, "no worker was killed after the shrink"
    return resp, *killed[0]


def test_an_elastic_request_killed_after_a_shrink_resumes_when_a_worker_frees(model_dirs, tmp_path):
    freezer = Freezer(tmp_path / "freeze")
    with LocalCluster(
        model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs", extra_env=freezer.env()
    ) as cluster:
        client = DiffusionClient(cluster.address)
        try:
            # AUTO under the adaptive policy: elastic; phase 1 throughout, where a switch is exact.
            elastic = make_input(
                prompt="a red circle", num_steps=60, seed=9, mode="auto", l_slope=500, tau_cap=500
            )
            fault_free = send(client, elastic, timeout=120)  # alone in the cluster: a pair throughout
            assert [len(s.workers) for s in fault_free.stats.steps] == [2] * 60

            # One worker busy with a blocker; the elastic request takes the other two, then shrinks
            # for a newcomer; so every worker is busy when the one it kept dies.
            blocker, blocked, blocker_client = _blocked(
                cluster, 0, prompt="a green star", num_steps=150, seed=1
            )
            newcomer: list = []
            newcomer_client = DiffusionClient(cluster.address)

            def newcomer_arrives() -> None:
                threading.Thread(
                    target=lambda: newcomer.append(
                        send(
                            newcomer_client,
                            make_input(prompt="a blue square", num_steps=150, seed=3, mode="single"),
                            timeout=300,
                        )
                    ),
                    daemon=True,
                ).start()

            elastic.request_id = "elastic-killed-after-a-shrink"
            resp, killed, states = _kill_after_shrink(cluster, freezer, elastic, newcomer_arrives)
            blocker.join(300)
            blocker_client.close()
            wait_until(lambda: newcomer, 300, "the newcomer finished")
            newcomer_client.close()

            assert blocked and sorted(states.values()) == ["busy", "busy", "busy"], states
            notes = resp.stats.notes
            shrink = next(i for i, n in enumerate(notes) if n.startswith("shrink at step"))
            failure = next(i for i, n in enumerate(notes) if f"worker {killed} failed" in n)
            assert shrink < failure and "resumed at step" in notes[failure], notes
            widths = [len(s.workers) for s in resp.stats.steps]
            assert widths[0] == 2 and widths[-1] in (1, 2) and len(widths) == 60, widths
            resumed_on = notes[failure].rsplit(" on ", 1)[1]
            assert killed not in resumed_on  # it waited for a busy worker to free
            assert psnr(resp.images[0].data, fault_free.images[0].data) >= 45.0
            assert sorted(worker_states(cluster, timeout=5).values()) == ["idle", "idle", "unhealthy"]
        finally:
            client.close()

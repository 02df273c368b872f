"""A hung worker (alive, answering nothing: SIGSTOP) mid-request: the request completes elsewhere,
the next requests never wait on it, ClusterStatus shows it quarantined, and once it runs again
(SIGCONT) it is back after its quarantine. A worker stopped while idle is found by the pool's idle
watch, without any request, and quarantined before a request draws it."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest
from cluster_helpers import await_worker_state, make_input, send, worker_states

from coordinator.pool import HealthPolicy
from hybridiff import serving
from hybridiff.client import DiffusionClient
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.local_cluster import LocalCluster

# A request that waits on a stopped worker waits at least this long: the keepalive that notices it.
NOTICED_AFTER = (serving.KEEPALIVE_TIME_MS + serving.KEEPALIVE_TIMEOUT_MS) / 1000
PROBE_INTERVAL = 1.0  # the coordinator's pool probes a quarantined worker every second


def _quarantines(cluster) -> float:
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("hybridiff_worker_quarantines_total "):
            return float(line.split()[1])
    raise AssertionError("no hybridiff_worker_quarantines_total")


def _timed(client, raw) -> tuple[pb.GenerateResponse, float]:
    start = time.monotonic()
    resp = send(client, raw, timeout=300)
    return resp, time.monotonic() - start


@pytest.mark.slow  # long by nature: .ci/run runs the slow tests after the README's command
def test_a_stopped_worker_is_quarantined_and_never_waited_on(model_dirs, tmp_path):
    raw = make_input(prompt="a blue circle", num_steps=12, seed=5, mode="cfg-parallel")
    with LocalCluster(model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        stopped: list[str] = []
        try:
            _, baseline = _timed(client, raw)
            lock = threading.Lock()

            def on_progress(p) -> None:
                with lock:
                    if p.step + 1 == 4 and not stopped:
                        busy = sorted(a for a, s in worker_states(cluster).items() if s == "busy")
                        victim = busy[0]
                        os.kill(cluster.procs[cluster.worker_addresses.index(victim)].pid, signal.SIGSTOP)
                        stopped.append(victim)

            resp = send(client, raw, timeout=300, on_progress=on_progress)
            assert stopped, "no worker was stopped"
            victim = stopped[0]
            assert resp.images[0].data.startswith(b"\x89PNG") and len(resp.stats.steps) == 12
            assert any("resumed at step" in n for n in resp.stats.notes), resp.stats.notes
            await_worker_state(cluster, victim, "unhealthy", 30)  # quarantined
            assert _quarantines(cluster) >= 1

            latencies = []
            for seed in (11, 12, 13):
                after, seconds = _timed(
                    client, make_input(prompt="a red square", num_steps=12, seed=seed, mode="cfg-parallel")
                )
                latencies.append(seconds)
                assert victim not in after.stats.workers, after.stats.workers
                assert not [n for n in after.stats.notes if "failed" in n or "resumed" in n], (
                    after.stats.notes
                )
            print(f"baseline {baseline:.2f}s, after the stop {', '.join(f'{s:.2f}s' for s in latencies)}")
            # None waited on the stopped worker (a wait lasts at least until keepalive notices).
            assert max(latencies) < baseline + NOTICED_AFTER, (baseline, latencies)
            # Its probes time out: it stays quarantined for as long as it is stopped.
            probes_end = time.monotonic() + 2 * (PROBE_INTERVAL + HealthPolicy.probe_timeout)
            while time.monotonic() < probes_end:
                assert worker_states(cluster)[victim] == "unhealthy"
                time.sleep(0.2)

            os.kill(cluster.procs[cluster.worker_addresses.index(victim)].pid, signal.SIGCONT)
            stopped.clear()
            back = await_worker_state(cluster, victim, "idle", 120)
            print(f"re-admitted {back:.1f}s after SIGCONT")
            # It proved itself first: good probes in a row, a probe interval apart (the first may be
            # the one in flight when it resumed), not the first answer it gave.
            assert back >= (HealthPolicy.readmit_probes - 1) * PROBE_INTERVAL * 0.75
        finally:
            for address in stopped:  # never leave a stopped process behind
                os.kill(cluster.procs[cluster.worker_addresses.index(address)].pid, signal.SIGCONT)
            client.close()


@pytest.mark.slow  # waits for keepalive to notice the stopped worker
def test_a_worker_hung_before_measure_split_is_replaced_and_quarantined_alone(model_dirs, tmp_path):
    """The first pipeline request of a size measures the stage cut on its lease's first worker:
    stopped, that worker fails the call (keepalive), is quarantined alone, an idle worker takes
    its place, and the request completes; its healthy partner is never quarantined."""
    raw = make_input(prompt="a green triangle", num_steps=8, seed=3, mode="pipeline")
    with LocalCluster(model_dirs["sdxl"], workers=3, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        victim = min(cluster.worker_addresses)  # leases take idle workers in id order
        pid = cluster.procs[cluster.worker_addresses.index(victim)].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            resp = send(client, raw, timeout=300)
            assert resp.images[0].data.startswith(b"\x89PNG") and len(resp.stats.steps) == 8
            assert victim not in resp.stats.workers and len(resp.stats.workers) == 2
            states = worker_states(cluster)
            assert states[victim] == "unhealthy", states
            assert all(s != "unhealthy" for a, s in states.items() if a != victim), states
            assert _quarantines(cluster) == 1
        finally:
            os.kill(pid, signal.SIGCONT)
            client.close()


@pytest.mark.slow  # a cluster of its own, a quarantine and a re-admission (~20 s)
def test_an_idle_worker_stopped_is_quarantined_before_a_request_draws_it(model_dirs, tmp_path):
    raw = make_input(prompt="a blue circle", num_steps=12, seed=5, mode="single")
    with LocalCluster(model_dirs["sdxl"], workers=2, log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        victim = min(cluster.worker_addresses)  # the worker a lone request draws first
        pid = cluster.procs[cluster.worker_addresses.index(victim)].pid
        stopped = False
        try:
            first, baseline = _timed(client, raw)
            assert len(first.stats.workers) == 1
            os.kill(pid, signal.SIGSTOP)
            stopped = True
            # No request runs: only the idle watch's health Check can find it.
            found = await_worker_state(cluster, victim, "unhealthy", 3.0, poll=0.05)
            assert _quarantines(cluster) == 1

            after, seconds = _timed(client, raw)
            print(f"quarantined {found:.2f}s after SIGSTOP; baseline {baseline:.2f}s, after {seconds:.2f}s")
            assert victim not in after.stats.workers and len(after.stats.workers) == 1
            assert not [n for n in after.stats.notes if "failed" in n or "resumed" in n], after.stats.notes
            assert after.images[0].data == first.images[0].data
            # It never waited on the stopped worker (drawn, it would wait until keepalive noticed).
            assert seconds < baseline + NOTICED_AFTER / 2, (baseline, seconds)

            os.kill(pid, signal.SIGCONT)
            stopped = False
            back = await_worker_state(cluster, victim, "idle", 60)
            print(f"re-admitted {back:.1f}s after SIGCONT")
            assert _quarantines(cluster) == 1
        finally:
            if stopped:  # never leave a stopped process behind
                os.kill(pid, signal.SIGCONT)
            client.close()
